"""Kernels: batched banded / block-tridiagonal SPD solves with implicit-diff gradients.

Banded SPD matrices in "row-lower" storage ``band[..., i, j] = A[..., i, i-j]``
(:mod:`oceanda.linalg.banded`): Cholesky, solve, log-det, sample, matvec, MAP / BLUE in
information and Kalman form, SPD construction from unconstrained outputs. CPU tensors run
numba-compiled loops vectorised over the batch; CUDA tensors a log-depth torch scan.
"""

from oceanda.linalg.banded import (
    band_cholesky,
    band_from_dense,
    band_kalman,
    band_add_diagonal,
    band_llt,
    band_logdet,
    band_lower_to_dense,
    band_map,
    band_matvec,
    band_sample,
    band_solve,
    band_to_dense,
    spd_band_from_raw,
)

__all__ = [
    "band_cholesky",
    "band_from_dense",
    "band_kalman",
    "band_add_diagonal",
    "band_llt",
    "band_logdet",
    "band_lower_to_dense",
    "band_map",
    "band_matvec",
    "band_sample",
    "band_solve",
    "band_to_dense",
    "spd_band_from_raw",
]
