"""Stage 2: the step as IR: the calling convention, the stage-0 generator, MLIR contexts and the pass pipeline."""
