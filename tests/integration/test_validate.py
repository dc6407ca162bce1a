"""`oceanda validate`: end-to-end runs on tiny settings, report contract, checkpoint reload,
user errors; the quick preset (slow) beats the first guess on held-out processes."""

from __future__ import annotations

import json

import pytest

from oceanda.cli import main

METHODS = ("z0", "var4d", "cold_diffusion", "neural", "neural_var4d")
EXTRA = ("particle_smoother", "var4d_from_truth", "cold_diffusion_var4d", "var4d_strong", "neural_var4d_strong",
         "cold_diffusion_var4d_strong")
TINY_L63 = [
    "experiment=lorenz63", "experiment.data.n_train=8", "experiment.data.n_test=3",
    "experiment.data.spinup_steps=100", "experiment.training.epochs=1", "experiment.var4d.max_iter=4",
    "experiment.n_levels=2", "experiment.n_plot=1", "progress=false", "threads=1",
    "experiment.particle_smoother.n_particles=500", "experiment.var4d.background_components=2",
]
TINY_PEND = [
    "experiment=pendulum", "experiment.data.n_train=8", "experiment.data.n_test=3",
    "experiment.training.epochs=1", "experiment.var4d.max_iter=4", "experiment.z0_inflation=[1.0,100.0]",
    "experiment.n_plot=1", "progress=false", "threads=1", "experiment.particle_smoother.n_particles=500",
]


def _check_report(out, n_particles=500):
    rep = json.loads((out / "report.json").read_text())
    for m in METHODS:
        keys = {"rmse", "rmse_raw", "time_per_window_ms"} | ({"gn_iters_median"} if "var4d" in m else set())
        assert keys <= set(rep[m]), (m, rep[m])
        assert rep[m]["rmse"] >= 0 and rep[m]["time_per_window_ms"] > 0
    assert 1 <= rep["var4d"]["gn_iters_median"] <= 4
    for m in EXTRA:  # references and 4D-Var variants, same format
        assert {"rmse", "rmse_raw", "time_per_window_ms"} <= set(rep[m]), (m, rep[m])
        assert ("gn_iters_median" in rep[m]) == ("var4d" in m)
    ps = rep["particle_smoother"]
    assert ps["n_particles"] == n_particles and 1 <= ps["ess_min_min"] <= ps["ess_min_median"] <= n_particles
    assert 0 <= rep["meta"]["minima"]["var4d_worse_fraction"] <= 1
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
    meta = rep["meta"]
    if meta["experiment"] == "lorenz63":  # processes=all: every phase, plus the model trained without 3 of them
        assert meta["process_family"] == "all" and meta["n_test_windows"] == 3 * 8
        hp = meta["heldout_processes"]
        assert hp["heldout"]["n_windows"] == 3 * 3 and hp["seen"]["n_windows"] == 3 * 5 and len(hp["processes"]) == 3
        assert hp["seen"]["neural"] != hp["seen"]["neural_without"]  # two different networks
        hp2 = rep2["meta"]["heldout_processes"]  # the diagnostic network is in the checkpoint too
        assert hp2["heldout"]["neural_without"] == pytest.approx(hp["heldout"]["neural_without"], rel=1e-6)
        pd = meta["polish_damping"]  # polishes with their own damping, and rerun with 4D-Var's
        assert pd["polish_lm_init"] < pd["lm_init"]
        assert set(pd["with_lm_init"]) == {"neural_var4d", "neural_var4d_strong"}
        assert "never seen in training" in (out / "report.md").read_text()
        ms = meta["multistart"]  # the neural start, 8 draws, and the minima of 4D-Var from z0 and of the
        assert ms["baselines"] and ms["n_starts"] == 1 + 8 + 2  # cold-diffusion polish (polish_baselines)
    else:
        assert meta["process_family"] == "heldout" and "heldout_processes" not in meta


def test_validate_dt_scan_writes_table_and_figure(tmp_path, capsys):
    out = tmp_path / "scan"
    assert main(["validate", *TINY_L63, "experiment.var4d.strong_factor=null", f"out_dir={out}",
                 "dt=[0.025,0.05]"]) == 0
    scan = json.loads((out / "scan.json").read_text())
    assert scan["dt"] == [0.025, 0.05]
    for dt in ("0.025", "0.05"):
        rep = json.loads((out / f"dt{dt}" / "report.json").read_text())
        assert rep["meta"]["settings"]["data"]["dt"] == float(dt)
        assert "var4d_strong" not in rep  # strong_factor=null skips the variant
    assert scan["rmse"]["var4d"][1] == json.loads((out / "dt0.05" / "report.json").read_text())["var4d"]["rmse"]
    assert (out / "scan.png").stat().st_size > 0 and "| dt = 0.05 |" in (out / "scan.md").read_text()
    # a single dt runs one experiment at that step
    one = tmp_path / "one"
    assert main(["validate", *TINY_L63, "experiment.var4d.strong_factor=null", "experiment.particle_smoother.n_particles=0",
                 f"out_dir={one}", "dt=0.05"]) == 0
    rep = json.loads((one / "report.json").read_text())
    assert rep["meta"]["settings"]["data"]["dt"] == 0.05 and "particle_smoother" not in rep


