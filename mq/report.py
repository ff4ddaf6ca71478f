"""``python -m mq.report``: the command users type; the code lives in mq.results.report."""

import sys

from mq.results.report import main
from mq.results.runs import quiet_broken_pipe, warn_to_stderr

if __name__ == "__main__":
    warn_to_stderr()  # a skipped row or field, in one line each
    sys.exit(quiet_broken_pipe(main))
