"""Stage 3: compiled executables (one per program signature) run on jax.Arrays."""
