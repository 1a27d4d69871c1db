"""Differential privacy: accounting, ledgers and the private gradient step."""
