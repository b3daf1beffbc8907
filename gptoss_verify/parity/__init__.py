"""Comparison of traces: naming, metrics, tolerances, teacher-forced and free-running comparison."""
