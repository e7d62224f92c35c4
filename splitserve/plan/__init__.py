"""Choosing a deployment: per-phase goodput by simulation, rate matching, ranked placements."""
