"""Issue 15's headline table: OI, 4DVarNet, spde_oi and the SPDE-prior 4DVarNet side by side
on a Gulf Stream OSSE's held-out window (issue 7's acceptance table, extended).

Runs ``oceanda infer`` with ``method=oi`` and ``method=4dvarnet`` (a checkpoint; default: the
weights shipped in ``oceanda.weights``) on the SAME observations over the evaluation period
plus a margin (DAW patches centred on every evaluated day), scores both with ``oceanda
evaluate``'s metrics on the data challenge's window (2012-10-22..2012-12-02, lon -65..-55,
lat 33..43) and prints the leaderboard rows, the ratio lambda_x(4DVarNet) / lambda_x(OI),
the difference mu(4DVarNet) - mu(OI) and the issue's targets (ratio <= 0.6, difference
>= 0.02). Optionally (``--obs-swot``) the same with a second observation set (same truth).

With ``--spde-oi`` the exact SPDE-prior posterior mean (``method=spde_oi``, the parameters of
``configs/method/spde_oi.yaml``, overridable with ``--spde-oi-set``) is scored too, and with
``--spde-checkpoint CK`` the SPDE-prior 4DVarNet (``method=spde_4dvarnet``; or ``--spde-train TRAIN VAL``
trains it first by :data:`SPDE_RECIPE` on the OSSE folder ``TRAIN``, selected on ``VAL``); the check
``spde_4dvarnet vs spde_oi`` prints their RMSE ratio and mu difference (issue 15: the SPDE-prior
4DVarNet's mean must beat spde_oi's); when the SPDE patches differ from the OI's, OI on the SPDE patches
is scored too (``oi:spde_patches``: the prior mean and untrained start of a ``model.mean=oi`` model) and
the SPDE-prior 4DVarNet's RMSE ratio to it printed. Every row's CPU seconds are printed and summed.

The OSSE (a year, training on the rest with a gap) comes from ``oceanda generate
domain=gulfstream period=year``; the checkpoint from ``oceanda train`` with the evaluation
period outside its ``dates`` (``src/oceanda/weights/README.md`` has the exact commands).
Outputs in ``--out`` are restartable: a rerun recomputes nothing that is complete.

usage: OMP_NUM_THREADS=1 python hpc/bench/fourdvarnet_accuracy.py --truth OSSE/truth.zarr
       --obs OSSE/obs.zarr [--obs-swot OSSE_SWOT/obs.zarr] [--checkpoint CK.pt] [--out DIR]
       [--oi-patch 15,100,100,5,80,80] [--net-patch 15,64,64,1,34,34 --net-crop 8] [--json out.json]
       [--compare LABEL=OTHER_CK.pt ...]   (more 4DVarNet rows, e.g. the previous weights)
       [--spde-oi [--spde-oi-set method.std=0.3 ...]] [--spde-checkpoint SPDE_CK.pt [--spde-patch ...]]
       [--spde-train TRAIN_OSSE VAL_OSSE [--spde-val-period START,END]]   (train it first: SPDE_RECIPE)
       [--skip-net]   (no 4DVarNet rows: e.g. the SPDE rows alone)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EVAL = ("2012-10-22", "2012-12-02")  # the 2020a data challenge's evaluation period
KEYS = ("mu", "sigma_t", "lambda_x_deg", "lambda_t_days", "rmse_m")


def _patch_args(spec: str, crop: int) -> list[str]:
    v = [int(x) for x in spec.split(",")]
    if len(v) != 6:
        raise SystemExit(f"patch spec {spec!r}: expected T,H,W,st,sy,sx")
    return [f"patch.size=[{v[0]},{v[1]},{v[2]}]", f"patch.stride=[{v[3]},{v[4]},{v[5]}]",
            f"patch.crop=[{crop},{crop}]", f"tile=[{40},{100},{100}]"]


def run_method(name: str, obs: str, truth: str, out: Path, dates: list[str], patch: list[str],
               extra: list[str]) -> dict:
    from oceanda.cli import main

    t0 = time.perf_counter()
    c0 = time.process_time()
    rc = main(["infer", f"obs_path={obs}", f"truth_path={truth}", f"out_dir={out}", f"method={name}",
               f"dates=[{dates[0]},{dates[1]}]", "progress=false", "evaluate.figures=false",
               f"evaluate.period=[{EVAL[0]},{EVAL[1]}]", *patch, *extra])
    if rc != 0:
        raise SystemExit(f"oceanda infer method={name} failed (exit {rc})")
    scores = json.loads((out / "scores.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    return {"method": name, **{k: scores.get(k) for k in KEYS},
            "patches": summary.get("patches_total"), "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0,  # of this call: ~0 where a complete earlier run is reused
            "infer_wall_s": summary.get("wall_s")}  # the inference's own wall time (also when reused)


#: the SPDE-prior 4DVarNet recipe of issue 15 (README, "SPDE-prior 4DVarNet on the Gulf Stream truth"): prior
#: mean = each patch's OI analysis (model.mean=oi: the SPDE prior models the residual truth - OI); global
#: Theta = (kappa, std, gamma) and R by maximum likelihood on the training residuals, then fixed; 20 solver
#: steps; 4 batches of ConvLSTM training, kept only if they beat the untrained start on the validation seed
SPDE_RECIPE = ["model=spde_4dvarnet", "patch=gulfstream", "patch.size=[15,32,32]", "patch.stride=[1,24,24]",
               "stride=[1,48,48]", "patch.crop=[4,4]", "aug=0", "model.theta=global", "model.mean=oi",
               "model.params=[kappa,std,gamma]", "model.n_steps=20", "train.epochs=1", "train.max_batches=4",
               "train.batch_size=4", "train.lr=1e-4", "train.w_mse=1", "train.w_grad=0", "+train.w_nll=0",
               "+train.w_nll_obs=0", "+train.theta_init=mle", "+train.theta_grad=nll", "+train.nll_crop=24",
               "+train.mle_items=24", "system.threads=1", "progress=false"]


def train_spde(train_dir: str, val_dir: str, val_period: str, out: Path) -> str:
    """Train the SPDE-prior 4DVarNet by :data:`SPDE_RECIPE` on the OSSE ``train_dir`` (truth.zarr,
    obs.zarr), selected on ``val_dir`` within ``val_period``; returns its ``best_checkpoint.pt``
    (reused when complete, resumed when interrupted)."""
    from oceanda.cli import main

    best = out / "best_checkpoint.pt"
    if (out / "history.json").is_file() and best.is_file():
        return str(best)
    v = val_period.split(",")
    rc = main(["train", f"truth_path={train_dir}/truth.zarr", f"obs_path={train_dir}/obs.zarr",
               f"val_truth_path={val_dir}/truth.zarr", f"val_obs_path={val_dir}/obs.zarr",
               f"val_period=[{v[0]},{v[1]}]", f"out_dir={out}", *SPDE_RECIPE,
               *(["resume=true"] if (out / "checkpoint.pt").is_file() else [])])
    if rc != 0 or not best.is_file():
        raise SystemExit(f"oceanda train model=spde_4dvarnet failed (exit {rc})")
    return str(best)


def table(rows: list[dict]) -> str:
    head = ["obs", "method", "mu", "sigma_t", "lambda_x [deg]", "lambda_t [d]", "RMSE [m]", "patches",
            "wall [s]", "cpu [s]"]
    fmt = lambda r: [r["obs"], r["method"], f"{r['mu']:.3f}", f"{r['sigma_t']:.3f}",  # noqa: E731
                     "-" if r["lambda_x_deg"] is None else f"{r['lambda_x_deg']:.2f}",
                     "-" if r["lambda_t_days"] is None else f"{r['lambda_t_days']:.2f}",
                     f"{r['rmse_m']:.4f}", str(r["patches"]), f"{r['wall_s']:.0f}", f"{r['cpu_s']:.0f}"]
    cells = [head] + [fmt(r) for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c[i].rjust(w[i]) if i > 1 else c[i].ljust(w[i]) for i in range(len(head)))
                     for c in cells)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--truth", required=True)
    ap.add_argument("--obs", required=True, help="4 nadirs obs.zarr")
    ap.add_argument("--obs-swot", default=None, help="4 nadirs + SWOT obs.zarr (same truth)")
    ap.add_argument("--checkpoint", default=None, help="4DVarNet checkpoint (default: shipped weights)")
    ap.add_argument("--compare", action="append", default=[], metavar="LABEL=CK",
                    help="another 4DVarNet checkpoint scored in the same run (row '4dvarnet:LABEL'); repeatable")
    ap.add_argument("--out", default="runs/fourdvarnet_accuracy")
    ap.add_argument("--dates", default="2012-10-07,2012-12-17", help="inference window (eval +- margin)")
    ap.add_argument("--oi-patch", default="15,100,100,5,80,80")
    ap.add_argument("--oi-patch-swot", default="15,60,60,5,40,40",
                    help="OI (and spde_oi) patch with SWOT (15,100,100,5,80,80: the 4-nadir geometry)")
    ap.add_argument("--net-patch", default="15,64,64,1,34,34",
                    help="4DVarNet patches (default: the shipped weights' training geometry)")
    ap.add_argument("--crop", type=int, default=10, help="crop of the OI patches")
    ap.add_argument("--net-crop", type=int, default=8, help="crop of the 4DVarNet patches")
    ap.add_argument("--spde-oi", action="store_true", help="also score method=spde_oi (on --oi-patch)")
    ap.add_argument("--spde-oi-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override of the spde_oi config (e.g. method.std=0.3); repeatable")
    ap.add_argument("--spde-checkpoint", default=None,
                    help="SPDE-prior 4DVarNet checkpoint: also score method=spde_4dvarnet")
    ap.add_argument("--spde-train", nargs=2, default=None, metavar=("TRAIN_DIR", "VAL_DIR"),
                    help="train the SPDE-prior 4DVarNet first (SPDE_RECIPE: training OSSE, validation OSSE) "
                         "and score it (instead of --spde-checkpoint)")
    ap.add_argument("--spde-val-period", default="2013-10-22,2013-11-07",
                    help="validation days of --spde-train's VAL_DIR")
    ap.add_argument("--spde-patch", default="15,100,100,5,80,80",
                    help="SPDE-prior 4DVarNet patches (default: the OI's, the size the validation seed chose for "
                         "SPDE_RECIPE's model among 32, 64 and 100 cells; 15,32,32,5,24,24 is its training size)")
    ap.add_argument("--spde-crop", type=int, default=10, help="crop of the SPDE-prior 4DVarNet patches")
    ap.add_argument("--skip-net", action="store_true", help="no 4DVarNet rows (OI and the SPDE rows only)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dates = a.dates.split(",")
    out = Path(a.out)
    net_extra = [] if a.checkpoint is None else [f"method.checkpoint={a.checkpoint}"]
    sets = [("4nadirs", a.obs, a.oi_patch)] + ([("4nadirs_swot", a.obs_swot, a.oi_patch_swot)] if a.obs_swot else [])
    others = []
    for c in a.compare:
        if "=" not in c:
            raise SystemExit(f"--compare {c!r}: expected LABEL=CHECKPOINT")
        others.append(tuple(c.split("=", 1)))
    for kv in a.spde_oi_set:
        if "=" not in kv or not kv.startswith("method."):
            raise SystemExit(f"--spde-oi-set {kv!r}: expected method.KEY=VALUE")
    train_row = None
    if a.spde_train:
        if a.spde_checkpoint:
            raise SystemExit("--spde-train and --spde-checkpoint: give one")
        c0, t0 = time.process_time(), time.perf_counter()
        a.spde_checkpoint = train_spde(*a.spde_train, a.spde_val_period, out / "spde_train")
        train_row = {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0}
        print(f"SPDE-prior 4DVarNet: {a.spde_checkpoint} ({train_row['cpu_s']:.0f} CPU-s of training)")
    rows = []
    for label, obs, oi_patch in sets:
        runs = [("oi", "oi", oi_patch, a.crop, [])]
        if not a.skip_net:
            runs.append(("4dvarnet", "4dvarnet", a.net_patch, a.net_crop, net_extra))
            if (oi_patch, a.crop) != (a.net_patch, a.net_crop):  # OI also on the 4DVarNet's patches
                runs.insert(1, ("oi:net_patches", "oi", a.net_patch, a.net_crop, []))
            runs += [(f"4dvarnet:{lab}", "4dvarnet", a.net_patch, a.net_crop, [f"method.checkpoint={ck}"])
                     for lab, ck in others]
        if a.spde_oi:
            # a variant (--spde-oi-set) needs its own --out: oceanda infer refuses another config's out_dir
            runs.append(("spde_oi", "spde_oi", oi_patch, a.crop, list(a.spde_oi_set)))
        if a.spde_checkpoint:
            if (a.spde_patch, a.spde_crop) != (oi_patch, a.crop):  # OI on the SPDE patches (a mean=oi start)
                runs.append(("oi:spde_patches", "oi", a.spde_patch, a.spde_crop, []))
            runs.append(("spde_4dvarnet", "spde_4dvarnet", a.spde_patch, a.spde_crop,
                         [f"method.checkpoint={a.spde_checkpoint}"]))
        for row_name, name, spec, crop, extra in runs:
            r = run_method(name, obs, a.truth, out / f"{row_name.replace(':', '_')}_{label}", dates,
                           _patch_args(spec, crop), extra)
            rows.append({"obs": label, **r, "method": row_name})
    print()
    print(table(rows))
    print(f"CPU time of all rows: {sum(r['cpu_s'] for r in rows):.0f} s (wall {sum(r['wall_s'] for r in rows):.0f} s; "
          "rows reused from a complete earlier run in --out cost ~0 here)"
          + ("" if train_row is None else f", plus {train_row['cpu_s']:.0f} s training the SPDE-prior 4DVarNet"))
    checks = {}
    for label, *_ in sets:
        spde = {r["method"]: r for r in rows if r["obs"] == label and r["method"] in ("spde_oi", "spde_4dvarnet")}
        if len(spde) == 2:  # issue 15: the SPDE-prior 4DVarNet's mean must beat spde_oi's
            ratio = spde["spde_4dvarnet"]["rmse_m"] / spde["spde_oi"]["rmse_m"]
            dmu = spde["spde_4dvarnet"]["mu"] - spde["spde_oi"]["mu"]
            checks[f"{label}:spde_4dvarnet_vs_spde_oi"] = {"rmse_ratio": ratio, "mu_diff": dmu,
                                                            "beats_spde_oi": ratio < 1 and dmu > 0}
            print(f"{label}: RMSE(spde_4dvarnet)/RMSE(spde_oi) = {ratio:.3f}, "
                  f"mu(spde_4dvarnet) - mu(spde_oi) = {dmu:+.3f} (target: ratio < 1, difference > 0)")
        soi = next((r for r in rows if r["obs"] == label and r["method"] == "oi:spde_patches"), None)
        if soi is not None and "spde_4dvarnet" in spde:  # a mean=oi model vs the OI it starts from
            ratio = spde["spde_4dvarnet"]["rmse_m"] / soi["rmse_m"]
            dmu = spde["spde_4dvarnet"]["mu"] - soi["mu"]
            checks[f"{label}:spde_4dvarnet_vs_oi_spde_patches"] = {"rmse_ratio": ratio, "mu_diff": dmu}
            print(f"{label}: RMSE(spde_4dvarnet)/RMSE(oi on the same patches) = {ratio:.3f}, mu difference {dmu:+.3f}")
        net = next((r for r in rows if r["obs"] == label and r["method"] == "4dvarnet"), None)
        for oi_name in ("oi", "oi:net_patches") if net is not None else ():  # targets vs OI, either geometry
            oi = next((r for r in rows if r["obs"] == label and r["method"] == oi_name), None)
            if oi is None:
                continue
            ratio = (None if oi["lambda_x_deg"] is None or net["lambda_x_deg"] is None
                     else net["lambda_x_deg"] / oi["lambda_x_deg"])
            dmu = net["mu"] - oi["mu"]
            checks[label if oi_name == "oi" else f"{label}:{oi_name}"] = {
                "lambda_x_ratio": ratio, "mu_diff": dmu,
                "target_lambda_x_ratio_le_0.6": None if ratio is None else ratio <= 0.6,
                "target_mu_diff_ge_0.02": dmu >= 0.02}
            print(f"{label}: lambda_x(4dvarnet)/lambda_x({oi_name}) = "
                  + ("-" if ratio is None else f"{ratio:.2f}") + " (target <= 0.6), "
                  f"mu(4dvarnet) - mu({oi_name}) = {dmu:+.3f} (target >= +0.02)")
    if a.obs_swot:  # issue 15: "with SWOT added, both better"
        for r in (r for r in rows if r["obs"] == "4nadirs_swot"):
            base = next((b for b in rows if b["obs"] == "4nadirs" and b["method"] == r["method"]), None)
            if base is None or r["lambda_x_deg"] is None or base["lambda_x_deg"] is None:
                continue
            d = {"mu_diff": r["mu"] - base["mu"], "lambda_x_ratio": r["lambda_x_deg"] / base["lambda_x_deg"],
                 "rmse_ratio": r["rmse_m"] / base["rmse_m"]}
            d["better"] = d["mu_diff"] > 0 and d["lambda_x_ratio"] < 1 and d["rmse_ratio"] < 1
            checks[f"swot_vs_4nadirs:{r['method']}"] = d
            print(f"{r['method']}: with SWOT vs 4 nadirs: mu {d['mu_diff']:+.3f}, lambda_x x{d['lambda_x_ratio']:.2f}, "
                  f"RMSE x{d['rmse_ratio']:.2f} ({'better' if d['better'] else 'NOT better'} on all three)")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "checks": checks, "eval_period": EVAL, "dates": dates,
                                            "spde_checkpoint": a.spde_checkpoint, "spde_training": train_row},
                                           indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
