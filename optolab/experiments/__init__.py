"""Experiments: sweeps, executors, reports, plots, post-hoc evaluation, toy models."""
