"""One typed config per app, validated once at the edge (``oceanda.cli.schema``):
``oceanda config validate APP`` and every app refuse unknown keys (also ``+key=``), wrong
types and bad values with exit status 2 and a message naming the key."""

from __future__ import annotations

import pytest

from oceanda.cli import compose, main
from oceanda.cli.schema import InferConfig, TrainAppConfig, load
from oceanda.errors import ConfigError

TRAIN = ["truth=t.zarr", "obs=o.zarr", "out_dir=o"]


@pytest.mark.parametrize("app,args", [
    ("infer", []), ("infer", ["method=4dvarnet", "patch=anchor"]), ("infer", ["method=spde_oi"]),
    ("infer", ["method=spde_4dvarnet", "method.checkpoint=x.pt"]), ("generate", []),
    ("generate", ["truth=gaussian", "obs=4nadirs_swot", "period=week"]), ("evaluate", ["truth=t", "analysis=a"]),
    ("validate", []), ("validate", ["experiment=pendulum", "preset=quick"]), ("train", TRAIN),
    ("train", [*TRAIN, "model=spde_4dvarnet", "+train.w_nll=0.1"]), ("train", [*TRAIN, "patch=forecast2"]),
])
def test_shipped_configs_validate(app, args, capsys):
    assert main(["config", "validate", app, *args]) == 0, capsys.readouterr().err
    assert "is valid" in capsys.readouterr().out


