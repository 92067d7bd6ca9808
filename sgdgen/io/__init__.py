"""Stage 4: what outlives a process: artifact directories (and later checkpoints)."""
