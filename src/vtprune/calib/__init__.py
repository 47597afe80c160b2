"""Offline calibration of data-aware pruning components (ALVTS selector factors)."""
