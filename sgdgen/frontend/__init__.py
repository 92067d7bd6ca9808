"""Stage 1 of the pipeline: what the user describes (mesh, layouts, variables, hyperparameters, schedules)."""
