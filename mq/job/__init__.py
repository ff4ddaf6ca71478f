"""One run, start to end: run folders and their lock (rundir), the checks and the task (run),
the training loop (train), evaluation, progress and summaries, resuming, loggers, the sweep
ledger's job states and preemption. Imports nothing itself: the sweeper reaches the ledger and
must not pay for torch."""
