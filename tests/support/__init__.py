"""Helpers that start and steer real processes for the test suite."""
