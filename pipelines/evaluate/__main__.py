import sys

from pipelines.evaluate.stage import main

sys.exit(main(sys.argv[1:]))
