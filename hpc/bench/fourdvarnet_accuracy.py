"""4DVarNet vs OI accuracy on a Gulf Stream OSSE, side by side (issue 7's acceptance table).

Runs ``oceanda infer`` with ``method=oi`` and ``method=4dvarnet`` (a checkpoint; default: the
weights shipped in ``oceanda.weights``) on the SAME observations over the evaluation period
plus a margin (DAW patches centred on every evaluated day), scores both with ``oceanda
evaluate``'s metrics on the data challenge's window (2012-10-22..2012-12-02, lon -65..-55,
lat 33..43) and prints the leaderboard rows, the ratio lambda_x(4DVarNet) / lambda_x(OI),
the difference mu(4DVarNet) - mu(OI) and the issue's targets (ratio <= 0.6, difference
>= 0.02). Optionally (``--obs-swot``) the same with a second observation set.

The OSSE (a year, training on the rest with a gap) comes from ``oceanda generate
domain=gulfstream period=year``; the checkpoint from ``oceanda train`` with the evaluation
period outside its ``dates`` (``src/oceanda/weights/README.md`` has the exact commands).
Outputs in ``--out`` are restartable: a rerun recomputes nothing that is complete.

usage: OMP_NUM_THREADS=1 python hpc/bench/fourdvarnet_accuracy.py --truth OSSE/truth.zarr
       --obs OSSE/obs.zarr [--obs-swot OSSE_SWOT/obs.zarr] [--checkpoint CK.pt] [--out DIR]
       [--oi-patch 15,100,100,5,80,80] [--net-patch 15,64,64,1,34,34 --net-crop 8] [--json out.json]
       [--compare LABEL=OTHER_CK.pt ...]   (more 4DVarNet rows, e.g. the previous weights)
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
            "cpu_s": time.process_time() - c0}


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
                    help="OI patch with SWOT (OI's cost grows as (obs per patch)^3)")
    ap.add_argument("--net-patch", default="15,64,64,1,34,34",
                    help="4DVarNet patches (default: the shipped weights' training geometry)")
    ap.add_argument("--crop", type=int, default=10, help="crop of the OI patches")
    ap.add_argument("--net-crop", type=int, default=8, help="crop of the 4DVarNet patches")
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
    rows = []
    for label, obs, oi_patch in sets:
        runs = [("oi", "oi", oi_patch, a.crop, []), ("4dvarnet", "4dvarnet", a.net_patch, a.net_crop, net_extra)]
        if (oi_patch, a.crop) != (a.net_patch, a.net_crop):  # OI also on the 4DVarNet's patches
            runs.insert(1, ("oi:net_patches", "oi", a.net_patch, a.net_crop, []))
        runs += [(f"4dvarnet:{lab}", "4dvarnet", a.net_patch, a.net_crop, [f"method.checkpoint={ck}"])
                 for lab, ck in others]
        for row_name, name, spec, crop, extra in runs:
            r = run_method(name, obs, a.truth, out / f"{row_name.replace(':', '_')}_{label}", dates,
                           _patch_args(spec, crop), extra)
            rows.append({"obs": label, **r, "method": row_name})
    print()
    print(table(rows))
    checks = {}
    for label, *_ in sets:
        net = next(r for r in rows if r["obs"] == label and r["method"] == "4dvarnet")
        for oi_name in ("oi", "oi:net_patches"):  # the targets against OI on either geometry
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
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "checks": checks, "eval_period": EVAL,
                                            "dates": dates}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
