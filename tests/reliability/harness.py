"""Run an oceanda app as a user would (``python -m oceanda APP ...``, or under ``mpiexec -n K``)
and check how it refuses a bad input.

A refusal is right when (:func:`assert_refused`):

* the process ends within its timeout (a hang is a failure, the process group is killed);
* it exits 2 (a user error, not a traceback's 1 or a crash);
* stderr says ``oceanda APP: error:`` and names every piece of the input given (a key, a path,
  a variable), and that error is the last line a user sees;
* nothing partial is left behind: the output folder is byte-for-byte what it was before
  (compared with :func:`snapshot`), or absent if it was absent.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
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


def run_app(app: str, *args: str, ranks: int = 1, timeout: float = 120.0,
            env: dict | None = None, cwd: Path | None = None) -> Result:
    """``python -m oceanda APP ARGS`` (``mpiexec -n RANKS`` in front when ``ranks > 1``).

    Fails the test if it has not ended after ``timeout`` seconds (the whole process group is
    killed first, MPI ranks included)."""
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
           ranks: int = 1, timeout: float = 120.0, env: dict | None = None) -> Result:
    """Run ``app`` on a bad input and :func:`assert_refused` it, watching ``outputs``."""
    before = {Path(p): snapshot(p) for p in outputs}
    res = run_app(app, *args, ranks=ranks, timeout=timeout, env=env)
    assert_refused(res, *names, before=before)
    return res
