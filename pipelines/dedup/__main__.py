import sys

from pipelines.dedup.stage import main

sys.exit(main(sys.argv[1:]))
