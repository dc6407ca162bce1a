"""4DVarNet learning curve on held-out data: lambda_x / lambda_x(OI) and mu - mu(OI) vs training steps.

Scores every weight snapshot of a training run (``oceanda train ... snapshots=true`` keeps
``OUT/snapshots/start.pt``, the validated untrained start, and ``epoch_NNN.pt``) with ``oceanda
infer`` + ``oceanda evaluate``'s metrics on a held-out window of a held-out OSSE (the validation
seed, never the test period), next to OI on the same observations and the same patches (the
reference every row is divided by). Prints the table (steps, patches seen, the training loop's
validation RMSE, mu, lambda_x, the ratio and difference to OI, issue 15's targets), writes
``--json`` and a figure (``--figure``). Each scored snapshot's outputs stay in ``--out``: a rerun
(e.g. after more epochs) only scores the new snapshots.

usage: OMP_NUM_THREADS=1 python hpc/bench/learning_curve.py --truth VAL/truth.zarr --obs VAL/obs.zarr
       --run TRAIN_OUT [--run STAGE2_OUT --steps-offset N] --eval 2013-10-22,2013-11-20 --out runs/curve
       --json curve.json --figure curve.png [--net-patch 15,64,64,5,34,34 --net-crop 8] [--every 2 | --every N per --run] [--name stage1 --name ...]
       [--box -65,-55,33,43]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fourdvarnet_accuracy import _patch_args  # noqa: E402  (same patch spec as the accuracy bench)

KEYS = ("mu", "sigma_t", "lambda_x_deg", "lambda_t_days", "rmse_m")
TARGET_RATIO, TARGET_DMU = 0.6, 0.02


def score(name: str, obs: str, truth: str, out: Path, dates: list[str], evalp: list[str], patch: list[str],
          extra: list[str], box: list[str]) -> dict:
    """``oceanda infer`` of one method on ``dates``, scored on ``evalp`` (restartable: an existing
    ``scores.json`` is read back)."""
    if not (out / "scores.json").is_file():
        from oceanda.cli import main

        rc = main(["infer", f"obs_path={obs}", f"truth_path={truth}", f"out_dir={out}", f"method={name}",
                   f"dates=[{dates[0]},{dates[1]}]", "progress=false", "evaluate.figures=false",
                   f"evaluate.period=[{evalp[0]},{evalp[1]}]", *box, *patch, *extra])
        if rc != 0:
            raise SystemExit(f"oceanda infer method={name} out_dir={out} failed (exit {rc})")
    s = json.loads((out / "scores.json").read_text())
    return {k: s.get(k) for k in KEYS}


def snapshots(run: Path, every: int, with_start: bool = True) -> list[tuple[str, Path, dict]]:
    """``(label, path, history record)`` of the run's snapshots in training order (``start`` first)."""
    import torch

    out = []
    start = run / "snapshots" / "start.pt"
    if with_start and start.is_file():
        ck = torch.load(start, map_location="cpu", weights_only=False)
        out.append(("start", start, {"epoch": -1, "steps": 0, **(ck.get("extra") or {}).get("val_start", {})}))
    eps = sorted((run / "snapshots").glob("epoch_*.pt"))
    for i, p in enumerate(eps):
        if every > 1 and (i + 1) % every and i != len(eps) - 1:
            continue
        ck = torch.load(p, map_location="cpu", weights_only=False)
        rec = ck["history"][-1] if ck.get("history") else {"epoch": ck.get("epoch")}
        out.append((p.stem, p, rec))
    if not out:
        raise SystemExit(f"{run}/snapshots holds no start.pt / epoch_*.pt: train with snapshots=true")
    return out


def table(rows: list[dict], oi: dict) -> str:
    head = ["snapshot", "steps", "val RMSE [m]", "mu", "lambda_x [deg]", "lx / OI", "mu - OI", "RMSE [m]"]
    lines = [head, ["OI", "-", "-", f"{oi['mu']:.3f}", f"{oi['lambda_x_deg']:.3f}", "1.000", "+0.000",
                    f"{oi['rmse_m']:.4f}"]]
    for r in rows:
        lines.append([r["snapshot"], str(r["steps"]), "-" if r.get("val_rmse") is None else f"{r['val_rmse']:.4f}",
                      f"{r['mu']:.3f}", "-" if r["lambda_x_deg"] is None else f"{r['lambda_x_deg']:.3f}",
                      "-" if r["lambda_x_ratio"] is None else f"{r['lambda_x_ratio']:.3f}",
                      f"{r['mu_diff']:+.3f}", f"{r['rmse_m']:.4f}"])
    w = [max(len(c[i]) for c in lines) for i in range(len(head))]
    return "\n".join("  ".join(c[i].rjust(w[i]) for i in range(len(head))) for c in lines)


