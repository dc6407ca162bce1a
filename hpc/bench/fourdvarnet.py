"""4DVarNet speed: oceanda's model vs a faithful re-implementation of the public starter.

Both models have the SAME size (prior: bilinear AE, hidden 32, downsample 2; ConvLSTM
hidden 48; 10 solver steps; lr_grad 0.2 — the starter's ``config/xp/base.yaml``) and the
SAME weights (the reference's state dict is converted to ours), so the float32 outputs agree
to float32 rounding (the max abs difference is reported). Ours is timed in each arithmetic
setting (``--variants``): ``float32``; ``bf16`` (bfloat16 convolutions, state/gradient/update
in float32); ``bf16+fused`` (plus the ConvLSTM cell as one ``torch.compile`` kernel).
Measured on one 15x240x240 patch:

- inference: the reference as the starter runs it in evaluation (``GradSolver.forward``
  with ``create_graph=True`` and a detach per step); ours under ``torch.inference_mode``
  with the closed-form gradient of J and a hand-written vjp of Phi;
- a training step: forward with the graph kept + the starter's loss
  (50 MSE + 1000 MSE(sobel) + prior cost) + backward + Adam step.

The reference ``Ref*`` classes mirror 4dvarnet-starter ``src/models.py``
(``BilinAEPriorCost``, ``ConvLstmGradModel``, ``BaseObsCost``, ``GradSolver``) op for op.
Timings: the minimum of ``--repeat`` runs after one warm-up (wall and process CPU time), the
models interleaved so that load from other processes hits all alike; torch threads = 2 and 1.

``--accuracy OSSE_DIR`` checks what the low precision costs in accuracy on a real OSSE
(``oceanda generate`` output): the RMSE to the truth of a 15-day window held out of training
vs the RMS change made by bf16, for a ``--checkpoint`` and/or models trained here for
``--train-steps`` steps in float32 and in bf16 (same initial weights and batches).

On a machine shared with other jobs, compare the CPU-time columns (wall time with 2
OpenMP threads on an oversubscribed machine is dominated by thread descheduling).

usage: OMP_NUM_THREADS=2 python hpc/bench/fourdvarnet.py [--threads 2 1] [--repeat 3]
       [--size 240] [--variants float32 bf16 bf16+fused] [--compile] [--json out.json]
       [--accuracy OSSE_DIR [--checkpoint PATH] [--train-steps N] [--no-speed]]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from oceanda.assim.fourdvarnet import FourDVarNet, count_parameters


# the reference (the starter, op for op) and the pairing of its weights with ours
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "reference"))
from fourdvarnet_starter import (build_pair, our_training_loss, ref_training_loss, sobel,  # noqa: E402
                                 synthetic_patch)


def _time(fn):
    """(wall seconds, CPU seconds of this process) of one call. On a shared machine the CPU
    time is the robust figure (it does not count time spent descheduled)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


VARIANTS = {"float32": ("float32", False), "bf16": ("bf16", False), "bf16+fused": ("bf16", True)}