def test_validate_width_chosen_by_held_out_validation(tmp_path):
    out = tmp_path / "sel"
    assert main(["validate", *TINY_L63, "experiment.var4d.strong_factor=null", "experiment.particle_smoother.n_particles=0",
                 "experiment.data.n_train=20", "experiment.model.width=[4,12]", f"out_dir={out}"]) == 0
    sel = json.loads((out / "report.json").read_text())["meta"]["capacity_selection"]
    assert sel["widths"] == [4, 12] and sel["n_val_trajectories"] == 2 and len(sel["val_rmse"]) == 2
    assert sel["chosen"] == sel["widths"][min(range(2), key=sel["val_rmse"].__getitem__)]
    import torch

    ck = torch.load(out / "model.pt", weights_only=True)
    assert ck["model"]["width"] == sel["chosen"]  # the networks trained have the chosen width
    assert ck["state_dicts"]["neural"]["mean_net.0.weight"].shape[0] == sel["chosen"]
    assert "Width chosen by held-out validation" in (out / "report.md").read_text()


def test_validate_user_errors(tmp_path, capsys):
    assert main(["validate", *TINY_L63, f"out_dir={tmp_path}", "checkpoint=/nonexistent/model.pt"]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert main(["validate", *TINY_L63, f"out_dir={tmp_path}", "experiment.update=sideways"]) == 2
    assert "experiment.update" in capsys.readouterr().err
    assert main(["validate", *TINY_L63, f"out_dir={tmp_path}", "+experiment.training.momentum=0.9"]) == 2
    assert "momentum" in capsys.readouterr().err
    assert main(["validate", *TINY_L63, f"out_dir={tmp_path}", "experiment.data.obs_every=40"]) == 2
    assert "obs_every" in capsys.readouterr().err
    assert main(["validate", *TINY_L63, f"out_dir={tmp_path}", "dt=[0.05,-1]"]) == 2
    assert "dt" in capsys.readouterr().err
    assert main(["validate", *TINY_L63, f"out_dir={tmp_path}", "experiment.particle_smoother.n_particles=-1"]) == 2
    assert "n_particles" in capsys.readouterr().err
    assert main(["validate", *TINY_L63, f"out_dir={tmp_path}", "experiment.model.width=[]"]) == 2
    assert "experiment.model.width" in capsys.readouterr().err
    # a mixture background needs enough training states (16 components x 4 parameters' worth), and L63
    assert main(["validate", *TINY_L63, f"out_dir={tmp_path}", "experiment.var4d.background_components=16"]) == 2
    assert "experiment.var4d.background_components=16" in capsys.readouterr().err
    assert main(["validate", *TINY_PEND, f"out_dir={tmp_path}", "experiment.var4d.background_components=2"]) == 2
    assert "background_components" in capsys.readouterr().err
    # a checkpoint of another system is refused with a message naming it
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["validate", *TINY_L63, f"out_dir={tmp_path}", f"checkpoint={bad}"]) == 2
    assert "bad.pt" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_preset_lorenz63_beats_first_guess(tmp_path):
    out = tmp_path / "quick"
    assert main(["validate", "experiment=lorenz63", "preset=quick", f"out_dir={out}", "progress=false"]) == 0
    rep = _check_report(out, n_particles=20000)
    assert rep["neural"]["rmse"] < 0.8 * rep["z0"]["rmse"]
    assert rep["neural_var4d"]["rmse"] <= rep["neural"]["rmse"]
    printed = rep["meta"]["update_rmse"]["printed"]  # None: diverged (non-finite / non-SPD)
    assert printed is None or rep["meta"]["update_rmse"]["cold"] <= printed  # equal for l = 0
    _check_expected(rep)


def _check_expected(rep):
    """The numbers kept as data in configs/experiment/*.yaml (`expected.quick`) are met."""
    rows = rep["expected_check"]
    assert {"z0", "var4d", "neural", "particle_smoother"} <= {r["method"] for r in rows}, rows
    bad = [r for r in rows if not r["within"]]
    assert not bad, bad


@pytest.mark.slow
def test_quick_preset_pendulum_beats_first_guess(tmp_path):
    out = tmp_path / "quick"
    assert main(["validate", "experiment=pendulum", "preset=quick", f"out_dir={out}", "progress=false"]) == 0
    rep = _check_report(out, n_particles=20000)
    assert rep["neural"]["rmse"] < 0.5 * rep["z0"]["rmse"]
    _check_expected(rep)


def test_expected_check_compares_with_tolerance_and_setting():
    from oceanda.validation.report import expected_check

    metrics = {"var4d": {"rmse": 0.104}, "neural": {"rmse": 0.20}}
    settings = {"data": {"dt": 0.025, "n_train": 256},
                "expected": {"quick": {"data": {"dt": 0.025}, "rmse": {"var4d": 0.100, "neural": 0.150, "z0": 0.6},
                                       "rel_tol": {"default": 0.05, "neural": 0.2}}}}
    rows = {r["method"]: r for r in expected_check(metrics, settings, "quick")}
    assert set(rows) == {"var4d", "neural"}  # z0 was not run
    assert rows["var4d"]["within"] and rows["var4d"]["rel_tol"] == 0.05
    assert not rows["neural"]["within"]  # 0.20 vs 0.15 +- 20 %
    assert expected_check(metrics, settings, "default") == []
    settings["data"]["dt"] = 0.05  # another setting than the one measured: no comparison
    assert expected_check(metrics, settings, "quick") == []
