"""`oceanda validate`: end-to-end runs on tiny settings, report contract, checkpoint reload,
user errors; the quick preset (slow) beats the first guess on held-out processes."""

from __future__ import annotations

import json

import pytest

from oceanda.cli import main

METHODS = ("z0", "var4d", "cold_diffusion", "neural", "neural_var4d")
TINY_L63 = [
    "experiment=lorenz63", "experiment.data.n_train=8", "experiment.data.n_test=3",
    "experiment.data.spinup_steps=100", "experiment.training.epochs=1", "experiment.var4d.max_iter=4",
    "experiment.n_levels=2", "experiment.n_plot=1", "progress=false", "threads=1",
]
TINY_PEND = [
    "experiment=pendulum", "experiment.data.n_train=8", "experiment.data.n_test=3",
    "experiment.training.epochs=1", "experiment.var4d.max_iter=4", "experiment.z0_inflation=[1.0,100.0]",
    "experiment.n_plot=1", "progress=false", "threads=1",
]


def _check_report(out):
    rep = json.loads((out / "report.json").read_text())
    for m in METHODS:
        keys = {"rmse", "rmse_raw", "time_per_window_ms"} | ({"gn_iters_median"} if "var4d" in m else set())
        assert keys <= set(rep[m]), (m, rep[m])
        assert rep[m]["rmse"] >= 0 and rep[m]["time_per_window_ms"] > 0
    assert 1 <= rep["var4d"]["gn_iters_median"] <= 4
    md = (out / "report.md").read_text()
    assert "| Neural + 4D-Var polish |" in md.splitlines()[6] or "Neural + 4D-Var polish" in md
    for f in ("reconstructions.png", "var4d_inits.png", "training.png", "model.pt"):
        assert (out / f).stat().st_size > 0, f
    assert not list(out.glob("*.tmp*"))
    return rep


@pytest.mark.parametrize("tiny", [TINY_L63, TINY_PEND], ids=["lorenz63", "pendulum"])
def test_validate_tiny_end_to_end_and_checkpoint_reload(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    assert main(["validate", *tiny, f"out_dir={out}"]) == 0
    rep = _check_report(out)
    assert "Neural assimilation" in capsys.readouterr().out
    # reloading the checkpoint skips training and reproduces the neural numbers
    out2 = tmp_path / "reload"
    assert main(["validate", *tiny, f"out_dir={out2}", f"checkpoint={out / 'model.pt'}"]) == 0
    rep2 = json.loads((out2 / "report.json").read_text())
    for m in ("z0", "neural", "cold_diffusion"):
        assert rep2[m]["rmse"] == pytest.approx(rep[m]["rmse"], rel=1e-6, abs=1e-9)


def test_validate_user_errors(tmp_path, capsys):
    assert main(["validate", *TINY_L63, f"out_dir={tmp_path}", "checkpoint=/nonexistent/model.pt"]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert main(["validate", *TINY_L63, f"out_dir={tmp_path}", "experiment.update=sideways"]) == 2
    assert "experiment.update" in capsys.readouterr().err
    assert main(["validate", *TINY_L63, f"out_dir={tmp_path}", "+experiment.training.momentum=0.9"]) == 2
    assert "momentum" in capsys.readouterr().err
    assert main(["validate", *TINY_L63, f"out_dir={tmp_path}", "experiment.data.obs_every=40"]) == 2
    assert "obs_every" in capsys.readouterr().err
    # a checkpoint of another system is refused with a message naming it
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["validate", *TINY_L63, f"out_dir={tmp_path}", f"checkpoint={bad}"]) == 2
    assert "bad.pt" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_preset_lorenz63_beats_first_guess(tmp_path):
    out = tmp_path / "quick"
    assert main(["validate", "experiment=lorenz63", "preset=quick", f"out_dir={out}", "progress=false"]) == 0
    rep = _check_report(out)
    assert rep["neural"]["rmse"] < 0.8 * rep["z0"]["rmse"]
    assert rep["neural_var4d"]["rmse"] <= rep["neural"]["rmse"]
    printed = rep["meta"]["update_rmse"]["printed"]  # None: diverged (non-finite / non-SPD)
    assert printed is None or rep["meta"]["update_rmse"]["cold"] < printed


@pytest.mark.slow
def test_quick_preset_pendulum_beats_first_guess(tmp_path):
    out = tmp_path / "quick"
    assert main(["validate", "experiment=pendulum", "preset=quick", f"out_dir={out}", "progress=false"]) == 0
    rep = _check_report(out)
    assert rep["neural"]["rmse"] < 0.5 * rep["z0"]["rmse"]
