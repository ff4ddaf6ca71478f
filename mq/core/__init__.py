"""Core services every layer above may use: errors and their one-line messages, atomic files
and checkpoints, the config keys that do not change a result, the CUDA allocator setting,
distributed primitives and what makes a folder an mq run. Imports nothing from the rest of mq."""
