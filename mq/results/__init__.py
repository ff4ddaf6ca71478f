"""Results: reading run folders (runs), the paper-style tables and plots (report, table, plots,
fair_report, stats) and syncing offline wandb runs (sync). Free of torch, like mq.sweep."""
