"""Latency models: the time of one engine step from the batch's composition (see base.py)."""
