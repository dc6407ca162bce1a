"""Spin up the double-gyre truth (``truth=gyre``) once, offline, and write the state shipped
with the package (``src/oceanda/dynamics/data/gyre_state.npz``).

Stages, each resumable (a checkpoint every ``--ckpt-days`` model days in ``--work``; rerun the
same command after an interruption and it continues from the last one):

1. ``coarse``: ``--coarse-years`` from rest on a grid twice as coarse (``nx/2``; cheap: the
   gyres and the separated jet form, baroclinic adjustment takes years);
2. ``fine``: the coarse state interpolated (cubic splines on the vertex grid) to ``nx``, then
   ``--fine-years`` at full resolution, its eddies equilibrate;
3. ``stats``: ``--stats-days`` more days whose daily upper-layer SSH is averaged (time mean and
   std at the vertices, saved to ``stats.npz``) to place the Gulf Stream box on the jet: the
   box centre ``(x0, y0)`` is ``--x0-km`` from the western wall, on the time-mean jet (the
   median over the box's columns of the latitude of the largest mean meridional SSH drop).
   Rerunning the finished command with another ``--x0-km`` only rewrites the state file.
   ``--save-daily`` also keeps these daily maps (``WORK/daily``) for diagnostics of the spin-up.

``--from-state FILE`` replaces stage 1 by a spun-up state (e.g. the shipped one at a coarser
resolution), interpolated onto ``nx`` the same way: a finer truth without a new spin-up from rest.
The physics flags (``--tau0 --drag --beta --H --g-prime --wind-tilt --upwind``) override the
state's parameters there (unset: the state's), so stage 2 continues it with changed physics;
from rest, unset flags take :class:`GyreParams`' defaults. ``hpc/truth/gyre_scan.py`` scans them.

The state at the end of stage 3 is written with its reference date ``--date`` (float32 psi,
compressed) and the box centre; the truth of any later date continues from it.

    OMP_NUM_THREADS=1 nice -n 10 python hpc/truth/gyre_spinup.py --work runs/gyre_spinup   # the shipped state
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from oceanda.dynamics import gyre  # noqa: E402


def refine(coarse: gyre.GyreModel, psi: torch.Tensor, fine: gyre.GyreModel) -> torch.Tensor:
    """Cubic-spline interpolation of a vertex field onto a grid with the same walls."""
    from scipy.ndimage import zoom

    out = []
    for f in psi.cpu().numpy():
        z = zoom(f, ((fine.p.ny + 1) / (coarse.p.ny + 1), (fine.p.nx + 1) / (coarse.p.nx + 1)),
                 order=3, mode="nearest", grid_mode=False)
        z[0, :], z[-1, :], z[:, 0], z[:, -1] = f[0, 0], f[0, 0], f[0, 0], f[0, 0]
        out.append(z)
    return torch.as_tensor(np.stack(out), dtype=fine.dtype, device=fine.device)


def jet_y0_km(mean: np.ndarray, p: gyre.GyreParams, x0_km: float, half_width_km: float) -> float:
    """The box centre's y [km] on the jet: per column of the box's zonal extent (``x0_km`` +-
    ``half_width_km``) of the time-mean vertex SSH ``mean``, the latitude of the largest
    meridional SSH drop; their median."""
    i0 = int(round((x0_km - half_width_km) * 1e3 / p.dx))
    i1 = int(round((x0_km + half_width_km) * 1e3 / p.dx)) + 1
    js = np.argmax(-np.diff(mean[:, max(i0, 0):i1], axis=0), axis=0)
    return float(np.median((js + 0.5) * p.dy / 1e3))


def run_stage(name: str, model: gyre.GyreModel, q: torch.Tensor, psi: torch.Tensor, days: int, work: Path,
              ckpt_days: int, on_day=None, extra=None) -> tuple[torch.Tensor, torch.Tensor]:
    ck = work / f"{name}.pt"
    done = 0
    if ck.exists():
        state = torch.load(ck)
        q, psi, done = state["q"], state["psi"], state["day"]
        if extra is not None and "extra" in state:
            extra.update(state["extra"])
        print(f"[{name}] resumed at day {done}", flush=True)
    t = time.perf_counter()
    while done < days:
        n = min(ckpt_days, days - done)
        q, psi = model.run(q, psi, n, callback=on_day)
        done += n
        e = model.ssh(psi[0])
        print(f"[{name}] day {done}/{days}  energy {model.energy(psi).item():.4g}  courant {model.courant(psi):.2f}  "
              f"ssh {e.min().item():+.2f}..{e.max().item():+.2f} m  {time.perf_counter() - t:.0f} s", flush=True)
        tmp = ck.with_suffix(".tmp")
        torch.save({"q": q, "psi": psi, "day": done, "extra": dict(extra or {})}, tmp)
        os.replace(tmp, ck)
    return q, psi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="checkpoint folder (resumable)")
    ap.add_argument("--out", default=str(gyre.STATE_FILE), help="state file to write")
    ap.add_argument("--nx", type=int, default=160)
    ap.add_argument("--L-km", type=float, default=2048.0)
    ap.add_argument("--tau0", type=float, default=None, help="wind stress [N/m^2] (default 0.08 or the state's)")
    ap.add_argument("--drag", type=float, default=None, help="bottom drag [1/s] (default 3.6e-8 or the state's)")
    ap.add_argument("--beta", type=float, default=None, help="[1/m/s] (default 1.754e-11 or the state's)")
    ap.add_argument("--H", type=float, nargs="+", default=None, help="layer thicknesses [m], top first")
    ap.add_argument("--g-prime", type=float, nargs="+", default=None, help="reduced gravities [m/s^2], g first")
    ap.add_argument("--wind-tilt", type=float, default=None, help="slope dy/dx of the zero-wind-curl line")
    ap.add_argument("--upwind", type=float, default=None, help="upwind weight of the PV reconstruction in [0, 1]")
    ap.add_argument("--steps-per-day", type=int, default=24)
    ap.add_argument("--coarse-years", type=float, default=5.0)
    ap.add_argument("--fine-years", type=float, default=1.5)
    ap.add_argument("--stats-days", type=int, default=120)
    ap.add_argument("--ckpt-days", type=int, default=30)
    ap.add_argument("--x0-km", type=float, default=700.0, help="box centre: distance from the western wall")
    ap.add_argument("--half-width-km", type=float, default=440.0,
                    help="half the box's zonal extent (the Gulf Stream box: 10 deg at 38N = 2 x 440 km)")
    ap.add_argument("--from-state", default=None,
                    help="start stage 2 from this state file (interpolated to --nx) instead of stage 1")
    ap.add_argument("--save-daily", action="store_true",
                    help="also keep the daily basin SSH of stage 3 (WORK/daily/NNNN.npy, float32) for diagnostics")
    ap.add_argument("--date", default="2012-09-01", help="reference date of the written state")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                    help="of the integration (float32: about 1.7x faster, for scans; the shipped state: float64)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    L = a.L_km * 1e3
    physics = {k: v for k, v in (("tau0", a.tau0), ("drag", a.drag), ("beta", a.beta), ("wind_tilt", a.wind_tilt),
                                 ("upwind", a.upwind), ("H", tuple(a.H) if a.H else None),
                                 ("g_prime", tuple(a.g_prime) if a.g_prime else None)) if v is not None}
    fine_p = gyre.GyreParams(nx=a.nx, ny=a.nx, Lx=L, Ly=L, steps_per_day=a.steps_per_day, **physics)
    coarse_p = replace(fine_p, nx=a.nx // 2, ny=a.nx // 2, steps_per_day=max(a.steps_per_day // 2, 1))
    dtype = getattr(torch, a.dtype)
    fine, coarse = gyre.GyreModel(fine_p, dtype=dtype), gyre.GyreModel(coarse_p, dtype=dtype)
    print(f"basin {a.L_km:g} km, {a.nx}x{a.nx} ({fine_p.dx / 1e3:.1f} km), Rossby radii {fine.rossby_radii_km[1:]} km",
          flush=True)
    t0 = time.perf_counter()
    if a.from_state:
        src_p, src_psi, _, _ = gyre.load_state(a.from_state)
        if (src_p.Lx, src_p.Ly) != (fine_p.Lx, fine_p.Ly):
            raise SystemExit(f"--from-state {a.from_state}: its basin differs from --L-km {a.L_km:g}")
        if len(physics.get("H", src_p.H)) != src_p.nl or len(physics.get("g_prime", src_p.g_prime)) != src_p.nl:
            raise SystemExit(f"--from-state {a.from_state}: --H / --g-prime need its {src_p.nl} layers")
        fine_p = replace(src_p, nx=a.nx, ny=a.nx, steps_per_day=a.steps_per_day, **physics)
        fine, coarse = gyre.GyreModel(fine_p, dtype=dtype), gyre.GyreModel(src_p, dtype=dtype)
        print(f"continued with {fine_p} (Rossby radii {fine.rossby_radii_km[1:]} km)", flush=True)
        psi = torch.as_tensor(src_psi, dtype=dtype)
        print(f"from {a.from_state}: {src_p.nx}x{src_p.ny} -> {a.nx}x{a.nx}", flush=True)
    else:
        q, psi = coarse.rest_state()
        q, psi = run_stage("coarse", coarse, q, psi, int(round(a.coarse_years * 365)), work, a.ckpt_days)
    psi = refine(coarse, psi, fine)
    q = fine.q_from_psi(psi)
    q, psi = run_stage("fine", fine, q, psi, int(round(a.fine_years * 365)), work, a.ckpt_days)
    acc = {"s1": torch.zeros_like(psi[0]), "s2": torch.zeros_like(psi[0]), "n": 0}

    def on_day(_d: int, psi1: torch.Tensor) -> None:
        e = fine.ssh(psi1)
        e = e - fine.to_cells(e).mean()
        acc["s1"] += e
        acc["s2"] += e * e
        if a.save_daily:  # indexed by the day of stage 3 (restored from its checkpoint on resume)
            (work / "daily").mkdir(exist_ok=True)
            np.save(work / "daily" / f"{acc['n']:04d}.npy", e.cpu().numpy().astype(np.float32))
        acc["n"] += 1

    q, psi = run_stage("stats", fine, q, psi, a.stats_days, work, a.ckpt_days, on_day=on_day, extra=acc)
    mean = (acc["s1"] / acc["n"]).cpu().numpy()
    std = np.sqrt(np.maximum((acc["s2"] / acc["n"]).cpu().numpy() - mean**2, 0))
    np.savez_compressed(work / "stats.npz", mean=mean, std=std, dx=fine_p.dx)
    y0_km = jet_y0_km(mean, fine_p, a.x0_km, a.half_width_km)
    meta = {"x0_km": a.x0_km, "y0_km": y0_km, "spinup": vars(a), "params": asdict(fine_p),
            "seconds_this_invocation": time.perf_counter() - t0}
    gyre.save_state(a.out, fine_p, psi, a.date, meta)
    print(f"wrote {a.out} ({Path(a.out).stat().st_size / 1e6:.2f} MB): jet at y0 = {y0_km:.0f} km, "
          f"box centre x0 = {a.x0_km:g} km", flush=True)
    print(json.dumps(meta, default=str))


if __name__ == "__main__":
    main()