def figure(rows: list[dict], path: str, title: str, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for k, name in enumerate(names):
        sel = [r for r in rows if r["run"] == k]
        if not sel:
            continue
        steps = [r["steps"] for r in sel]
        ax[0].plot(steps, [r["lambda_x_ratio"] for r in sel], "o-", label=f"4DVarNet {name}")
        ax[1].plot(steps, [r["mu_diff"] for r in sel], "o-")
    ax[0].axhline(1.0, color="k", lw=0.8, label="OI")
    ax[0].axhline(TARGET_RATIO, color="r", ls="--", lw=0.8, label=f"target {TARGET_RATIO}")
    ax[0].set(xlabel="optimiser steps", ylabel="lambda_x / lambda_x(OI)")
    ax[1].axhline(0.0, color="k", lw=0.8)
    ax[1].axhline(TARGET_DMU, color="r", ls="--", lw=0.8)
    ax[1].set(xlabel="optimiser steps", ylabel="mu - mu(OI)")
    ax[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--truth", required=True, help="held-out (validation) truth.zarr")
    ap.add_argument("--obs", required=True, help="its obs.zarr")
    ap.add_argument("--run", required=True, action="append",
                    help="out_dir of `oceanda train ... snapshots=true`; repeat for later stages (each started from "
                         "a snapshot of the one before: its start is not scored again)")
    ap.add_argument("--steps-offset", type=int, action="append", default=None,
                    help="optimiser steps before each later --run (the steps of the snapshot it started from)")
    ap.add_argument("--eval", required=True, help="scored window START,END (inside the held-out OSSE)")
    ap.add_argument("--margin", type=int, default=15, help="days inferred on each side of the window")
    ap.add_argument("--net-patch", default="15,64,64,5,34,34", help="patches of both methods T,H,W,st,sy,sx")
    ap.add_argument("--net-crop", type=int, default=8)
    ap.add_argument("--box", default=None, help="scored box lon0,lon1,lat0,lat1 (default: evaluate's)")
    ap.add_argument("--name", action="append", default=None,
                    help="label of each --run's rows (default stage1, stage2, ...; the first run's rows are unprefixed)")
    ap.add_argument("--every", type=int, action="append", default=None,
                    help="score every N-th epoch snapshot (and the last): once for all runs, or once per --run")
    ap.add_argument("--out", default="runs/learning_curve")
    ap.add_argument("--json", default=None)
    ap.add_argument("--figure", default=None)
    a = ap.parse_args()
    e0, e1 = a.eval.split(",")
    d0 = (date.fromisoformat(e0) - timedelta(days=a.margin)).isoformat()
    d1 = (date.fromisoformat(e1) + timedelta(days=a.margin)).isoformat()
    patch = _patch_args(a.net_patch, a.net_crop)
    box = [] if a.box is None else [f"evaluate.box=[{a.box}]"]
    out = Path(a.out)
    oi = score("oi", a.obs, a.truth, out / "oi", [d0, d1], [e0, e1], patch, [], box)
    rows = []
    offsets = [0] + list(a.steps_offset or [])
    if len(offsets) != len(a.run):
        raise SystemExit(f"{len(a.run) - 1} later --run need as many --steps-offset, got {len(offsets) - 1}")
    names = a.name or [f"stage{k + 1}" for k in range(len(a.run))]
    if len(names) != len(a.run):
        raise SystemExit(f"{len(a.run)} --run need as many --name, got {len(names)}")
    every = a.every or [1]
    every = every * len(a.run) if len(every) == 1 else every
    if len(every) != len(a.run):
        raise SystemExit(f"--every: give one value or one per --run ({len(a.run)}), got {len(every)}")
    snaps = []
    for k, (run, off) in enumerate(zip(a.run, offsets)):
        for label, path, rec in snapshots(Path(run), every[k], with_start=k == 0):
            snaps.append((label if k == 0 else f"{names[k]}_{label}", path,
                          rec | {"steps": off + int(rec.get("steps") or 0), "run": k}))
    for label, path, rec in snaps:
        r = score("4dvarnet", a.obs, a.truth, out / label, [d0, d1], [e0, e1], patch,
                  [f"method.checkpoint={path}"], box)
        ratio = None if r["lambda_x_deg"] is None or oi["lambda_x_deg"] is None else r["lambda_x_deg"] / oi["lambda_x_deg"]
        rows.append({"snapshot": label, "run": rec["run"], "epoch": rec.get("epoch"), "steps": rec.get("steps"),
                     "val_rmse": rec.get("val_rmse"), **r, "lambda_x_ratio": ratio, "mu_diff": r["mu"] - oi["mu"]})
        print(f"{label}: steps {rec.get('steps')}, mu {r['mu']:.3f} ({r['mu'] - oi['mu']:+.3f} vs OI), lambda_x "
              + ("-" if ratio is None else f"{r['lambda_x_deg']:.3f} deg ({ratio:.3f} x OI)"), flush=True)
    print()
    print(table(rows, oi))
    # each run validates on its own window (a later stage may use another): compare val RMSEs within a run only
    selected = []
    for k in range(len(a.run)):
        mine = [r for r in rows if r["run"] == k and r.get("val_rmse") is not None]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["val_rmse"])
        selected.append(best["snapshot"])
        print(f"{names[k]}: selected by its validation RMSE: {best['snapshot']} (lambda_x "
              + ("-" if best["lambda_x_ratio"] is None else f"{best['lambda_x_ratio']:.3f}")
              + f" x OI, mu {best['mu_diff']:+.3f}; targets <= {TARGET_RATIO} and >= +{TARGET_DMU})")
    if a.json:
        Path(a.json).write_text(json.dumps({"eval": [e0, e1], "dates": [d0, d1], "truth": a.truth, "obs": a.obs,
                                            "runs": a.run, "steps_offset": offsets, "net_patch": a.net_patch, "names": names, "oi": oi,
                                            "rows": rows, "selected": selected}, indent=1))
    if a.figure:
        figure(rows, a.figure, f"held-out {e0}..{e1} ({Path(a.obs).parent.name}), patches {a.net_patch}", names)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
