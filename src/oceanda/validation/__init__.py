"""Single-node validation of neural incremental DA against weak-constraint 4D-Var on the
pendulum and Lorenz-63 (Blanke et al. 2024, Sec. 4): data, experiment runner, report."""
