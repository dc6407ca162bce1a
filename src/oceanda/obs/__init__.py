"""Observations: selection operators, nadir altimeters and SWOT swaths, noise models."""
