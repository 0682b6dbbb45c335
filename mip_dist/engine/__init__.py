"""Distributed init, the DeepSpeed trainer and the evaluator."""
