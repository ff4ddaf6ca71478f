"""``python -m mq.runs``: the command users type; the code lives in mq.results.runs."""

import sys

from mq.results.runs import main

if __name__ == "__main__":
    sys.exit(main())
