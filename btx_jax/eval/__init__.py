"""Evaluation: held-out losses, generation, downstream tasks (lm-evaluation-harness), reports."""
