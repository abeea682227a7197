import sys

from pipelines.metadata.build import main

sys.exit(main(sys.argv[1:]))
