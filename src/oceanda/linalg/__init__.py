"""Kernels: batched banded / block-tridiagonal SPD solves with implicit-diff gradients."""
