"""Process control of the apps (issue 16): a failing rank stops every rank with its message,
unusable output folders and out-of-range values are refused before any work, the error is
the last line (no progress bar drawn after it), files follow the umask, a killed or
terminated ``generate`` leaves no temporaries, every app limits and logs its thread pools.

Apps are run as a user would (:mod:`tests.reliability.harness`) where the process matters
(MPI, signals, progress bars); refusals decided before any work are run in-process through
:func:`oceanda.cli.main` (same code path, no interpreter start-up per case).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr

from oceanda.data import names as N
from tests.reliability.conftest import SMALL
from tests.reliability.harness import Result, assert_refused, refuse, run_app, snapshot

OI = ["method=oi", "method.Lx_km=40", "method.Lt_days=4"]
#: the small 4DVarNet training of tests/unit/test_train.py (one epoch, two batches)
TRAIN = ["model=4dvarnet_small", "model.n_steps=2", "model.prior_hidden=4", "model.lstm_hidden=4",
         "patch.size=[5,8,8]", "patch.stride=[1,6,6]", "patch.crop=[1,1]", "gap_days=2",
         "train.epochs=1", "train.batch_size=2", "train.max_batches=2", "progress=false"]
VALIDATE = ["experiment=lorenz63", "preset=quick", "progress=false"]


def main_refuses(capsys, app: str, args: list[str], *names: str, outputs=()) -> Result:
    """:func:`oceanda.cli.main` in this process, checked like :func:`harness.refuse`."""
    from oceanda.cli import main

    before = {p: snapshot(p) for p in outputs}
    capsys.readouterr()
    code = main([app, *map(str, args)])
    cap = capsys.readouterr()
    res = Result(app, 1, code, cap.out, cap.err, ["oceanda", app, *map(str, args)])
    assert_refused(res, *names, before=before)
    return res


@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "not_a_folder"
    f.write_text("a user's file\n")
    return f


# ----------------------------------------------------------------------------- 1. any rank's failure


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.mpi)])
def test_a_rank_failing_mid_run_stops_every_rank_with_its_message(tmp_path, good_obs, ranks):
    """Rank ``ranks - 1`` raises a user-level error after its first tile while the others
    compute (or wait in a collective): the job ends promptly, exit 2, the failing rank's
    message is the last line (rank 0's progress bar is not drawn after it)."""
    out = tmp_path / "run"
    env = {"OCEANDA_FAIL_AFTER_TILES": "1", "OCEANDA_FAIL_RANK": str(ranks - 1), "OCEANDA_FAIL_AS": "error"}
    small = [a for a in SMALL if a != "progress=false"] + ["progress=true"]
    t0 = time.monotonic()
    res = run_app("infer", f"obs_path={good_obs['obs']}", f"out_dir={out}", *small, *OI,
                  ranks=ranks, env=env, timeout=90)
    assert_refused(res, "simulated failure of rank")
    if ranks > 1:
        assert f"[rank {ranks - 1} of {ranks}: every rank stopped]" in res.stderr, res.describe()
        assert "MPI_Abort" not in res.stderr, res.describe()  # the library's line is not shown
    assert "1 thread of torch, BLAS, OpenMP, numba" in res.stderr, res.describe()  # the threads log line
    assert time.monotonic() - t0 < 90


@pytest.mark.mpi
def test_out_dir_unusable_on_two_ranks_is_refused_not_hung(tmp_path, good_obs, a_file):
    """The hang of the issue: an out_dir rank 0 cannot create, rank 1 waiting in a barrier."""
    res = refuse("infer", [f"obs_path={good_obs['obs']}", f"out_dir={a_file / 'sub'}", *SMALL, *OI],
                 f"out_dir={a_file / 'sub'}", "is not a folder", outputs=[a_file], ranks=2, timeout=90)
    assert "every rank stopped" in res.stderr


# ----------------------------------------------------------------------------- 2. out_dir before any work


def _app_args(app: str, good_obs, out) -> list[str]:
    return {
        "infer": [f"obs_path={good_obs['obs']}", f"out_dir={out}", *SMALL, *OI],
        "train": [f"obs_path={good_obs['obs']}", f"truth_path={good_obs['truth']}", f"out_dir={out}", *TRAIN],
        "validate": [*VALIDATE, f"out_dir={out}"],
        "generate": ["domain=box", "domain.lon_min=-40", "domain.lon_max=-39", "domain.lat_min=30",
                     "domain.lat_max=31", "domain.resolution=0.1", "period.start=2013-01-01",
                     "period.end=2013-01-05", "truth=gaussian", "figures=false", "progress=false", f"out_dir={out}"],
        "evaluate": [f"truth={good_obs['truth']}", f"analysis={good_obs['truth']}", f"out_dir={out}"],
    }[app]


APPS = ["infer", "train", "validate", "generate", "evaluate"]


@pytest.mark.parametrize("app", APPS)
def test_out_dir_that_is_a_file_is_refused_before_any_work(capsys, tmp_path, good_obs, a_file, app):
    main_refuses(capsys, app, _app_args(app, good_obs, a_file), f"out_dir={a_file}",
                 "exists and is not a folder", outputs=[a_file])
    sub = a_file / "sub"
    main_refuses(capsys, app, _app_args(app, good_obs, sub), f"out_dir={sub}", "is not a folder",
                 outputs=[a_file])


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (a folder nobody may write)")
@pytest.mark.parametrize("app", ["infer", "train", "validate"])
def test_out_dir_that_cannot_be_written_is_refused(capsys, good_obs, app):
    out = "/proc/oceanda_reliability"
    main_refuses(capsys, app, _app_args(app, good_obs, out), f"out_dir={out}", "cannot be created in /proc")


# ----------------------------------------------------------------------------- 3. values and inputs


@pytest.mark.parametrize("app, args, names", [
    ("infer", ["batch_size=-4"], ["batch_size", "-4"]),
    ("infer", ["batch_size=0"], ["batch_size", "0"]),
    ("train", ["train.epochs=-1"], ["train.epochs", "-1"]),
    ("train", ["train.max_batches=-1"], ["train.max_batches", "-1"]),
    ("train", ["train.grad_clip=-1"], ["train.grad_clip", "-1"]),
    ("evaluate", ["alongtrack_options.segment_km=-5"], ["alongtrack_options.segment_km", "-5"]),
    ("validate", ["experiment.data.obs_noise=-1"], ["experiment.data.obs_noise", "-1"]),
    ("validate", ["experiment.data.dt=0"], ["experiment.data.dt"]),
    ("validate", ["experiment.var4d.max_iter=-1"], ["experiment.var4d.max_iter", "-1"]),
    ("validate", ["experiment.var4d.lm_init=0"], ["experiment.var4d.lm_init"]),
])
def test_out_of_range_values_are_refused_by_the_schema(capsys, tmp_path, good_obs, app, args, names):
    out = tmp_path / "run"
    main_refuses(capsys, app, _app_args(app, good_obs, out) + args, *names, outputs=[out])
    # `oceanda config validate` runs the same schema
    res = main_refuses(capsys, "config", ["validate", app, *_app_args(app, good_obs, out), *args], *names)
    assert res.returncode == 2


def test_spde_training_epochs_out_of_range_is_refused(capsys, tmp_path, good_obs):
    out = tmp_path / "run"
    args = [f"obs_path={good_obs['obs']}", f"truth_path={good_obs['truth']}", f"out_dir={out}", "model=spde_4dvarnet",
            "patch.size=[5,16,16]", "train.epochs=-1"]
    main_refuses(capsys, "train", args, "train.epochs", "-1", outputs=[out])


def test_train_resume_without_checkpoint_is_refused(capsys, tmp_path, good_obs):
    out = tmp_path / "run"
    main_refuses(capsys, "train", _app_args("train", good_obs, out) + ["resume=true"], "resume=true",
                 f"out_dir={out}", "checkpoint.pt", outputs=[out])
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    main_refuses(capsys, "train", _app_args("train", good_obs, out) + ["resume=true"], f"out_dir={out}",
                 outputs=[out])


def test_train_on_all_nan_observations_is_refused(capsys, tmp_path, good_obs):
    obs = xr.open_zarr(good_obs["obs"]).load()
    obs[N.SSH_OBS][:] = np.nan
    path = tmp_path / "nan_obs.zarr"
    obs.to_zarr(path)
    out = tmp_path / "run"
    main_refuses(capsys, "train", [f"obs_path={path}", f"truth_path={good_obs['truth']}", f"out_dir={out}", *TRAIN],
                 str(path), N.SSH_OBS, "all NaN", outputs=[out])


@pytest.mark.mpi
def test_train_on_two_ranks_refuses_and_stops_every_rank(tmp_path, good_obs):
    """train under MPI (torch.distributed over gloo): a refusal on the ranks ends the job, exit 2."""
    obs = xr.open_zarr(good_obs["obs"]).load()
    obs[N.SSH_OBS][:] = np.nan
    path = tmp_path / "nan_obs.zarr"
    obs.to_zarr(path)
    out = tmp_path / "run"
    res = refuse("train", [f"obs_path={path}", f"truth_path={good_obs['truth']}", f"out_dir={out}", *TRAIN],
                 str(path), N.SSH_OBS, outputs=[out], ranks=2, timeout=120)
    assert "of 2: every rank stopped]" in res.stderr


@pytest.mark.parametrize("content", [b"not a checkpoint at all\n", "truncated"])
def test_validate_refuses_a_corrupt_checkpoint_before_any_work(capsys, tmp_path, content):
    ck = tmp_path / "model.pt"
    if content == "truncated":  # the first bytes of a real torch file
        import torch

        torch.save({"version": 1, "x": torch.zeros(1000)}, ck)
        ck.write_bytes(ck.read_bytes()[:300])
    else:
        ck.write_bytes(content)
    out = tmp_path / "run"
    res = main_refuses(capsys, "validate", [*VALIDATE, f"checkpoint={ck}", f"out_dir={out}"], str(ck),
                       "cannot be read (corrupted or not a torch file", outputs=[out, ck])
    assert "issue" not in res.stderr and "weights_only" not in res.stderr, res.stderr


# ----------------------------------------------------------------------------- 4. the umask


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_follow_the_umask(capsys, tmp_path, good_obs, mask):
    """Every file and folder infer + evaluate create (analysis store, summary.json,
    scores.json, figures, restart files, logs) has the mode open() / mkdir() would give it."""
    from oceanda.cli import main

    out = tmp_path / "run"
    old = os.umask(mask)
    try:
        code = main(["infer", f"obs_path={good_obs['obs']}", f"truth_path={good_obs['truth']}", f"out_dir={out}",
                     *SMALL, *OI])
    finally:
        os.umask(old)
    assert code == 0, capsys.readouterr().err
    made = [out, *out.rglob("*")]
    names = {p.name for p in made}
    assert {"summary.json", "scores.json", "error_maps.png", "analysis.zarr", "manifest.json"} <= names
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in made
             if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~mask}
    assert not wrong, f"umask {oct(mask)}: {wrong}"


