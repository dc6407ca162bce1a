"""Run an oceanda app as a user would (``python -m oceanda APP ...``, or under ``mpiexec -n K``)
and check how it refuses a bad input.

A refusal is right when (:func:`assert_refused`):

* the process ends within its timeout (a hang is a failure, the process group is killed);
* it exits 2 (a user error, not a traceback's 1 or a crash);
* stderr says ``oceanda APP: error:`` and names every piece of the input given (a key, a path,
  a variable), and that error is the last line a user sees;
* nothing partial is left behind: the output folder is byte-for-byte what it was before
  (compared with :func:`snapshot`), or absent if it was absent.

One process a run costs ~4 s of imports (torch, xarray, hydra). The catalogue runs many
refusals, so :func:`run_app` can also run a 1-rank app ``forked=True``: in a child forked from
a fork server (:mod:`multiprocessing`'s ``forkserver``, a fresh process that has imported
oceanda's heavy modules and computes nothing, so forking it is safe). The child is a process of
its own as a user's would be: its own stdout/stderr (file descriptors 1 and 2), its exit status
from ``oceanda.cli.main`` (an uncaught exception prints its traceback and exits 1, as
``python -m oceanda`` does), atexit handlers run, killed after its timeout. What it does not run
is the interpreter's shutdown (objects finalised at exit, e.g. asyncio's "Task was destroyed
but it is pending!"): the runs in a new interpreter (2 ranks, the harness's own tests) see it.
"""

from __future__ import annotations

import atexit
import hashlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

HAS_MPI = shutil.which("mpiexec") is not None


@dataclass
class Result:
    app: str
    ranks: int
    returncode: int
    stdout: str
    stderr: str
    cmd: list[str]

    def describe(self) -> str:
        return (f"$ {' '.join(self.cmd)}\nexit {self.returncode}\n--- stdout (tail)\n"
                f"{self.stdout[-2000:]}\n--- stderr (tail)\n{self.stderr[-3000:]}")


#: what the fork server imports once: the apps' modules, hydra warmed up (``_preload.py``)
PRELOAD = ["tests.reliability._preload"]
_CTX: multiprocessing.context.BaseContext | None = None


def _fork_context() -> multiprocessing.context.BaseContext:
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
        atexit.register(_stop_fork_server)
    return _CTX


def _stop_fork_server() -> None:
    """Stop and reap the fork server at exit (it would end by itself when this process does,
    but unreaped: its runs' CPU time would be missing from this process's children's time)."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # private; absent: leave it to end by itself
    if stop is not None:
        stop()


def _forked_main(argv: list[str], env: dict, cwd: str | None, out_path: str, err_path: str) -> None:
    """Body of a forked app run: ``oceanda.cli.main(argv)`` as ``python -m oceanda`` runs it."""
    os.setpgid(0, 0)  # its own process group, killed as a whole on a timeout
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's own streams
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    sys.argv = [str(Path(sys.executable)), *argv]
    try:
        from oceanda.cli import main

        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code or 0))


def _run_forked(app: str, args: list[str], timeout: float, env: dict, cwd: Path | None) -> Result:
    argv = [app, *args]
    cmd = ["(forked)", "python", "-m", "oceanda", *argv]
    with tempfile.TemporaryDirectory(prefix="oceanda-forked-") as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _fork_context().Process(target=_forked_main,
                                       args=(argv, env, None if cwd is None else str(cwd), out_path, err_path))
        proc.start()
        proc.join(timeout)
        hung = proc.is_alive()
        if hung:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.join(10)
        out, err = (Path(p).read_text(errors="replace") if os.path.exists(p) else ""
                    for p in (out_path, err_path))
    if hung:
        pytest.fail(f"hung: no exit after {timeout:.0f} s\n$ {' '.join(cmd)}\n--- stderr (tail)\n{err[-3000:]}")
    rc = proc.exitcode
    return Result(app, 1, rc if rc is not None and rc >= 0 else 128 - (rc or 0), out, err, cmd)


def run_app(app: str, *args: str, ranks: int = 1, timeout: float = 120.0,
            env: dict | None = None, cwd: Path | None = None, forked: bool = False) -> Result:
    """``python -m oceanda APP ARGS`` (``mpiexec -n RANKS`` in front when ``ranks > 1``).

    Fails the test if it has not ended after ``timeout`` seconds (the whole process group is
    killed first, MPI ranks included). ``forked=True`` (1 rank only): run it in a child of the
    fork server (module docstring) instead of a new interpreter: the same run, seconds cheaper."""
    if forked and ranks == 1:
        env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        return _run_forked(app, list(map(str, args)), timeout, env, cwd)
    cmd = [sys.executable, "-m", "oceanda", app, *map(str, args)]
    if ranks > 1:
        if not HAS_MPI:
            pytest.skip("needs mpiexec")
        cmd = ["mpiexec", "-n", str(ranks), *cmd]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"hung: no exit after {timeout:.0f} s\n$ {' '.join(cmd)}\n"
                    f"--- stderr (tail)\n{err[-3000:]}")
    return Result(app, ranks, proc.returncode, out, err, cmd)


def snapshot(path: Path) -> dict[str, str] | None:
    """Every file under ``path`` (relative name -> sha256 of its bytes); ``None`` if absent."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def last_line(text: str) -> str:
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def assert_refused(res: Result, *names: str, before: dict[str, Path] | None = None,
                   after_snap: dict[str, dict | None] | None = None) -> None:
    """Assert a clean refusal (module docstring). ``before`` maps each output path to the
    :func:`snapshot` taken before the run (``snapshot`` of a path that did not exist is None)."""
    msg = res.describe()
    assert res.returncode == 2, f"expected exit 2\n{msg}"
    marker = f"oceanda {res.app}: error:"
    assert marker in res.stderr, f"no '{marker}' line\n{msg}"
    assert "Traceback" not in res.stderr, f"a traceback was printed\n{msg}"
    for name in names:
        assert str(name) in res.stderr, f"the error does not name {name!r}\n{msg}"
    # Under MPI each rank may print the error; the last line seen is still an error line.
    assert "error:" in last_line(res.stderr), f"the last line is not the error\n{msg}"
    for path, snap in (before or {}).items():
        now = snapshot(path)
        assert now == snap, (f"{path} changed by a refused run:\nbefore {sorted(snap or {})}\n"
                             f"after  {sorted(now or {})}\n{msg}")


def refuse(app: str, args: list[str], *names: str, outputs: list[Path] = (),
           ranks: int = 1, timeout: float = 120.0, env: dict | None = None, forked: bool = False) -> Result:
    """Run ``app`` on a bad input and :func:`assert_refused` it, watching ``outputs``."""
    before = {Path(p): snapshot(p) for p in outputs}
    res = run_app(app, *args, ranks=ranks, timeout=timeout, env=env, forked=forked)
    assert_refused(res, *names, before=before)
    return res
