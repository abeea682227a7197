import sys

from pipelines.shard.stage import main

sys.exit(main(sys.argv[1:]))
