"""Evaluation: how good are the samples of a checkpoint."""
