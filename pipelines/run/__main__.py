import sys

from pipelines.run.dag import main

sys.exit(main(sys.argv[1:]))
