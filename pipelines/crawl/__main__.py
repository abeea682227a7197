import sys

from pipelines.crawl.stage import main

sys.exit(main(sys.argv[1:]))
