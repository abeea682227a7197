import sys

from pipelines.ingest.stage import main

sys.exit(main(sys.argv[1:]))
