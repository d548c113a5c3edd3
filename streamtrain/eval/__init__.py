"""Evaluation of a checkpoint against persistence and mean baselines."""
