"""Chat datasets and evaluations (see tasks/common.py)."""
