import sys

from pipelines.curate.stage import main

sys.exit(main(sys.argv[1:]))
