"""Sweeps: the sweeper (grid and Optuna studies), the SLURM launcher and sweep names. Imports
nothing itself: Hydra's plugin scan reaches this package and must not pay for torch."""
