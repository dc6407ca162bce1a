"""``report.json``, ``report.md`` and figures of a validation experiment.

``report.json`` has one entry per method (``z0``, ``var4d``, ``cold_diffusion``, ``neural``,
``neural_var4d``) with ``rmse`` (normalised units), ``rmse_raw`` (physical units),
``time_per_window_ms`` and, for the 4D-Var runs, ``gn_iters_median``; the references and
variants of :data:`~oceanda.validation.runner.EXTRA` (``particle_smoother`` with its effective
sample size, ``var4d_from_truth``, ``neural_var4d_single`` (the single-start polish when
``neural_var4d`` is the multi-start one), the cold-diffusion polish and the near-strong-constraint
``*_strong`` runs) in the same format; plus ``checks`` (the paper's relations and the
reference's, each with our numbers and whether it holds) and ``meta``.
``report.md`` lays the numbers out as the paper's Table 1 with two more columns (first
guess, neural + 4D-Var polish).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from oceanda.data.files import write_bytes_atomic
from oceanda.plots import validation as vplots
from oceanda.validation.runner import EXTRA, METHODS, ExperimentResult

NAMES = {
    "z0": "First guess z0",
    "var4d": "4D-Var",
    "cold_diffusion": "Cold diffusion",
    "neural": "Neural assimilation",
    "neural_var4d": "Neural + 4D-Var polish",
    "neural_var4d_single": "Neural + 4D-Var polish, single start",
    "particle_smoother": "Particle smoother (Bayes-optimal reference)",
    "var4d_from_truth": "4D-Var started from the truth",
    "cold_diffusion_var4d": "Cold diffusion + 4D-Var polish",
    "var4d_strong": "4D-Var near-strong constraint",
    "neural_var4d_strong": "Neural + near-strong 4D-Var polish",
    "cold_diffusion_var4d_strong": "Cold diffusion + near-strong 4D-Var polish",
}
PAPER = {  # Blanke et al. (2024), Table 1 and Sec. 4.2 (metric not defined there)
    "lorenz63": {"var4d": 0.9, "cold_diffusion": 1.1, "neural": 0.5},
    "pendulum": {"var4d": 0.1, "cold_diffusion": 0.15, "neural": 0.12},
    "time": {"var4d": 10, "cold_diffusion": 1, "neural": 2},
}
LABELS = {"lorenz63": ["u1", "u2", "u3"], "pendulum": ["angle q", "momentum p"]}


def paper_checks(system: str, metrics: dict, extra: dict) -> list[dict]:
    """The relations the paper reports, evaluated on our numbers."""
    r = {m: metrics[m]["rmse"] for m in METHODS}
    t = {m: metrics[m]["time_per_window_ms"] for m in METHODS}
    speed = t["var4d"] / max(t["neural"], 1e-12)
    out = []
    if system == "lorenz63":
        pol = "neural_var4d_single" if "neural_var4d_single" in metrics else "neural_var4d"  # one start, as the paper
        it_ratio = metrics["var4d"]["gn_iters_median"] / max(metrics[pol]["gn_iters_median"], 1.0)
        out += [
            dict(check="RMSE neural < 4D-Var from z0 < cold diffusion", paper="0.5 < 0.9 < 1.1",
                 ours=f"{r['neural']:.3f} / {r['var4d']:.3f} / {r['cold_diffusion']:.3f}",
                 holds=r["neural"] < r["var4d"] < r["cold_diffusion"]),
            dict(check="neural + 4D-Var polish has the lowest RMSE", paper="yes (Fig. 3)",
                 ours=f"{r['neural_var4d']:.3f} vs min of others {min(r[m] for m in METHODS if m != 'neural_var4d'):.3f}",
                 holds=all(r["neural_var4d"] <= r[m] + 1e-9 for m in METHODS)),
            dict(check="GN iterations (median) 4D-Var from z0 / from neural >= 4", paper="23 / 4 (one sample)",
                 ours=f"{metrics['var4d']['gn_iters_median']:g} / {metrics[pol]['gn_iters_median']:g}"
                      f" = {it_ratio:.2f}", holds=it_ratio >= 4),
        ]
    else:
        la = extra.get("large_angle", {})
        well = max(r["var4d"], r["cold_diffusion"], r["neural"])
        out += [
            dict(check="all methods reconstruct well (RMSE of 4D-Var, cold diffusion, neural <= 0.15)",
                 paper="0.1 / 0.15 / 0.12",
                 ours=f"{r['var4d']:.3f} / {r['cold_diffusion']:.3f} / {r['neural']:.3f}", holds=well <= 0.15),
            dict(check="neural one-shot beats z0 clearly outside the linear regime (RMSE <= z0/2 on windows "
                       "with max|q| > 45 deg)", paper="Fig. 1",
                 ours=f"{la.get('neural', math.nan):.3f} vs z0 {la.get('z0', math.nan):.3f} "
                      f"({la.get('n_windows', 0)} windows)",
                 holds=bool(la) and la["neural"] <= 0.5 * la["z0"]),
        ]
    if "particle_smoother" in metrics:
        ps = metrics["particle_smoother"]["rmse"]
        out += [
            dict(check="RMSE neural < cold diffusion < 4D-Var from z0", paper="issue 14 at dt = 0.05",
                 ours=f"{r['neural']:.3f} / {r['cold_diffusion']:.3f} / {r['var4d']:.3f}",
                 holds=r["neural"] < r["cold_diffusion"] < r["var4d"]),
            dict(check="neural within 1.5x of the particle smoother", paper="-",
                 ours=f"{r['neural']:.3f} vs {ps:.3f} ({r['neural'] / ps:.2f}x)", holds=r["neural"] <= 1.5 * ps),
            dict(check="neural + 4D-Var polish within 1.1x of the particle smoother and below 4D-Var from z0",
                 paper="-", ours=f"{r['neural_var4d']:.3f} vs {ps:.3f} ({r['neural_var4d'] / ps:.2f}x), "
                                 f"4D-Var {r['var4d']:.3f}",
                 holds=r["neural_var4d"] <= 1.1 * ps and r["neural_var4d"] < r["var4d"]),
        ]
    if "neural_var4d_strong" in metrics:
        a, b = metrics["var4d_strong"]["gn_iters_median"], metrics["neural_var4d_strong"]["gn_iters_median"]
        same = ((extra.get("polish_damping") or {}).get("with_lm_init") or {}).get("neural_var4d_strong")
        note = (f" (polish damping {extra['polish_damping']['polish_lm_init']:g}; with z0's damping "
                f"{a:g} / {same['gn_iters_median']:g} = {a / max(same['gn_iters_median'], 1.0):.2f})" if same else "")
        out.append(dict(check="near-strong 4D-Var: GN iterations (median) from z0 / from neural >= 4",
                        paper="23 / 4 (one sample)", ours=f"{a:g} / {b:g} = {a / max(b, 1.0):.2f}{note}",
                        holds=a / max(b, 1.0) >= 4))
    out.append(dict(check="neural inference >= 5x faster than 4D-Var", paper="2 vs 10",
                    ours=f"{t['neural']:.3g} ms vs {t['var4d']:.3g} ms per window ({speed:.1f}x)", holds=speed >= 5))
    return out


def expected_check(metrics: dict, settings: dict, preset: str) -> list[dict]:
    """This run's RMSE against the experiment's ``expected`` results for ``preset`` (the
    numbers measured on the same fixed seeds, kept in ``configs/experiment/*.yaml``): one
    row per method with ``expected``, ``measured``, ``rel_tol`` and ``within``. Empty when
    the experiment holds no expectation for this preset or the data settings differ."""
    exp = (settings.get("expected") or {}).get(preset)
    if not exp:
        return []
    if any(settings.get("data", {}).get(k) != v for k, v in (exp.get("data") or {}).items()):
        return []  # another setting (e.g. dt=) than the one the numbers were measured at
    tol = exp.get("rel_tol") or {}
    out = []
    for m, value in (exp.get("rmse") or {}).items():
        if m not in metrics:
            continue
        got = metrics[m]["rmse"]
        t = float(tol.get(m, tol.get("default", 0.1)))
        out.append({"method": m, "expected": value, "measured": got, "rel_tol": t,
                    "within": abs(got - value) <= t * value})
    return out


def _json_clean(obj):
    """NaN / inf -> None (strict JSON), tensors and numpy scalars -> floats."""
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    v = float(obj)
    return v if math.isfinite(v) else None


def _atomic_write(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def markdown(system: str, preset: str, metrics: dict, checks: list[dict], meta: dict) -> str:
    fastest = min(metrics[m]["time_per_window_ms"] for m in METHODS if m != "z0")
    cols = list(METHODS)
    head = "| | " + " | ".join(NAMES[m] for m in cols) + " |"
    sep = "|---" * (len(cols) + 1) + "|"

    def row(label, fn):
        return f"| {label} | " + " | ".join(fn(m) for m in cols) + " |"

    sysname = "Lorenz 63" if system == "lorenz63" else "Pendulum"
    lines = [
        f"# oceanda validate: {sysname} (preset `{preset}`)",
        "",
        "Reproduces Table 1 of Blanke, Fablet & Lelarge (2024), *Neural Incremental Data Assimilation*, "
        "with two more columns (the first guess and the neural output polished by 4D-Var).",
        "",
        (f"Test set: {meta['n_test_windows']} windows = held-out trajectories x every observation process, "
         f"the family training used (observed times {meta['processes_test']}), with new noise; the processes "
         "held out of a diagnostic model's training: see below."
         if meta.get("process_family") == "all" else
         f"Test set: {meta['n_test_windows']} windows = held-out trajectories x held-out observation processes "
         f"(observed times {meta['processes_test']}; training used {meta['processes_train']})."),
        "",
        head, sep,
        row(f"{sysname} error: RMSE, normalised units", lambda m: f"{metrics[m]['rmse']:.4f}"),
        row(f"{sysname} error: RMSE, physical units", lambda m: f"{metrics[m]['rmse_raw']:.4f}"),
        row("Computational time (unit: fastest method)",
            lambda m: "-" if m == "z0" else f"{metrics[m]['time_per_window_ms'] / fastest:.1f}"),
        row("Time per window (ms)", lambda m: f"{metrics[m]['time_per_window_ms']:.3g}"),
        row("Gauss-Newton iterations (median / mean)",
            lambda m: (f"{metrics[m]['gn_iters_median']:g} / {metrics[m]['gn_iters_mean']:.1f}"
                       if "gn_iters_median" in metrics[m] else "-")),
        row("Paper (Table 1) error", lambda m: str(PAPER[system].get(m, "-"))),
        row("Paper computational time", lambda m: str(PAPER["time"].get(m, "-"))),
        "",
        "RMSE: root mean square over every entry (all times, all components) of every test window. "
        "Normalised units: each component has zero mean and unit variance over the training trajectories "
        f"(means {np.round(meta['normaliser']['mean'], 3).tolist()}, stds {np.round(meta['normaliser']['std'], 3).tolist()}). "
        "The paper does not define its metric, so its numbers are not directly comparable.",
        "",
        "Times: median of 3 runs of the wall clock for the whole test batch on one device (CPU, "
        f"{meta['torch_threads']} torch thread(s)), divided by the number of windows; the first guess is "
        "excluded from every method; the polish time includes the neural pass. 4D-Var stops once a "
        f"Gauss-Newton step predicts less than {meta['var4d'].get('decrement_tol')} further decrease of its cost "
        f"(or a relative decrease below {meta['var4d'].get('ftol')}, or after {meta['var4d'].get('max_iter')} iterations).",
        "",
        *_extra_table(metrics, meta),
        *_expected_lines(meta.get("expected_check", []), preset),
        "## The paper's relations",
        "",
        "| relation | paper | ours | holds |",
        "|---|---|---|---|",
        *[f"| {c['check']} | {c['paper']} | {c['ours']} | {'yes' if c['holds'] else '**no**'} |" for c in checks],
        "",
        "## Cold-diffusion update of Algorithm 2",
        "",
        "| update | RMSE (normalised) |",
        "|---|---|",
        f"| `cold`: z_(k+1) = z_k + (s_k - s_(k+1)) (x_k - z0) | {meta['update_rmse']['cold']:.4f} |",
        f"| `printed`: z_(k+1) = z_k + s_k (x_k - z0) (as printed in the paper) | {meta['update_rmse']['printed']:.4g} |",
        "",
        *[f"- `{u}`: {note}" for u, note in meta.get("update_notes", {}).items()],
        "",
        f"Used for the table: `{meta['update_used']}`. Temperatures s_k = {[round(s, 3) for s in meta['levels']]}.",
        "",
        "RMSE of the MAP output x_k at each level of Algorithm 2 (k = 0: one MAP step from z0; the last is the "
        "estimate): " + ", ".join(f"{v:.4f}" for v in meta.get("level_rmse", [])) + ".",
        "",
        "## Set-up",
        "",
        f"- First guess: {meta['z0']}.",
        f"- Observation noise std {meta['obs_std_norm']:.4g} (normalised) = {meta['obs_std_raw']:.4g} (physical); "
        f"model-noise variance {meta['model_noise_var']:.3g} per step and component.",
        f"- 4D-Var cost at the truth (median over windows) {meta['cost_truth_median']:.1f}; at the 4D-Var "
        f"solution from z0 {metrics['var4d'].get('cost_median', math.nan):.1f}, from the neural output "
        f"{metrics['neural_var4d'].get('cost_median', math.nan):.1f}; the polish ends in a lower minimum "
        f"(cost lower by > 1) than 4D-Var from z0 on {100 * meta['minima']['polish_lower_fraction']:.1f}% of the "
        f"windows, in a higher one on {100 * meta['minima']['z0_lower_fraction']:.1f}%.",
        *([f"- The polishes start with Levenberg-Marquardt damping {meta['polish_damping']['polish_lm_init']:g} "
           f"(4D-Var from z0 and from the truth: {meta['polish_damping']['lm_init']:g}; same stopping rules). "
           "With the damping of 4D-Var from z0 instead: "
           + "; ".join(f"{NAMES[k]} RMSE {v['rmse']:.4f}, {v['gn_iters_median']:g} GN iterations (median)"
                       for k, v in meta['polish_damping']['with_lm_init'].items()) + "."]
          if meta.get("polish_damping") else []),
        f"- Run time: {meta.get('run_wall_s', math.nan):.0f} s wall clock, {meta.get('run_cpu_s', math.nan):.0f} s CPU "
        "(data, training, evaluation; the machine may have been shared).",
        f"- Training pairs: {meta['n_train_pairs']}; settings: `{json.dumps(meta['settings'])}`.",
        *([f"- Width chosen by held-out validation ({meta['capacity_selection']['n_val_trajectories']} training "
           "trajectories held out, never the test windows): "
           + ", ".join(f"{w}: {v:.4f}" for w, v in zip(meta['capacity_selection']['widths'],
                                                     meta['capacity_selection']['val_rmse']))
           + f" -> {meta['capacity_selection']['chosen']}."] if meta.get("capacity_selection") else []),
    ]
    if "seen_processes" in meta:
        sp = meta["seen_processes"]
        lines += [
            "",
            "## Held-out vs training observation processes (same held-out trajectories)",
            "",
            "| processes | First guess z0 | Cold diffusion | Neural assimilation |",
            "|---|---|---|---|",
            f"| held-out (the table above) | {metrics['z0']['rmse']:.4f} | {metrics['cold_diffusion']['rmse']:.4f} | "
            f"{metrics['neural']['rmse']:.4f} |",
            f"| seen in training | {sp['z0']:.4f} | {sp['cold_diffusion']:.4f} | {sp['neural']:.4f} |",
            "",
            "An observation process is a phase of the sparse observation times, so a held-out process observes "
            "times that no training process observes. The networks never see y or H, but the precision's "
            "coupling around never-observed times receives no training signal (the MAP only uses the columns "
            "of (Q + H^T R^-1 H)^-1 at observed entries); the gap between the two rows measures that.",
        ]
    if "heldout_processes" in meta:
        hp = meta["heldout_processes"]
        lines += [
            "",
            "## Observation processes never seen in training (diagnostic model)",
            "",
            f"A second neural prior, same settings and seed, trained without the phases {hp['processes']}; "
            "both models on the same test windows, split by process.",
            "",
            "| test windows | n | First guess z0 | Cold diffusion | Neural (trained on every phase) | "
            "Neural trained without these phases |",
            "|---|---|---|---|---|---|",
            *[f"| {label} | {hp[k]['n_windows']} | {hp[k]['z0']:.4f} | {hp[k]['cold_diffusion']:.4f} | "
              f"{hp[k]['neural']:.4f} | {hp[k]['neural_without']:.4f} |"
              for k, label in (("heldout", "phases held out of the diagnostic model"), ("seen", "the other phases"))],
            "",
            "The last column of the first row is the error on observation times never seen in training; "
            "the gap to the row below measures how far the prior generalises to a new process.",
        ]
    if "large_angle" in meta:
        la, sa = meta["large_angle"], meta["small_angle"]
        lines += [
            "",
            "## Pendulum: inside vs outside the linear regime",
            "",
            "| windows | n | " + " | ".join(NAMES[m] for m in cols) + " |",
            "|---" * (len(cols) + 2) + "|",
            f"| max abs(q) > 45 deg | {la['n_windows']} | " + " | ".join(f"{la[m]:.4f}" for m in cols) + " |",
            f"| max abs(q) <= 45 deg | {sa['n_windows']} | " + " | ".join(f"{sa[m]:.4f}" for m in cols) + " |",
        ]
    lines += ["", "## Figures", "", "![reconstructions](reconstructions.png)", "",
              "![4D-Var from two initialisations](var4d_inits.png)", "", "![training](training.png)", ""]
    return "\n".join(lines)


def _expected_lines(rows: list[dict], preset: str) -> list[str]:
    if not rows:
        return []
    return [f"## This run against the expected results of preset `{preset}` (configs/experiment)", "",
            "| method | expected RMSE | this run | tolerance | within |", "|---|---|---|---|---|",
            *[f"| {NAMES[r['method']]} | {r['expected']:.4f} | {r['measured']:.4f} | {100 * r['rel_tol']:.0f}% | "
              f"{'yes' if r['within'] else '**no**'} |" for r in rows], ""]


def _extra_table(metrics: dict, meta: dict) -> list[str]:
    """Markdown lines of the references and 4D-Var variants (those that were run)."""
    rows = [m for m in EXTRA if m in metrics]
    if not rows:
        return []
    lines = ["## Bayes-optimal reference and 4D-Var variants (same test windows)", "",
             "| method | RMSE (normalised) | RMSE (physical) | time per window (ms) | GN iterations (median / mean) "
             "| converged |", "|---|---|---|---|---|---|"]
    for m in ("var4d", "neural_var4d", *rows):
        r = metrics[m]
        gn = f"{r['gn_iters_median']:g} / {r['gn_iters_mean']:.1f}" if "gn_iters_median" in r else "-"
        conv = f"{100 * r['converged_fraction']:.0f}%" if "converged_fraction" in r else "-"
        lines.append(f"| {NAMES[m]} | {r['rmse']:.4f} | {r['rmse_raw']:.4f} | {r['time_per_window_ms']:.3g} | {gn} "
                     f"| {conv} |")
    lines.append("")
    if "particle_smoother" in metrics:
        ps = metrics["particle_smoother"]
        lines += [
            f"Particle smoother: bootstrap filter with {ps['n_particles']} particles per window, the true model, "
            "model noise and initial-state distribution, systematic resampling of whole paths when the effective "
            "sample size (ESS) falls below half the particles; its mean over the final paths approximates "
            f"E[x | y], the minimum-RMSE estimate. Smallest ESS at an observed time: median over windows "
            f"{ps['ess_min_median']:.0f}, worst window {ps['ess_min_min']:.0f}; distinct initial states among the "
            f"final paths: median {ps['unique_x0_median']:.0f}, worst {ps['unique_x0_min']}.", ""]
    mn = meta["minima"]
    lines += [
        f"4D-Var from z0 ends in a minimum of higher cost (by > 1) than 4D-Var started from the truth on "
        f"{100 * mn['var4d_worse_fraction']:.1f}% of the windows; the polish from the neural output on "
        f"{100 * mn['neural_var4d_worse_fraction']:.1f}%"
        + (f" (its lowest minimum; the single-start polish on {100 * mn['neural_var4d_single_worse_fraction']:.1f}%)"
           if "neural_var4d_single_worse_fraction" in mn else "") + ".", ""]
    ms = meta.get("multistart")
    if ms:
        lines += [
            f"Neural + 4D-Var polish is the multi-start polish: 4D-Var from the neural output and from "
            f"{ms['n_starts'] - 1} draws of the neural posterior N(x, (Q + H^T R^-1 H)^-1) (the learned precision "
            "Q), each window's estimate the mean of the Laplace mixture of its distinct minima (closer than "
            f"{ms['tol']:g} RMS, normalised, count once), weights exp(-J) det(G)^(-1/2) from the 4D-Var cost J and "
            "its Gauss-Newton Hessian G at each minimum: selection by the 4D-Var objective, never by the truth. "
            f"Distinct minima per window: median {ms['minima_median']:g}, mean {ms['minima_mean']:.2f} "
            f"({100 * ms['multimodal_fraction']:.1f}% of the windows have more than one); a draw reaches a lower "
            f"minimum (by > 1) than the neural start on {100 * ms['draws_lower_cost_fraction']:.1f}%; median weight "
            f"of the minimum the neural start reached {ms['neural_start_weight_median']:.2f}. Its GN iterations and time "
            "count every start; the single-start polish is its own row.", ""]
    if "var4d_strong" in metrics:
        lines += [f"Near-strong constraint: model-error covariance x {meta['var4d'].get('strong_factor')}; "
                  "times of the polish rows include the neural / cold-diffusion pass; the rows of this table "
                  "other than the first two are timed on one run.", ""]
    return lines


def write_report(out_dir, result: ExperimentResult, preset: str, settings: dict) -> dict:
    """Write ``report.json``, ``report.md`` and the figures into ``out_dir``; returns the
    JSON content."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, system = result.data, result.data.system
    meta = dict(result.extra)
    meta["settings"] = settings
    meta["var4d"] = settings.get("var4d", {})
    checks = paper_checks(system, result.metrics, meta)
    report = dict(result.metrics)
    report["checks"] = checks
    report["expected_check"] = meta["expected_check"] = expected_check(result.metrics, settings, preset)
    report["meta"] = {"experiment": system, "preset": preset, **meta}

    # figures (physical units)
    n = min(int(settings.get("n_plot", 3)), data.test.x.shape[0])
    time = data.dt * np.arange(data.T)
    raw = lambda a: data.norm.to_raw(a).numpy()  # noqa: E731
    # spread the shown windows over the test set (different trajectories and processes)
    pick = np.linspace(0, data.test.x.shape[0] - 1, n).astype(int)
    if system == "pendulum" and "large_angle" in meta:
        qmax = np.abs(raw(data.test.x)[..., 0]).max(-1)
        order = np.argsort(-qmax)  # the largest swings first (distinct trajectories), then one small-angle window
        traj = data.test.traj.numpy()
        first = order[np.sort(np.unique(traj[order], return_index=True)[1])]
        big = first[qmax[first] > math.pi / 4]
        small = first[qmax[first] <= math.pi / 4]
        pick = np.concatenate([big[: max(n - 1, 1)], small[:1]])[:n] if len(big) else pick
    sel = lambda a: a[pick]  # noqa: E731
    yraw = raw(data.test.y)
    shown = ["z0", "var4d", "cold_diffusion", "neural"] if system == "lorenz63" else ["z0", "var4d", "neural"]
    vplots.plot_reconstructions(
        out_dir / "reconstructions.png", time, sel(raw(data.test.x)), sel(yraw), sel(data.test.mask.numpy()),
        {m: sel(raw(result.estimates[m])) for m in shown}, LABELS[system],
        f"{system}: reconstructed test trajectories (held-out observation processes)",
        phase_portrait=(system == "pendulum"),
    )
    r0, r1 = result.var4d_runs["var4d"], result.var4d_runs.get("neural_var4d_single", result.var4d_runs["neural_var4d"])
    err0 = ((data.norm.to_norm(r0.x) - data.test.x) ** 2).mean((-1, -2))
    err1 = ((data.norm.to_norm(r1.x) - data.test.x) ** 2).mean((-1, -2))
    w = int(np.argmax((err0 - err1).numpy()))
    hist0 = [float(h[w]) for h in r0.history]
    hist1 = [float(h[w]) for h in r1.history]
    vplots.plot_var4d_inits(
        out_dir / "var4d_inits.png", time, raw(data.test.x[w]), yraw[w], data.test.mask[w].numpy(),
        {"z0": (r0.x[w].numpy(), raw(result.estimates["z0"][w]), int(r0.iters[w]), hist0),
         "neural": (r1.x[w].numpy(), raw(result.estimates["neural"][w]), int(r1.iters[w]), hist1)},
        LABELS[system],
        f"{system}: 4D-Var from the Gaussian first guess and from the neural output "
        f"(test window {w}, where their final errors differ most)",
    )
    vplots.plot_training(out_dir / "training.png", result.histories, f"{system}: training loss, objective (3.5)")
    _atomic_write(out_dir / "report.json", json.dumps(_json_clean(report), indent=2, allow_nan=False))
    _atomic_write(out_dir / "report.md", markdown(system, preset, result.metrics, checks, meta))
    return report


SCAN_METHODS = ("particle_smoother", "var4d_from_truth", "neural_var4d", "var4d", "neural", "cold_diffusion", "z0",
                "var4d_strong", "neural_var4d_strong")


def write_scan(out_dir, system: str, preset: str, reports: dict) -> str:
    """``scan.json``, ``scan.md`` and ``scan.png`` from ``reports`` (dt -> report.json
    content); returns the markdown table. Says at which dt the paper's ordering
    neural < 4D-Var < cold diffusion holds."""
    out_dir = Path(out_dir)
    dts = sorted(reports)
    methods = [m for m in SCAN_METHODS if any(m in reports[dt] for dt in dts)]
    val = {m: [reports[dt].get(m, {}).get("rmse", math.nan) for dt in dts] for m in methods}
    lines = [f"# oceanda validate: {system} dt scan (preset `{preset}`)", "",
             "RMSE (normalised units) on the held-out test windows at each model time step (windows of "
             f"{reports[dts[0]]['meta']['settings']['data'].get('T', '?')} steps; each dt is a separate experiment: "
             "data, training, evaluation).", "",
             "| method | " + " | ".join(f"dt = {dt:g}" for dt in dts) + " |",
             "|---" * (len(dts) + 1) + "|"]
    for m in methods:
        lines.append(f"| {NAMES[m]} | " + " | ".join("-" if not math.isfinite(v) else f"{v:.4f}" for v in val[m]) + " |")
    worse = [reports[dt]["meta"]["minima"].get("var4d_worse_fraction", math.nan) for dt in dts]
    lines.append("| 4D-Var from z0 in a worse minimum than from the truth | "
                 + " | ".join(f"{100 * w:.0f}%" for w in worse) + " |")
    gn = {m: [reports[dt].get(m, {}).get("gn_iters_median", math.nan) for dt in dts]
          for m in ("var4d_strong", "neural_var4d_strong") if m in methods}
    for m, v in gn.items():
        lines.append(f"| GN iterations (median), {NAMES[m]} | " + " | ".join(f"{x:g}" for x in v) + " |")
    lines += ["", "| dt | paper's ordering neural < 4D-Var < cold diffusion | neural < cold diffusion < 4D-Var | "
              "neural / particle smoother |", "|---|---|---|---|"]
    rows = []
    for i, dt in enumerate(dts):
        n, v, c = val["neural"][i], val["var4d"][i], val["cold_diffusion"][i]
        ps = val["particle_smoother"][i] if "particle_smoother" in val else math.nan
        paper, ours = n < v < c, n < c < v
        rows.append({"dt": dt, "paper_ordering_holds": paper, "neural_lt_cold_lt_var4d": ours,
                     "neural_over_particle_smoother": n / ps if ps > 0 else None})
        lines.append(f"| {dt:g} | {'yes' if paper else 'no'} | {'yes' if ours else 'no'} | "
                     f"{n / ps:.2f} |" if ps > 0 else f"| {dt:g} | {'yes' if paper else 'no'} | "
                     f"{'yes' if ours else 'no'} | - |")
    lines += ["", "![RMSE against dt](scan.png)", ""]
    text = "\n".join(lines)
    vplots.plot_scan(out_dir / "scan.png", dts, val, NAMES, f"{system}: RMSE against the model time step")
    _atomic_write(out_dir / "scan.json", json.dumps(_json_clean({"dt": dts, "rmse": val, "orderings": rows,
                                                                 "var4d_worse_fraction": worse}),
                                                    indent=2, allow_nan=False))
    _atomic_write(out_dir / "scan.md", text)
    return text
