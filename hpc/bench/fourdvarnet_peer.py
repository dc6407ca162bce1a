"""oceanda's 4DVarNet vs the reference implementation (ocean4dvarnet, the 4dvarnet-starter) at an
equal training budget on the same data, both scored by ``oceanda evaluate``'s metrics.

Both models get the same architecture size (bilinear auto-encoder prior, hidden ``--prior-hidden``,
average-pool 2; ConvLSTM gradient modulator, hidden ``--lstm-hidden``, at half resolution;
``--n-steps`` unrolled steps, lr_grad 0.2), the same training patches in the same seeded order
(``oceanda.train.data.PatchDataset`` of the training OSSE, normalised by its statistics), the same
loss (50 MSE + 1000 MSE(Sobel) + 1 prior, weighted by the blend weight; the starter's own
``Lit4dVarNet.step`` for the reference), Adam at ``--lr`` (prior at lr / 2) and the same budget of
CPU seconds of training (``time.process_time``, one thread each, run one after the other).
oceanda's model starts from the per-patch OI (``model.init=oi``, its ConvLSTM output zeroed: the
untrained model is the OI) as shipped; ``--ours-init obs`` starts it from the observations like the
starter. Each trained model then maps the test window (patches every ``--infer-stride`` cells and
days, blended with the inference blend weights), and ``oceanda.cli.evaluate.evaluate_paths``
scores the map on the evaluation period; the OI of the same patches is the reference row.

ocean4dvarnet is an optional extra (``pip install 'oceanda[bench]'``): it pins numpy 1.26 and
xarray 2025.1, so install it apart from the environment, e.g. ``pip install --target DIR --no-deps
ocean4dvarnet==1.0.6 pytorch-lightning==2.3.3 lightning-utilities torchmetrics kornia kornia_rs
metpy xrft pint pooch traitlets flexcache flexparser 'setuptools<80'`` and ``--peer-path DIR``.

usage: OMP_NUM_THREADS=1 python hpc/bench/fourdvarnet_peer.py --train-truth T/truth.zarr --train-obs T/obs.zarr
       --test-truth S/truth.zarr --test-obs S/obs.zarr --budget-s 600 [--peer-path DIR] [--out DIR] [--json J]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch

EVAL = ("2012-10-22", "2012-12-02")
KEYS = ("mu", "sigma_t", "lambda_x_deg", "lambda_t_days", "rmse_m")


def _geometry(size, crop):
    from oceanda.data.patches import PatchGeometry

    return PatchGeometry(size=tuple(size), stride=(1, size[1] - 2 * crop, size[2] - 2 * crop), crop=(crop, crop))


def ours_model(a, init: str):
    from oceanda.assim.fourdvarnet import ModelConfig, build_model

    cfg = ModelConfig(n_time=a.size[0], prior_hidden=a.prior_hidden, lstm_hidden=a.lstm_hidden, n_steps=a.n_steps,
                      lstm_downsample=2, init=init, dropout=0.1)
    torch.manual_seed(a.seed)
    model = build_model(cfg)
    if init == "oi":
        model.zero_update_()
    return model, cfg


def peer_model(a, weight: np.ndarray):
    from ocean4dvarnet.models import BaseObsCost, BilinAEPriorCost, ConvLstmGradModel, GradSolver, Lit4dVarNet

    torch.manual_seed(a.seed)
    solver = GradSolver(prior_cost=BilinAEPriorCost(a.size[0], a.prior_hidden, downsamp=2),
                        obs_cost=BaseObsCost(), grad_mod=ConvLstmGradModel(a.size[0], a.lstm_hidden, downsamp=2),
                        n_step=a.n_steps, lr_grad=0.2)

    def opt_fn(lit):  # the starter's optimiser: Adam, prior at lr / 2
        return torch.optim.Adam([{"params": lit.solver.grad_mod.parameters(), "lr": a.lr},
                                 {"params": lit.solver.prior_cost.parameters(), "lr": a.lr / 2}])

    return Lit4dVarNet(solver, weight.astype(np.float32), opt_fn, norm_stats=(0.0, 1.0))


Item = namedtuple("TrainingItem", ["input", "tgt"])


def _peer_batch(b):
    land = ~b["ocean"][:, None].expand_as(b["tgt"])
    return Item(b["obs"], torch.where(land, torch.full_like(b["tgt"], math.nan), b["tgt"]))


def train_budget(kind: str, model, ds, a) -> dict:
    """Adam steps on seeded batches of ``ds`` until ``a.budget_s`` CPU seconds are spent."""
    from oceanda.train.fourdvarnet import TASK, TrainConfig, make_optimizer
    from oceanda.train.loop import DistContext, _collate, train_step

    if kind == "ours":
        tcfg = TrainConfig(batch_size=a.batch, lr=a.lr, grad_clip=0.5)
        opt = make_optimizer(model, tcfg)
    else:
        opt = model.configure_optimizers()
    c0, w0, steps, seen, losses = time.process_time(), time.perf_counter(), 0, 0, []
    rng = np.random.default_rng(a.seed)
    while time.process_time() - c0 < a.budget_s:
        idx = rng.choice(len(ds), a.batch, replace=False)
        b = _collate(ds, idx)
        if kind == "ours":
            out = train_step(TASK, model, opt, b, tcfg, DistContext())
            losses.append(out["total"])
        else:
            model.train()
            opt.zero_grad(set_to_none=True)
            loss, _ = model.step(_peer_batch(b), "train")
            if loss is None:
                continue
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            losses.append(float(loss.detach()))
        steps += 1
        seen += a.batch
    return {"steps": steps, "patches_seen": seen, "cpu_s": time.process_time() - c0,
            "wall_s": time.perf_counter() - w0, "loss_first": losses[0] if losses else None,
            "loss_last10": float(np.mean(losses[-10:])) if losses else None}


@torch.no_grad()
def map_window(kind: str, model, ds, starts, shape, norm, weight) -> np.ndarray:
    """Blend the model's patch outputs into a ``(nt, ny, nx)`` map [m] (NaN where nothing covers)."""
    from oceanda.train.loop import _collate

    acc = np.zeros(shape, np.float64)
    wsum = np.zeros(shape, np.float64)
    T, H, W = weight.shape
    for i in range(0, len(starts), 8):
        idx = list(range(i, min(i + 8, len(starts))))
        b = _collate(ds, idx)
        if kind == "ours":
            model.eval()
            out = model(b["obs"], b["ocean"], x0=b.get("x0"))
        elif kind == "oi":
            out = b["x0"]
        else:
            model.eval()
            out = model.solver(Item(b["obs"], b["tgt"])).detach()
        out = norm.invert(out.double().numpy())
        for j, k in enumerate(idx):
            t, y, x = starts[k]
            acc[t:t + T, y:y + H, x:x + W] += weight * out[j]
            wsum[t:t + T, y:y + H, x:x + W] += weight
    return np.where(wsum > 0, acc / np.maximum(wsum, 1e-30), np.nan)


