import sys

from pipelines.demo.stage import main

sys.exit(main(sys.argv[1:]))
