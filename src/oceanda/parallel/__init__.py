"""Parallel runtime: communicator, rank layout, device binding, halo exchange, driver."""
