"""Metrics, the evaluator every model shares, and paired significance tests."""
