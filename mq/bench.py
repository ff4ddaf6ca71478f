"""``python -m mq.bench``: the command users type; the code lives in mq.tools.bench (and, with
``--pack``, mq.tools.bench_pack)."""

import sys

from mq.tools.bench_pack import main  # --pack: packs; else mq.tools.bench

if __name__ == "__main__":
    main(sys.argv[1:])
