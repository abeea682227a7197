import sys

from pipelines.filter.stage import main

sys.exit(main(sys.argv[1:]))
