"""Evaluation: generation, judges, win rates and reports."""
