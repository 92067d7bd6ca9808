"""Stage 4: what outlives a process: artifact directories (manifest.py: the typed manifest and
its version windows; artifact.py: writing and loading), later checkpoints."""
