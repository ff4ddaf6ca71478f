"""Benchmarks (bench, bench_loader): programs a run never imports, typed as
``python -m mq.bench`` and ``python -m mq.bench_loader``."""
