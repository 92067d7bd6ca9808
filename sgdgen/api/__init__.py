"""Stage 5: the stateful Keras-style API (Variable, SGD) over the runtime."""
