"""oceanda: distributed neural data assimilation of sea-surface height (SSH).

Layers (imports point downwards only; see ``DESIGN.md`` in the project docs):

``linalg`` kernels -> ``dynamics`` -> ``priors`` -> ``assim`` methods; ``obs`` and ``data``
beside them; ``parallel`` runtime; ``train``, ``metrics``, ``plots``; ``cli`` apps (hydra
lives there only).
"""

__version__ = "0.1.0"