# ----------------------------------------------------------------------------- 5. threads


def test_evaluate_logs_its_thread_limits(capsys, tmp_path, good_obs):
    from oceanda.cli import main

    assert main(["evaluate", *_app_args("evaluate", good_obs, tmp_path / "ev"), "figures=false"]) == 0
    err = capsys.readouterr().err
    assert "oceanda.parallel INFO: rank 0:" in err and "BLAS" in err, err


# ----------------------------------------------------------------------------- 6. generate's temporaries


@pytest.mark.slow
def test_generate_cleans_stale_temporaries_and_its_own_on_sigterm(tmp_path, good_obs):
    """A ``*.tmp-PID`` of a dead process is removed by the next run into the folder; that
    run, terminated (SIGTERM) while writing, removes its own temporaries and exits 143
    with its message last."""
    out = tmp_path / "osse"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f"obs.zarr.tmp-{dead.pid}"
    stale.mkdir(parents=True)
    (stale / "zarr.json").write_text("{}")
    args = _app_args("generate", good_obs, out)
    args = [a for a in args if not a.startswith("period.end")] + ["period.end=2013-03-01", "chunk_days=5"]
    proc = subprocess.Popen([sys.executable, "-m", "oceanda", "generate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    own = out / f"truth.zarr.tmp-{proc.pid}"
    deadline = time.monotonic() + 120
    while not own.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert own.exists(), "generate never started writing"
    assert not stale.exists(), "the stale temporary of a dead process was not removed"
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("generate did not stop on SIGTERM")
    assert proc.returncode == 143, err[-2000:]
    assert "terminated" in [ln for ln in err.splitlines() if ln.strip()][-1], err[-2000:]
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [], sorted(p.name for p in out.iterdir())
