"""Parallel runtime: communicator, rank layout, device binding, halo exchange, driver.

* :mod:`~oceanda.parallel.layout` -- tiles, owners, patch assignment, halo contributions
  (pure arithmetic, no communication);
* :mod:`~oceanda.parallel.comm` -- mpi4py ``COMM_WORLD`` wrapper or a serial stand-in (the
  only importer of mpi4py);
* :mod:`~oceanda.parallel.device` -- one GPU per rank (node-local rank), CPU fallback;
* :mod:`~oceanda.parallel.restart` -- restart manifest, per-tile partial sums and markers;
* :mod:`~oceanda.parallel.driver` -- :func:`run_inference`: compute, halo exchange, blend,
  write (bitwise independent of the number of ranks).

Importing this package imports neither mpi4py nor torch; the submodules do as needed.
"""
