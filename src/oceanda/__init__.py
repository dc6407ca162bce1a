"""oceanda: distributed neural data assimilation of sea-surface height (SSH).

Layers, lowest first; a package imports only packages of a strictly lower layer
(``tests/unit/test_layers.py`` checks it):

``errors``, ``config_dataclass`` < ``linalg`` kernels < ``dynamics``, ``obs`` < ``priors``,
``data`` < ``assim`` methods, ``metrics`` < ``weights``, ``parallel`` runtime, ``plots`` <
``train`` < ``validation`` < ``cli`` apps. hydra / omegaconf live in ``cli`` only, mpi4py in
``parallel`` only; ``testing`` serves tests.
"""

__version__ = "0.1.0"