def run(threads=(2, 1), repeat=3, size=240, do_compile=False, variants=tuple(VARIANTS)):
    obs, tgt = synthetic_patch(size=size)
    weight = torch.ones(tgt.shape[1:])
    c = min(20, size // 4)  # the anchor's crop of 20 cells
    weight[:, :c, :] = 0
    weight[:, -c:, :] = 0
    weight[:, :, :c] = 0
    weight[:, :, -c:] = 0
    tw = 1 - (2 * torch.arange(15) - 15).abs() / 15.0
    weight = weight * tw[:, None, None]
    ref, ours = build_pair()
    rows, info = [], {}

    ref.eval(), ours.eval()
    out_ref = ref(obs).detach()
    info["ref_rms_output"] = float(out_ref.pow(2).mean().sqrt())
    inf_models = {}
    for v in variants:
        m = copy.deepcopy(ours).set_precision(*VARIANTS[v])
        with torch.inference_mode():
            out_v = m(obs)
        key = "max_abs_diff_inference" if v == "float32" else f"max_abs_diff_inference_{v}"
        info[key] = float((out_ref - out_v).abs().max())
        info[f"rms_diff_inference_{v}"] = float((out_ref - out_v).pow(2).mean().sqrt())
        inf_models[v] = m
    info["params_ref"] = count_parameters(ref) - ref.prior_cost.bilin_22.weight.numel() - ref.prior_cost.bilin_22.bias.numel()
    info["params_ours"] = count_parameters(ours)

    def inf_ref():
        ref(obs)

    def inf_of(m):
        def go():
            with torch.inference_mode():
                m(obs)
        return go

    def make_train(model, lossfn):
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def go():
            model.train()
            # dropout off so both models compute the same thing
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
            opt.zero_grad(set_to_none=True)
            loss = lossfn(model, obs, tgt, weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
        return go

    ref_tr, ours_tr = build_pair()
    # one training loss evaluation agrees too
    for m in list(ref_tr.modules()) + list(ours_tr.modules()):
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    ref_tr.train(), ours_tr.train()
    lr_ = ref_training_loss(ref_tr, obs, tgt, weight)
    gr = torch.autograd.grad(lr_, ref_tr.grad_mod.conv_out.weight)[0]
    info["train_loss_ref"] = float(lr_.detach())
    train_models = {}
    for v in variants:
        m = copy.deepcopy(ours_tr).set_precision(*VARIANTS[v])
        lo_ = our_training_loss(m, obs, tgt, weight)
        go_ = torch.autograd.grad(lo_, m.grad_mod.conv_out.weight)[0]
        sfx = "" if v == "float32" else f"_{v}"
        info["train_loss_ours" + sfx] = float(lo_.detach())
        info["rel_diff_param_grad" + sfx] = float((gr - go_).norm() / gr.norm())
        train_models[v] = m

    kinds = [("inference", inf_ref, {v: inf_of(m) for v, m in inf_models.items()}),
             ("train step", make_train(ref_tr, ref_training_loss),
              {v: make_train(m, our_training_loss) for v, m in train_models.items()})]
    if do_compile:
        comp = torch.compile(ours)
        t0 = time.perf_counter()
        with torch.inference_mode():
            comp.eval()
            comp(obs)
        info["compile_s_inference"] = time.perf_counter() - t0
        kinds[0][2]["compiled f32"] = inf_of(comp)
    for nt in threads:
        torch.set_num_threads(nt)
        for kind, fr, fos in kinds:
            fr()
            for fo in fos.values():  # warm-up at this thread count (compiles the fused cell)
                fo()
            tr, to = [], {v: [] for v in fos}
            for _ in range(repeat):  # interleaved: load from other processes hits all alike
                tr.append(_time(fr))
                for v, fo in fos.items():
                    to[v].append(_time(fo))
            rw, rc = min(t[0] for t in tr), min(t[1] for t in tr)
            for v in fos:
                ow, oc = min(t[0] for t in to[v]), min(t[1] for t in to[v])
                rows.append(dict(case=f"{kind} {v}", threads=nt, ref_wall_s=rw, ours_wall_s=ow, ref_cpu_s=rc,
                                 ours_cpu_s=oc, speedup_wall=rw / ow, speedup_cpu=rc / oc))
    return rows, info


# ---------------------------------------------------------------- accuracy of the low precision


def _load_osse(osse_dir, day0, n_time):
    """(truth, obs, ocean) numpy arrays of days ``day0 .. day0+n_time-1`` (the full box)."""
    import numpy as np
    import xarray as xr

    truth = xr.open_zarr(f"{osse_dir}/truth.zarr")
    obs = xr.open_zarr(f"{osse_dir}/obs.zarr")
    t0 = np.datetime64(day0)
    i0 = int(np.searchsorted(truth.time.values, t0))
    sl = slice(i0, i0 + n_time)
    return (truth.ssh.isel(time=sl).values.astype("float32"), obs.ssh_obs.isel(time=sl).values.astype("float32"),
            truth.ocean.values.astype(bool))


def _rmse(a, b, ocean):
    m = ocean.expand_as(a)
    return float(((a - b)[m] ** 2).mean().sqrt())


def _variants(model):
    """(name, precision, fuse_cell) of the arithmetic settings compared."""
    return [("float32", "float32", False), ("bf16", "bf16", False), ("bf16+fused", "bf16", True)]


def _train_small(osse_dir, prec, fuse, steps, seed=0, size=64, batch=2, lr=1e-3):
    """Train the anchor-size model for ``steps`` Adam steps on random 15 x size x size crops of
    the training period (days >= 2012-12-10, after the evaluation window), in ``prec``.
    Same initial weights and batches for every ``prec`` (seeded). Returns (model, losses, norm)."""
    import numpy as np

    truth, obs, ocean = _load_osse(osse_dir, "2012-12-10", 200)
    mean, std = float(np.nanmean(truth)), float(np.nanstd(truth))
    tr = torch.from_numpy((truth - mean) / std)
    ob = torch.from_numpy((obs - mean) / std)
    oc = torch.from_numpy(ocean)
    torch.manual_seed(seed)
    model = FourDVarNet(15, prior_hidden=32, lstm_hidden=48, n_steps=10, lr_grad=0.2)
    model.set_precision(prec, fuse)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    model.train()
    ny, nx = oc.shape
    for _ in range(steps):
        idx = [(int(torch.randint(0, tr.shape[0] - 15, (1,), generator=g)),
                int(torch.randint(0, ny - size, (1,), generator=g)),
                int(torch.randint(0, nx - size, (1,), generator=g))) for _ in range(batch)]
        o = torch.stack([ob[t:t + 15, i:i + size, j:j + size] for t, i, j in idx])
        y = torch.stack([tr[t:t + 15, i:i + size, j:j + size] for t, i, j in idx])
        m = torch.stack([oc[i:i + size, j:j + size] for t, i, j in idx])
        opt.zero_grad(set_to_none=True)
        out = model(o, m)
        w = m.unsqueeze(1).to(out.dtype)
        n = w.expand_as(out).sum().clamp_min(1)
        yz = torch.nan_to_num(y) * w
        loss = (50 * (((out - yz) * w) ** 2).sum() / n
                + 1000 * (((sobel(out) - sobel(yz)) * w) ** 2).sum() / n + model.prior_cost(out, m))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return model.eval(), losses, (mean, std)


def accuracy(osse_dir, checkpoint=None, train_steps=0, day0="2012-10-22", seed=0):
    """Reconstruction error on a real OSSE window vs the change made by the low precision.

    Evaluation window: 15 days from ``day0`` (the data challenge's evaluation period start,
    held out of the training crops), the whole box. For each model (a checkpoint and/or
    models trained here in float32 and in bf16 from the same initial weights and batches),
    the RMSE to the truth in metres (ocean cells, all 15 days and the centre day) under each
    arithmetic setting, and the RMS difference of each setting's output from the float32 one.
    """
    rows, models = [], []
    if checkpoint:
        from oceanda.assim.fourdvarnet import read_checkpoint

        ck = read_checkpoint(checkpoint)
        models.append((f"checkpoint {checkpoint}", ck["model"].eval(), (ck["norm"]["mean"], ck["norm"]["std"]), None))
    for prec, fuse in ([("float32", False), ("bf16", True)] if train_steps else []):
        t0 = time.process_time()
        m, losses, norm = _train_small(osse_dir, prec, fuse, train_steps, seed=seed)
        k = max(1, len(losses) // 10)
        models.append((f"trained {train_steps} steps seed {seed} {prec}{'+fused' if fuse else ''}", m, norm,
                       dict(first=statistics.mean(losses[:k]), last=statistics.mean(losses[-k:]),
                            cpu_s=time.process_time() - t0)))
    truth, obs, ocean = _load_osse(osse_dir, day0, 15)
    oc = torch.from_numpy(ocean)[None]
    tt = torch.from_numpy(truth)[None]
    for name, model, (mean, std), tinfo in models:
        o = (torch.from_numpy(obs)[None] - mean) / std
        n_t = model.n_time
        outs = {}
        for vname, prec, fuse in _variants(model):
            model.set_precision(prec, fuse)
            with torch.inference_mode():
                outs[vname] = model(o[:, :n_t], oc) * std + mean
        ref = outs["float32"]
        c = n_t // 2
        for vname, out in outs.items():
            rows.append(dict(model=name, variant=vname,
                             rmse_m=_rmse(out, tt[:, :n_t], oc[:, None]),
                             rmse_centre_m=_rmse(out[:, c:c + 1], tt[:, c:c + 1], oc[:, None]),
                             diff_vs_f32_m=_rmse(out, ref, oc[:, None]),
                             train=tinfo))
        model.set_precision("float32", False)
    obs_only = torch.nan_to_num(torch.from_numpy(obs)[None], nan=float(np.mean(truth)))
    base = dict(model="(mean field + obs)", variant="-", rmse_m=_rmse(obs_only, tt, oc[:, None]),
                rmse_centre_m=float("nan"), diff_vs_f32_m=float("nan"), train=None)
    return rows, base


def print_accuracy(rows, base):
    print("accuracy on the OSSE evaluation window (15 days, whole box); metres")
    print(f"{'model':<48}{'variant':>12}{'rmse':>10}{'rmse ctr':>10}{'|d| f32':>10}{'d/rmse':>8}")
    for r in rows + [base]:
        ratio = r["diff_vs_f32_m"] / r["rmse_m"] if r["rmse_m"] else float("nan")
        print(f"{r['model'][:48]:<48}{r['variant']:>12}{r['rmse_m']:>10.4f}{r['rmse_centre_m']:>10.4f}"
              f"{r['diff_vs_f32_m']:>10.5f}{ratio:>8.3f}")
    seen = set()
    for r in rows:
        if r["train"] and r["model"] not in seen:
            seen.add(r["model"])
            t = r["train"]
            print(f"{r['model']}: training loss first 10% {t['first']:.3f} last 10% {t['last']:.3f}, "
                  f"CPU {t['cpu_s']:.0f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", type=int, default=240)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="arithmetic settings of ours to time (all against the same reference)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--accuracy", metavar="OSSE_DIR", default=None,
                    help="also check the low precision on a real OSSE (truth.zarr + obs.zarr)")
    ap.add_argument("--checkpoint", default=None, help="a trained checkpoint for --accuracy")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="--accuracy: also train the anchor-size model here (float32 and bf16)")
    ap.add_argument("--seed", type=int, default=0, help="--train-steps: initial weights and batches")
    ap.add_argument("--no-speed", action="store_true", help="skip the speed table")
    a = ap.parse_args(argv)
    out = {"torch": torch.__version__}
    if a.accuracy:
        acc, base = accuracy(a.accuracy, a.checkpoint, a.train_steps, seed=a.seed)
        print_accuracy(acc, base)
        out["accuracy"], out["accuracy_baseline"] = acc, base
    if a.no_speed:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=2)
        return 0
    rows, info = run(tuple(a.threads), a.repeat, a.size, a.compile, tuple(a.variants))
    print(f"4DVarNet, one 15x{a.size}x{a.size} patch, 10 steps, prior hidden 32, LSTM hidden 48")
    print(f"params ref {info['params_ref']} ours {info['params_ours']}; output rms {info['ref_rms_output']:.3f}; "
          f"training loss ref {info['train_loss_ref']:.6f}")
    for v in a.variants:
        sfx = "" if v == "float32" else f"_{v}"
        print(f"  ours {v:<11} max |out_ref - out| = {info['max_abs_diff_inference' + sfx]:.2e}, "
              f"rms {info['rms_diff_inference_' + v]:.2e}; training loss {info['train_loss_ours' + sfx]:.6f}; "
              f"param-grad rel diff {info['rel_diff_param_grad' + sfx]:.2e}")
    for k in ("compile_s_inference",):
        if k in info:
            print(f"torch.compile first call ({k[10:]}): {info[k]:.1f} s")
    print("min over --repeat interleaved runs; wall = elapsed, cpu = CPU time of the process")
    print(f"{'case':<24}{'threads':>8}{'ref wall':>10}{'ours wall':>10}{'x wall':>8}"
          f"{'ref cpu':>10}{'ours cpu':>10}{'x cpu':>8}")
    for r in rows:
        print(f"{r['case']:<24}{r['threads']:>8}{r['ref_wall_s']:>10.3f}{r['ours_wall_s']:>10.3f}"
              f"{r['speedup_wall']:>7.2f}x{r['ref_cpu_s']:>10.3f}{r['ours_cpu_s']:>10.3f}{r['speedup_cpu']:>7.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**out, "rows": rows, "info": info}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
