"""``python -m mq.bench_loader``: the command users type; the code is mq.tools.bench_loader."""

from mq.tools.bench_loader import main

if __name__ == "__main__":
    main()