def write_map(path: Path, field: np.ndarray, like: str, period) -> None:
    import xarray as xr

    from oceanda.data import io
    from oceanda.data import names as N

    ref = io.open_dataset(like, [N.SSH_OBS], optional=[N.OCEAN])
    ref = io.select_window(ref, period=period, box=None, what=like)
    xr.Dataset({N.SSH: ((N.TIME, N.LAT, N.LON), field.astype(np.float32))},
               coords={N.TIME: ref[N.TIME].values, N.LAT: ref[N.LAT].values, N.LON: ref[N.LON].values}
               ).to_zarr(path, mode="w")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-truth", required=True)
    ap.add_argument("--train-obs", required=True)
    ap.add_argument("--test-truth", required=True)
    ap.add_argument("--test-obs", required=True)
    ap.add_argument("--dates", default="2012-10-07,2012-12-17", help="test window mapped (evaluation +- margin)")
    ap.add_argument("--budget-s", type=float, default=600.0, help="CPU seconds of training per model")
    ap.add_argument("--peer-path", default=None, help="folder holding ocean4dvarnet (pip install --target)")
    ap.add_argument("--size", default="15,64,64")
    ap.add_argument("--crop", type=int, default=8)
    ap.add_argument("--train-stride", default="1,34,34")
    ap.add_argument("--infer-stride", default="5,34,34")
    ap.add_argument("--prior-hidden", type=int, default=32)
    ap.add_argument("--lstm-hidden", type=int, default=32)
    ap.add_argument("--n-steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ours-init", default="oi", choices=["oi", "obs"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/fourdvarnet_peer")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    a.size = tuple(int(v) for v in a.size.split(","))
    if a.peer_path:
        sys.path.insert(0, a.peer_path)
    try:
        import ocean4dvarnet.models  # noqa: F401
        peer_version = __import__("importlib.metadata").metadata.version("ocean4dvarnet")
    except Exception as e:  # noqa: BLE001  (report why the reference cannot run, then stop)
        raise SystemExit(f"ocean4dvarnet cannot be imported ({type(e).__name__}: {e}): install the 'bench' extra "
                         "apart from the environment and pass --peer-path (see the module docstring)")
    from oceanda.cli.evaluate import evaluate_paths
    from oceanda.train.data import Normalisation, PatchDataset, load_arrays, patch_starts

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    weight = _geometry(a.size, a.crop).weights().full().astype(np.float32)
    truth, obs, ocean, _, grid = load_arrays(a.train_truth, a.train_obs, with_grid=True)
    norm = Normalisation.fit(truth, ocean)
    tr_starts = patch_starts(np.arange(len(obs)), ocean.shape, a.size, tuple(int(v) for v in a.train_stride.split(",")))
    from oceanda.assim.fourdvarnet import ModelConfig

    oi_kw = ModelConfig(init="oi").oi_kwargs()  # the OI of method=oi's defaults (the shipped weights' first guess)
    train_ds = {k: PatchDataset(truth, obs, ocean, tr_starts, a.size, weight, norm, aug=1, seed=a.seed,
                                **({"oi": oi_kw, "lon": grid.lon, "lat": grid.lat} if k == "oi" else {}))
                for k in ("oi", "obs")}
    dates = a.dates.split(",")
    tt, to, toc, _, tgrid = load_arrays(a.test_truth, a.test_obs, period=dates, with_grid=True)
    te_starts = patch_starts(np.arange(len(to)), toc.shape, a.size, tuple(int(v) for v in a.infer_stride.split(",")))
    test_ds = PatchDataset(tt, to, toc, te_starts, a.size, weight, norm, oi=oi_kw, lon=tgrid.lon, lat=tgrid.lat)
    print(f"training patches {len(tr_starts)} (x2 augmented), test patches {len(te_starts)}; budget {a.budget_s:.0f} "
          f"CPU s per model; ocean4dvarnet {peer_version}", flush=True)

    rows = []

    def scored(name, field, extra):
        path = out / f"{name}.zarr"
        write_map(path, field, a.test_obs, dates)
        s = evaluate_paths(a.test_truth, path, period=list(EVAL), out_dir=out / name, figures=False)
        row = {"model": name, **{k: s.get(k) for k in KEYS}, **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    scored("oi", map_window("oi", None, test_ds, te_starts, to.shape, norm, weight), {})
    ours, _ = ours_model(a, a.ours_init)
    rec = train_budget("ours", ours, train_ds["oi" if a.ours_init == "oi" else "obs"], a)
    scored(f"oceanda ({a.ours_init} start)", map_window("ours", ours, test_ds, te_starts, to.shape, norm, weight), rec)
    peer = peer_model(a, weight)
    rec = train_budget("peer", peer, train_ds["obs"], a)
    scored(f"ocean4dvarnet {peer_version}", map_window("peer", peer, test_ds, te_starts, to.shape, norm, weight), rec)
    head = f"{'model':28s} {'mu':>6s} {'lambda_x':>9s} {'RMSE [m]':>9s} {'steps':>6s} {'patches':>8s} {'CPU s':>6s}"
    print("\n" + head)
    for r in rows:
        lx = "-" if r["lambda_x_deg"] is None else f"{r['lambda_x_deg']:.2f}"
        print(f"{r['model']:28s} {r['mu']:6.3f} {lx:>9s} {r['rmse_m']:9.4f} {r.get('steps', '-')!s:>6s} "
              f"{r.get('patches_seen', '-')!s:>8s} {r.get('cpu_s', 0):6.0f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "budget_cpu_s": a.budget_s, "eval_period": EVAL,
                                            "config": vars(a) | {"size": list(a.size)}}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
