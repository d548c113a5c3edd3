"""Training: the `fit` entry point (run), the loop (trainer), loss and accumulation, the schedule, the
precision choice, checkpoints, distributed plumbing, config and data preparation."""
