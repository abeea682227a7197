import sys

from pipelines.train.stage import main

sys.exit(main(sys.argv[1:]))
