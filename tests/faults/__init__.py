"""Faults, abuse and scale-out: real processes prove nothing is lost or charged twice."""
