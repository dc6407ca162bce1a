"""Scan the double gyre's physics: continue the shipped state (or ``--from-state``) with changed
parameters, then diagnose the Gulf Stream box, one setting after the other (resumable).

Each setting ``NAME`` runs, in ``ROOT/NAME``::

    python hpc/truth/gyre_spinup.py --work ROOT/NAME --out ROOT/NAME/gyre_state.npz --nx NX \\
        --steps-per-day S --from-state STATE --fine-years ADJUST/365 --stats-days DAYS --save-daily FLAGS
    python hpc/truth/spinup_diagnostics.py ROOT/NAME --x0-km X0... --json ROOT/NAME/diag.json

(``FLAGS`` the setting's physics flags of ``gyre_spinup.py``: ``--tau0 --drag --beta --H --g-prime
--wind-tilt --upwind``), and a setting whose ``diag.json`` exists is skipped. ``--table`` prints
every finished setting under ``ROOT`` as a markdown table next to the issue's targets, with the
basin energy at the end of the adjustment and of the diagnosed days, and along the jet the
east/west power ratio of the anomalies at wavelengths 600-2000 and 300-600 km
(``jet_phase`` of ``spinup_diagnostics.py``; also read from ``ROOT/NAME/phase700.json``, a rerun
of it at ``--x0-km 700``, for settings diagnosed before it had them).

    OMP_NUM_THREADS=1 nice -n 10 python hpc/truth/gyre_scan.py --root runs/scan \\
        --setting tau012 "--tau0 0.12" --setting up05 "--upwind 0.5"
    python hpc/truth/gyre_scan.py --root runs/scan --table
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (key of spinup_diagnostics' summary, column title, format, target test)
COLUMNS = [
    ("step_m", "step m", "{:.2f}", lambda v: v >= 0.8),
    ("meander_deg", "meander deg", "{:.2f}", lambda v: v >= 1.0),
    ("eddies_north", "eddies N", "{:.2f}", lambda v: v > 0),
    ("eddies_south", "eddies S", "{:.2f}", lambda v: v > 0),
    ("u_south_km_day", "u south km/d", "{:+.1f}", lambda v: v < 0),
    ("u_jet_km_day", "u jet km/d", "{:+.1f}", lambda v: v > 0),
    ("std_mean_m", "std m", "{:.3f}", lambda v: 0.15 <= v <= 0.35),
    ("std_jet_over_rest", "std jet/rest", "{:.2f}", lambda v: v > 1),
    ("slope_zonal", "slope x", "{:.2f}", lambda v: -5 <= v <= -3.5),
    ("slope_meridional", "slope y", "{:.2f}", lambda v: -5 <= v <= -3.5),
    ("lap_kurtosis_ratio", "kurt ratio", "{:.2f}", lambda v: v >= 2),
    ("grad_ratio", "grad ratio", "{:.2f}", lambda v: v >= 1.8),
]


def run_setting(a: argparse.Namespace, name: str, flags: str) -> None:
    work = Path(a.root) / name
    if (work / "diag.json").is_file():
        print(f"[{name}] done already", flush=True)
        return
    work.mkdir(parents=True, exist_ok=True)
    (work / "flags.txt").write_text(flags + "\n")
    spin = [sys.executable, str(HERE / "gyre_spinup.py"), "--work", str(work), "--out", str(work / "gyre_state.npz"),
            "--nx", str(a.nx), "--steps-per-day", str(a.steps_per_day), "--from-state", a.from_state,
            "--fine-years", repr(a.adjust_days / 365.0), "--stats-days", str(a.stats_days), "--save-daily",
            *shlex.split(flags)]
    diag = [sys.executable, str(HERE / "spinup_diagnostics.py"), str(work), "--x0-km", *map(str, a.x0_km),
            "--json", str(work / "diag.json")]
    for cmd, log in ((spin, "spinup.log"), (diag, "diag.log")):
        with open(work / log, "a") as f:
            print(f"[{name}] {shlex.join(cmd)}", flush=True)
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            print(f"[{name}] failed ({work / log})", flush=True)
            return
    print(f"[{name}] done: {work / 'diag.json'}", flush=True)


def energies(work: Path) -> tuple[float, float]:
    """Basin energy at the end of the adjustment and at the end of the diagnosed days (the logs)."""
    fine = stats = float("nan")
    for line in (work / "spinup.log").read_text().splitlines():
        m = re.match(r"\[(fine|stats)\] day \d+/\d+\s+energy (\S+)", line)
        if m:
            if m.group(1) == "fine":
                fine = float(m.group(2))
            else:
                stats = float(m.group(2))
    return fine, stats


def table(root: Path, only_x0: float | None = None) -> str:
    rows = ["| setting | flags | x0 km | E adj / end | " + " | ".join(c[1] for c in COLUMNS)
            + " | jet E/W power, 600-2000 / 300-600 km |",
            "|---|---|---|---|" + "---|" * (len(COLUMNS) + 1)]
    for d in sorted(p for p in root.iterdir() if (p / "diag.json").is_file()):
        res = json.loads((d / "diag.json").read_text())
        flags = (d / "flags.txt").read_text().strip() if (d / "flags.txt").is_file() else ""
        e0, e1 = energies(d)
        extra = json.loads((d / "phase700.json").read_text())["boxes"] if (d / "phase700.json").is_file() else {}
        for x0, s in res["boxes"].items():
            if only_x0 is not None and float(x0) != only_x0:
                continue
            phase = s.get("jet_phase") or extra.get(x0, {}).get("jet_phase")
            cells = []
            for key, _, fmt, ok in COLUMNS:
                v = s[key]
                cells.append(("**" + fmt.format(v) + "**") if ok(v) else fmt.format(v))
            cells.append(f"{phase[0]['east_over_west']:.2f} / {phase[1]['east_over_west']:.2f}" if phase else "")
            rows.append(f"| {d.name} | `{flags}` | {float(x0):g} | {e0:.0f} / {e1:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True)
    ap.add_argument("--setting", nargs=2, action="append", default=[], metavar=("NAME", "FLAGS"))
    ap.add_argument("--from-state", default=str(HERE.parents[1] / "src/oceanda/dynamics/data/gyre_state.npz"))
    ap.add_argument("--nx", type=int, default=160)
    ap.add_argument("--steps-per-day", type=int, default=24)
    ap.add_argument("--adjust-days", type=int, default=200)
    ap.add_argument("--stats-days", type=int, default=180)
    ap.add_argument("--x0-km", type=float, nargs="+", default=[600.0, 700.0, 800.0])
    ap.add_argument("--table", action="store_true", help="print the finished settings (bold: target met)")
    ap.add_argument("--table-x0", type=float, default=None, help="only the boxes at this x0 [km] in the table")
    a = ap.parse_args()
    for name, flags in a.setting:
        run_setting(a, name, flags)
    if a.table:
        print(table(Path(a.root), a.table_x0))


if __name__ == "__main__":
    main()
