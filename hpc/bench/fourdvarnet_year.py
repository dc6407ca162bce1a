"""4DVarNet inference throughput: a Gulf Stream year and a North Atlantic 1/20 deg year.

Measures the cost of one anchor patch (15 x 240 x 240, the starter's model size: bilinear AE
prior hidden 32 + ConvLSTM hidden 48, 10 solver steps) on this machine (CPU threads, or the
CUDA device when one is present), for each arithmetic setting of oceanda's model
(``float32``; ``bf16``: bfloat16 convolutions; ``bf16+fused``: plus the ConvLSTM cell as one
compiled kernel) and, side by side in the same run, for the faithful re-implementation of the
public 4dvarnet-starter (``hpc/bench/fourdvarnet.py``, same weights).

Year times are (number of patches) x (measured cost per patch): the number of patches is
the real one of the inference driver (:func:`oceanda.data.patches.make_patches` with the
anchor geometry ``configs/patch/anchor.yaml``: stride 1 day x 200 x 200 cells, crop 20,
land-only patches skipped) on

- ``gulfstream_train`` (-66..-54 x 32..44 at 1/20 deg, 240 x 240 cells): 4 patches a day;
- ``natl`` (``configs/domain/natl.yaml``, -77..5 x 27..64 at 1/20 deg, 740 x 1640 cells).

Blending, I/O and the observation gridding are not included (measured separately by
``hpc/bench/infer.py``); they are small next to the model on a CPU.

Timings: the minimum over ``--repeat`` runs after a warm-up (which also compiles the fused
cell), wall and process CPU time. On a machine shared with other jobs the wall time is
inflated by descheduling; ``cpu/thr`` = CPU time / threads is the wall time the same work
takes when the threads have the cores to themselves (an estimate, labelled as such).

usage: OMP_NUM_THREADS=2 python hpc/bench/fourdvarnet_year.py [--threads 2] [--batch 1 2]
       [--repeat 2] [--variants float32 bf16 bf16+fused] [--no-ref] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from oceanda.assim.fourdvarnet import FourDVarNet
from oceanda.data.domains import get_domain
from oceanda.data.patches import PatchGeometry, make_patches

VARIANTS = {"float32": ("float32", False), "bf16": ("bf16", False), "bf16+fused": ("bf16", True)}


def _bench_module():
    path = Path(__file__).resolve().with_name("fourdvarnet.py")
    spec = importlib.util.spec_from_file_location("bench_fourdvarnet", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_fourdvarnet", mod)
    spec.loader.exec_module(mod)
    return mod


def patch_counts(days: int = 365) -> dict[str, dict]:
    """Anchor-geometry patch counts of a ``days``-day year on the two domains."""
    geom = PatchGeometry(size=(15, 240, 240), stride=(1, 200, 200), crop=(20, 20))
    out = {}
    for name in ("gulfstream_train", "natl"):
        g = get_domain(name)
        ps = make_patches(geom, (days, *g.shape), g.ocean)
        out[name] = dict(shape=list(g.shape), ocean_fraction=float(g.ocean.mean()), patches=len(ps),
                         per_day=len(ps) / days)
    return out


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev):
    _sync(dev)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(dev)
    return time.perf_counter() - w0, time.process_time() - c0


def measure(device, threads, batches, repeat, variants, with_ref):
    bench = _bench_module()
    ref, ours = bench.build_pair()  # same weights, the starter's size
    ref.eval(), ours.eval()
    ref.to(device), ours.to(device)
    models = {}
    for v in variants:
        prec, fuse = VARIANTS[v]
        models[v] = copy.deepcopy(ours).set_precision(prec, fuse)
    rows = []
    for nt in threads:
        if device.type == "cpu":
            torch.set_num_threads(nt)
        for B in batches:
            obs1, _ = bench.synthetic_patch()  # (1, 15, 240, 240), 3 % observed
            obs = obs1.expand(B, -1, -1, -1).contiguous().to(device)
            ocean = torch.ones(B, 240, 240, dtype=torch.bool, device=device)
            cases = []
            if with_ref:
                cases.append(("starter (ref)", lambda: ref(obs)))
            for v, m in models.items():
                def go(m=m):
                    with torch.inference_mode():
                        m(obs, ocean)
                cases.append((f"ours {v}", go))
            for name, fn in cases:
                fn()  # warm-up (compiles the fused cell for this shape)
            res = {name: [] for name, _ in cases}
            for _ in range(repeat):  # interleaved: background load hits all cases alike
                for name, fn in cases:
                    res[name].append(_time(fn, device))
            for name, _ in cases:
                w = min(t[0] for t in res[name]) / B
                c = min(t[1] for t in res[name]) / B
                rows.append(dict(case=name, threads=nt if device.type == "cpu" else None, batch=B,
                                 wall_s_per_patch=w, cpu_s_per_patch=c))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="patches per forward (default 1 2 on CPU, 1 8 32 on CUDA)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--no-ref", action="store_true", help="skip the starter re-implementation")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    batches = a.batch or ([1, 8, 32] if dev.type == "cuda" else [1, 2])
    counts = patch_counts(a.days)
    rows = measure(dev, a.threads, batches, a.repeat, a.variants, not a.no_ref)
    gs, na = counts["gulfstream_train"]["patches"], counts["natl"]["patches"]
    dname = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} max threads)"
    print(f"4DVarNet anchor patch 15x240x240 (prior hidden 32, LSTM hidden 48, 10 steps) on {dname}, torch {torch.__version__}")
    for k, c in counts.items():
        print(f"  {k}: {c['shape'][0]} x {c['shape'][1]} cells, {100 * c['ocean_fraction']:.0f} % ocean: "
              f"{c['patches']} patches in {a.days} days ({c['per_day']:.1f}/day, land-only skipped)")
    print("per patch: min over --repeat interleaved runs; year = patches x per-patch time")
    cpu = dev.type == "cpu"
    hdr = f"{'case':<20}{'thr':>4}{'batch':>6}{'wall/p s':>10}"
    if cpu:
        hdr += f"{'cpu/p s':>9}{'cpu/thr':>9}"
    hdr += f"{'GS yr min':>11}{'NATL yr h':>11}"
    if cpu:
        hdr += f"{'GS min cpu/thr':>16}{'NATL h cpu/thr':>16}"
    print(hdr)
    for r in rows:
        w = r["wall_s_per_patch"]
        r["gulfstream_year_min_wall"] = gs * w / 60
        r["natl_year_h_wall"] = na * w / 3600
        line = f"{r['case']:<20}{r['threads'] or '-':>4}{r['batch']:>6}{w:>10.3f}"
        if cpu:
            ct = r["cpu_s_per_patch"] / r["threads"]
            r["gulfstream_year_min_cpu_per_thread"] = gs * ct / 60
            r["natl_year_h_cpu_per_thread"] = na * ct / 3600
            line += f"{r['cpu_s_per_patch']:>9.3f}{ct:>9.3f}"
        line += f"{r['gulfstream_year_min_wall']:>11.1f}{r['natl_year_h_wall']:>11.2f}"
        if cpu:
            line += f"{r['gulfstream_year_min_cpu_per_thread']:>16.1f}{r['natl_year_h_cpu_per_thread']:>16.2f}"
        print(line)
    refs = {(r["threads"], r["batch"]): r for r in rows if r["case"] == "starter (ref)"}
    for r in rows:
        ref = refs.get((r["threads"], r["batch"]))
        if ref and r is not ref:
            r["speedup_wall"] = ref["wall_s_per_patch"] / r["wall_s_per_patch"]
            r["speedup_cpu"] = ref["cpu_s_per_patch"] / r["cpu_s_per_patch"]
            print(f"  {r['case']:<18} thr {r['threads'] or '-'} batch {r['batch']}: "
                  f"{r['speedup_wall']:.2f}x (wall) {r['speedup_cpu']:.2f}x (cpu) vs the starter")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": dname, "torch": torch.__version__, "counts": counts, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
