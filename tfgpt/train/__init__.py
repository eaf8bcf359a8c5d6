"""Training: the run, the step, the optimizer, checkpoints and what a run reports."""
