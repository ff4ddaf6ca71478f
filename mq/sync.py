"""``python -m mq.sync``: the command users type; the code lives in mq.results.sync."""

import sys

from mq.results.sync import main

if __name__ == "__main__":
    sys.exit(main())
