"""Communicator: a thin wrapper over mpi4py, or a serial stand-in.

:func:`get_comm` returns :class:`MPIComm` when the process was started by an MPI launcher
(``mpiexec``/``mpirun``/``srun``) with more than one rank and mpi4py is importable, and
:class:`SerialComm` otherwise (no mpi4py import at all then). Both offer the same small
interface: ``rank``, ``size``, ``barrier``, ``bcast``, ``allgather``, the buffer API
``Isend``/``Irecv`` of contiguous float64 numpy arrays with ``waitall``, small non-blocking
object messages (``isend_obj``/``poll_obj``) for progress reports, and ``local_rank`` (the
rank among the processes of one node, from ``MPI.COMM_TYPE_SHARED``).

Failure: a rank that cannot go on calls :func:`abort_world` (the apps do, from
:func:`oceanda.cli.main`): it tells the other ranks (``failed()``: rank 0 then stops drawing
its progress bar), prints its error line and aborts the job with the exit code (2 for a user
error), so that no rank waits forever in a collective.

This module is the only place (with :mod:`oceanda.parallel.device`) that imports mpi4py.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

#: tag of the message by which a failing rank announces that it is about to abort the job
TAG_FAILED = 31001

#: environment variables set by common launchers (presence = started by a launcher)
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
                  "HYDI_CONTROL_FD", "MPICH_INTERFACE_HOSTNAME")


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process (``srun`` without MPI does not count)."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


class SerialComm:
    """One-rank communicator: every collective is the identity; no messages exist."""

    rank = 0
    size = 1
    is_mpi = False

    def barrier(self, poll_s: float = 0.01) -> None:
        pass

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def Isend(self, buf: np.ndarray, dest: int, tag: int = 0):
        raise RuntimeError("SerialComm has no other rank to send to")

    def Irecv(self, buf: np.ndarray, source: int, tag: int = 0):
        raise RuntimeError("SerialComm has no other rank to receive from")

    def waitall(self, requests: list) -> None:
        if requests:
            raise RuntimeError("SerialComm has no requests")

    def isend_obj(self, obj: Any, dest: int, tag: int):
        raise RuntimeError("SerialComm has no other rank to send to")

    def poll_obj(self, tag: int) -> list[Any]:
        return []

    @property
    def local_rank(self) -> int:
        return 0

    def node_allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def abort(self, code: int = 1, message: str | None = None) -> None:
        if message is not None:
            import sys

            sys.stderr.write(message if message.endswith("\n") else message + "\n")
            sys.stderr.flush()
        os._exit(code)

    def failed(self) -> bool:
        """Whether another rank announced its failure (never, with one rank)."""
        return False


class MPIComm:
    """mpi4py ``COMM_WORLD`` behind the :class:`SerialComm` interface."""

    is_mpi = True

    def __init__(self, comm=None) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._local_rank: int | None = None

    def barrier(self, poll_s: float = 0.01) -> None:
        """Barrier that sleeps between polls (``Ibarrier`` + ``Test``), so that ranks
        waiting for a slow one (or for rank 0 generating the demo data) do not busy-spin
        on the cores it needs."""
        req = self.comm.Ibarrier()
        while not req.Test():
            time.sleep(poll_s)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def Isend(self, buf: np.ndarray, dest: int, tag: int = 0):
        """Non-blocking send of a contiguous float64 array (buffer API, no pickling)."""
        assert buf.dtype == np.float64 and buf.flags.c_contiguous
        return self.comm.Isend([buf, self._MPI.DOUBLE], dest=dest, tag=tag)

    def Irecv(self, buf: np.ndarray, source: int, tag: int = 0):
        """Non-blocking receive into a contiguous float64 array (buffer API)."""
        assert buf.dtype == np.float64 and buf.flags.c_contiguous
        return self.comm.Irecv([buf, self._MPI.DOUBLE], source=source, tag=tag)

    def waitall(self, requests: list) -> None:
        if requests:
            self._MPI.Request.Waitall(requests)

    def isend_obj(self, obj: Any, dest: int, tag: int):
        """Non-blocking send of a small picklable object (progress messages)."""
        return self.comm.isend(obj, dest=dest, tag=tag)

    def poll_obj(self, tag: int) -> list[Any]:
        """Receive every pending object message with ``tag`` (does not block)."""
        out = []
        status = self._MPI.Status()
        while self.comm.Iprobe(source=self._MPI.ANY_SOURCE, tag=tag, status=status):
            out.append(self.comm.recv(source=status.Get_source(), tag=tag))
        return out

    @property
    def local_rank(self) -> int:
        """Rank among the processes sharing this node (``MPI.COMM_TYPE_SHARED`` split)."""
        if self._local_rank is None:
            node = self.comm.Split_type(self._MPI.COMM_TYPE_SHARED, key=self.rank)
            self._local_rank = node.Get_rank()
            node.Free()
        return self._local_rank

    def node_allgather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank of this node (``MPI.COMM_TYPE_SHARED`` split), in their order."""
        node = self.comm.Split_type(self._MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return node.allgather(obj)
        finally:
            node.Free()

    def abort(self, code: int = 1, message: str | None = None) -> None:
        """Stop every rank of the world now, the job exiting with ``code`` where the launcher
        passes it on (MPICH's ``mpiexec`` does).

        The other ranks are told first (:meth:`failed`: rank 0 stops drawing its progress
        bar), then ``message`` (a line) is written to stderr, then the job is aborted. The
        library's own "application called MPI_Abort" line is not shown: ``message`` stays the
        last line a user sees."""
        import sys

        try:
            for r in range(self.size):
                if r != self.rank:
                    self.comm.isend(self.rank, dest=r, tag=TAG_FAILED)
            if message is not None:
                time.sleep(0.1)  # the others see failed() before the line appears
                sys.stderr.write(message if message.endswith("\n") else message + "\n")  # one write
            _quiet_stderr()
            time.sleep(0.3)  # let the launcher forward the line before it tears the job down
        finally:  # whatever happened above (a closed stream...), the job must not hang
            self.comm.Abort(code)


    def failed(self) -> bool:
        """Whether another rank announced its failure (:meth:`abort`): the job is being torn
        down, so this rank should print nothing more (its progress bar)."""
        return bool(self.comm.Iprobe(source=self._MPI.ANY_SOURCE, tag=TAG_FAILED))


#: the multi-rank communicator of this process, once :func:`get_comm` has made one
_WORLD: MPIComm | None = None


def _quiet_stderr() -> None:
    """Flush Python's streams, then point file descriptor 2 at ``/dev/null``."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
    except OSError:
        pass


def world_rank() -> tuple[int, int] | None:
    """``(rank, size)`` of this process when it runs as one rank of several, else None."""
    return None if _WORLD is None else (_WORLD.rank, _WORLD.size)


def abort_world(code: int, message: str | None = None) -> None:
    """If this process runs as one rank of several (:func:`get_comm` returned an
    :class:`MPIComm`), print ``message`` and stop every rank now with exit ``code``
    (:meth:`MPIComm.abort`): a failing rank must not leave the others waiting in a collective
    forever. Does nothing in a serial run (the caller prints and returns its exit status)."""
    if _WORLD is not None:
        _WORLD.abort(code, message)


def get_comm(use_mpi: bool | None = None) -> SerialComm | MPIComm:
    """The communicator of this process.

    Args:
        use_mpi: ``True`` forces mpi4py, ``False`` forces serial, ``None`` (default) uses MPI
            when started by a launcher and mpi4py is importable, and its world has more than
            one rank.
    """
    if use_mpi is False or (use_mpi is None and not launched_by_mpi()):
        return SerialComm()
    try:
        comm = MPIComm()
    except ImportError:
        if use_mpi:
            raise
        return SerialComm()
    if comm.size == 1 and use_mpi is None:
        return SerialComm()
    if comm.size > 1:
        global _WORLD
        _WORLD = comm
    return comm
