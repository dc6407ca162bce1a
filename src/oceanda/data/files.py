"""Files and folders oceanda writes: atomic writes that honour the umask, output folders
checked before any work, stale temporaries of killed runs cleaned.

* :func:`atomic_path`: the one "write to a temporary sibling, then rename" of the package. The
  temporary is created by ``mkstemp`` / ``mkdtemp`` (private, 0600 / 0700) and given the mode
  an ordinary ``open`` / ``mkdir`` would have given it (``0666`` / ``0777`` less the umask)
  before it is renamed into place, so that scores, figures and checkpoints are as readable as
  the zarr stores beside them. An error (or an interrupt) inside the block removes the
  temporary and leaves ``path`` as it was.
* :func:`check_out_dir`: an output folder that is a file, or cannot be created or written,
  is refused (:class:`~oceanda.errors.InputError` naming the key and the path) before any
  work, without creating anything; :func:`made_dirs` removes the folders a failed run created.
* :func:`clean_stale`: removes ``NAME.tmp-PID`` leftovers of processes of this host that no
  longer run (a killed ``generate``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from oceanda.errors import InputError


def umask() -> int:
    """The process umask (read from ``/proc/self/status`` where possible; else set and restored)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (a file, or a folder with ``directory=True``) to
    write; when the block ends normally it is renamed onto ``path`` (an existing file is
    replaced; an existing folder is moved aside first and deleted after the rename).

    Args:
        path: the final name; its parent folder is created if missing.
        directory: the temporary is an (empty) folder, for stores written in one go.
        fsync: flush the file's data to disk before the rename (files only).

    The final file / folder gets mode ``0666`` / ``0777`` less the umask (:func:`umask`), as if
    it had been created directly. An exception in the block removes the temporary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, mask = f".{path.name}.", umask()
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~mask)
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~mask)
    old: Path | None = None
    try:
        yield tmp
        if fsync and not directory:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if directory and path.exists():
            old = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=path.parent))
            old.rmdir()
            os.rename(path, old)
        os.replace(tmp, path)
    except BaseException as exc:
        if directory:
            remove_trees([tmp], settle=isinstance(exc, KeyboardInterrupt))
        else:
            tmp.unlink(missing_ok=True)
        if old is not None and old.exists() and not path.exists():
            os.rename(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_trees(paths, settle: bool = False) -> None:
    """Remove the folders ``paths``; with ``settle`` (after an interrupt: SIGINT, SIGTERM),
    remove them again over the next half second, since a library's writer thread (zarr's
    asynchronous I/O) may still finish a write that was under way when the main thread was
    interrupted and re-create them."""
    import time

    for attempt in range(6 if settle else 1):
        if attempt:
            time.sleep(0.1)
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _writable(folder: Path) -> str | None:
    """None if a file can be created in the existing folder ``folder``, else the reason."""
    try:
        fd, name = tempfile.mkstemp(prefix=".oceanda-probe-", dir=folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(name)
    return None


def check_out_dir(path: str | os.PathLike, key: str = "out_dir") -> Path:
    """Refuse an output folder that cannot be used, before any work and without creating it.

    ``path`` must be a writable folder, or not exist under a writable folder (its nearest
    existing ancestor; it is created later, by the run, once its inputs are accepted).

    Raises:
        InputError: ``key=path`` is a file, lies under a file, or cannot be written (read-only
            folder or file system), with the reason.
    """
    path = Path(path).expanduser()
    where = f"{key}={path}"
    if path.exists() and not path.is_dir():
        raise InputError(f"{where}: exists and is not a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{where}: cannot be created, {probe} is not a folder")
    reason = _writable(probe)
    if reason is not None:
        what = "is not writable" if probe == path else f"cannot be created in {probe}"
        raise InputError(f"{where}: {what} ({reason})")
    return path


@contextlib.contextmanager
def made_dirs(path: str | os.PathLike) -> Iterator[Path]:
    """On an exception in the block, remove the folders of ``path`` (it and its missing
    parents) that did not exist when the block began and are empty at its end: a failed run
    leaves no empty out_dir behind."""
    path = Path(path).expanduser()
    missing = []
    probe = path
    while not probe.exists() and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    try:
        yield path
    except BaseException:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (or gone): keep it and its parents
        raise


_TMP_PID = re.compile(r"\.tmp-(\d+)$")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's process
    return True


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the ``*.tmp-PID`` files / folders in ``folder`` whose process no longer runs on
    this host (left by a killed run); the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        m = _TMP_PID.search(p.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
