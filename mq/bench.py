"""``python -m mq.bench``: the command users type; the code lives in mq.tools.bench."""

import sys

from mq.tools.bench import main

if __name__ == "__main__":
    main(sys.argv[1:])
