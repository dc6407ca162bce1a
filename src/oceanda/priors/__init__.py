"""Gaussian priors behind one interface: empirical, neural band prior, SPDE prior."""
