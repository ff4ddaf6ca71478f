"""``python -m mq.runs``: the command users type; the code lives in mq.results.runs."""

import sys

from mq.results.runs import main, quiet_broken_pipe

if __name__ == "__main__":
    sys.exit(quiet_broken_pipe(main))