@pytest.mark.parametrize("app,args,named", [
    ("infer", ["method.noise_std=-1"], "method.noise_std must be > 0"),
    ("infer", ["+batchsize=8"], "unknown key batchsize; known: allow_mode_mismatch, alongtrack, batch_size, box"),
    ("infer", ["tile=big"], "tile: expected a list of 3 values"),
    ("infer", ["+patch.strid=[1,2,3]"], "unknown key patch.strid"),
    ("infer", ["patch.crop=[60,60]"], "patch.crop/taper leave no full-weight"),
    ("infer", ["+method.Lx=3"], "unknown key method.Lx"),
    ("infer", ["method=spde_oi", "method.members=many"], "method.members: expected an integer"),
    ("infer", ["+demo.compare.0.method.bogus=1"], "unknown key demo.compare[0].method.bogus"),
    ("infer", ["system.mpi=maybe"], "system.mpi"),
    ("infer", ["system.device=tpu"], "system.device"),
    ("infer", ["dtype=float16"], "dtype: expected one of"),
    ("infer", ["box=[1,2]"], "box: expected a list of 4 values"),
    ("train", [*TRAIN, "+train.w_nl=0.1"], "unknown key train.w_nl"),
    ("train", [*TRAIN, "model=spde_4dvarnet", "+train.w_nl=0.1"], "unknown key train.w_nl"),
    ("train", [*TRAIN, "+model.hidden=3"], "unknown key model.hidden"),
    ("train", [*TRAIN, "train.epochs=1.5"], "train.epochs: expected an integer"),
    ("train", [*TRAIN, "patch=anchor", "model.n_time=10"], "model.n_time=10 differs from patch.size[0]=15"),
    ("train", [*TRAIN, "+batchsize=8"], "unknown key batchsize"),
    ("train", [*TRAIN, "train.mode=bogus"], "train.mode must be 'supervised' or 'semi'"),
    ("train", [*TRAIN, "train.batch_size=0"], "train.batch_size must be >= 1"),
    ("train", [*TRAIN, "model=spde_4dvarnet", "+train.theta_init=bad"], "train.theta_init must be"),
    ("train", [*TRAIN, "model=spde_4dvarnet", "train.mode=bogus"], "train.mode must be"),
    ("generate", ["+truth.foo=1"], "unknown key truth.foo"),
    ("generate", ["truth=gyre", "+truth.foo=1"], "unknown key truth.foo; known: daily_mean"),
    ("generate", ["+period.middle=2012-10-10"], "unknown key period.middle"),
    ("generate", ["+domain.bogus=1"], "domain.bogus"),
    ("generate", ["chunk_days=0"], "chunk_days must be >= 1"),
    ("evaluate", ["truth=t", "analysis=a", "detrend=quadratic"], "detrend: expected"),
    ("evaluate", ["truth=t", "analysis=a", "+extra=1"], "unknown key extra"),
    ("evaluate", [], "leaves mandatory values unset: analysis"),
    ("evaluate", ["analysis=a"], "give truth=PATH (gridded scores) and / or alongtrack=FILES"),
    ("validate", ["+experiment.foo=1"], "unknown key experiment.foo"),
    ("validate", ["+experiment.training.lrr=1"], "unknown key experiment.training.lrr"),
    ("validate", ["+experiment.data.bogus=1"], "unknown key experiment.data.bogus"),
    ("validate", ["experiment.training.lr=-1"], "training.lr must be > 0"),
    ("validate", ["threads=0"], "threads must be >= 1"),
])
def test_bad_configs_exit_2_naming_the_key(app, args, named, capsys):
    assert main(["config", "validate", app, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("oceanda config: error: ") and named in err, err
    if "unknown key" in named and "." not in named:  # a top-level key: every key of the app is listed
        assert "method" in err or "model" in err or "experiment" in err or app in ("generate", "evaluate"), err


def test_apps_run_the_same_validation(capsys, tmp_path):
    """An app refuses what ``config validate`` refuses, before doing anything."""
    assert main(["infer", "+batchsize=8", f"out_dir={tmp_path / 'x'}"]) == 2
    assert "oceanda infer: error: unknown key batchsize" in capsys.readouterr().err
    assert main(["train", *TRAIN[:2], f"out_dir={tmp_path / 'y'}", "+patch.strid=3"]) == 2
    assert "unknown key patch.strid" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_typed_config_carries_typed_sections():
    from oceanda.assim.fourdvarnet import ModelConfig
    from oceanda.data.patches import PatchGeometry

    cfg = load("infer", compose("infer", ["patch=nrt", "tile=[5,10,10]", "system.mpi=false", "obs=o.zarr"]))
    assert isinstance(cfg, InferConfig) and isinstance(cfg.patch, PatchGeometry)
    assert cfg.patch.taper == 10 and cfg.patch.size == (15, 100, 100) and cfg.tile == (5, 10, 10)
    assert cfg.system.use_mpi is False and cfg.method.name == "oi" and "Lx_km" in cfg.method.options
    (sub,) = load("infer", compose("infer", [])).compare_runs()  # the demo's 4DVarNet run on its own patches
    assert sub.method.name == "4dvarnet" and sub.patch.size == (15, 64, 64) and sub.out_dir is None
    assert sub.patch.anchor == "centre" and "- 64" in sub.source_yaml and "name: 4dvarnet" in sub.source_yaml
    # the demo (obs_path=null) with patch=nrt: its 4DVarNet run on those patches is refused up front
    with pytest.raises(ConfigError, match=r"demo.compare\[0\].patch \(over the run's patch\): .*stride\[0\]"):
        load("infer", compose("infer", ["patch=nrt"]))
    t = load("train", compose("train", [*TRAIN, "patch=forecast2"]))
    assert isinstance(t, TrainAppConfig) and isinstance(t.model, ModelConfig) and t.kind == "4dvarnet"
    assert t.patch.taper == 10 and t.patch.lead == 2 and t.model.n_time == 15
    s = load("train", compose("train", [*TRAIN, "model=spde_4dvarnet", "+train.w_nll=0.3"]))
    assert s.kind == "spde_4dvarnet" and s.train.w_nll == 0.3


def test_train_honours_system_mpi(monkeypatch, tmp_path):
    """``system.mpi`` reaches the communicator of ``oceanda train`` (as of ``oceanda infer``)."""
    import oceanda.parallel.comm as comm_mod
    from oceanda.cli import train as train_app

    seen = []

    def fake_get_comm(use_mpi=None):
        seen.append(use_mpi)
        raise ConfigError("stop here")

    monkeypatch.setattr(comm_mod, "get_comm", fake_get_comm)
    for value, expect in (("false", False), ("true", True), ("auto", None)):
        cfg = load("train", compose("train", [*TRAIN[:2], f"out_dir={tmp_path}", f"system.mpi={value}"]))
        with pytest.raises(ConfigError, match="stop here"):
            train_app.run(cfg)
        assert seen[-1] is expect
