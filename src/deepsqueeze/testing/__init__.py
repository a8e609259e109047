"""Toy models and data shared by the test suites (small enough to train in a second)."""
