"""``python -m mq.report``: the command users type; the code lives in mq.results.report."""

import sys

from mq.results.report import main

if __name__ == "__main__":
    sys.exit(main())
