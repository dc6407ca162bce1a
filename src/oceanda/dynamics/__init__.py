"""Models of the world: pendulum, Lorenz-63, quasi-geostrophic SSH truth, Gaussian fields.

Import the submodules (``oceanda.dynamics.lorenz63``, ``oceanda.dynamics.qg``, ...).
"""
