"""Validation experiment: generate, first guess, train, evaluate every method on the test set.

Methods compared on the same held-out trajectories, observed by every observation process
(``data.processes="all"``) or by held-out processes never trained on (``"heldout"``):

* ``z0``: the Gaussian first guess (L63: MAP under the empirical mean / covariance of the
  training trajectories; pendulum: MAP under the linearised damped-oscillator prior);
* ``var4d``: weak-constraint 4D-Var (Gauss-Newton + Levenberg-Marquardt + line search,
  block-tridiagonal solves) started from ``z0``, with the true model and noise levels;
* ``cold_diffusion``: the unconditional ablation (prior means only, Algorithm 2 without y);
* ``neural``: incremental neural assimilation (Algorithm 2);
* ``neural_var4d``: 4D-Var started from the neural output ("polish"); with
  ``var4d.polish_draws > 0`` the multi-start polish: 4D-Var also from that many draws of the
  neural posterior, combined as the mean of the Laplace mixture of the distinct minima
  (:mod:`oceanda.assim.multistart`; weights from the 4D-Var cost and Hessian of each window,
  never from the truth), the single-start polish then being ``neural_var4d_single``.

References and variants (:data:`EXTRA`), on the same windows:

* ``particle_smoother``: bootstrap particle smoother with the true model, noise and initial
  distribution (:mod:`oceanda.assim.particle`): the Bayes-optimal (minimum-RMSE) estimate
  ``E[x | y]`` up to Monte-Carlo error, reported with its effective sample size;
* ``var4d_from_truth``: 4D-Var started from the true trajectory (the minimum 4D-Var finds
  near the truth); the fraction of windows where 4D-Var from ``z0`` ends in a minimum of
  higher cost is ``meta.minima.var4d_worse_fraction``;
* ``cold_diffusion_var4d``: 4D-Var polish from the cold-diffusion output;
* ``var4d_strong``, ``neural_var4d_strong``, ``cold_diffusion_var4d_strong``: the same three
  starts with the near-strong-constraint model-error covariance ``Qm * var4d.strong_factor``.

The polishes (4D-Var from a learned estimate) start with the damping ``var4d.polish_lm_init``
when set (then ``meta.polish_damping`` holds the neural polishes rerun with ``lm_init``);
every start has the same stopping rules. With ``data.processes="all"`` a second neural prior
is trained without ``data.n_test_processes`` phases and scored on the test windows of those
phases (``meta.heldout_processes``): the error on observation processes never seen in training.

RMSE is over all entries of the test windows (every time, every component): ``rmse`` in
normalised units (each component zero mean, unit variance over the training
trajectories), ``rmse_raw`` in physical units. Times are wall-clock on the whole test batch
on one device, divided by the number of windows (first-guess time excluded; the polish
time includes the neural pass).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from oceanda.assim.checkpoint import read_torch_file
from oceanda.assim.incremental import UPDATES, incremental_assimilation, posterior_draws, temperature_levels
from oceanda.assim.multistart import distinct_minima, laplace_mixture_mean
from oceanda.assim.particle import particle_smoother
from oceanda.assim.var4d import MixtureBackground, Var4DResult, WeakConstraint4DVar
from oceanda.dynamics import lorenz63, pendulum
from oceanda.errors import ConfigError, InputError, NumericalError
from oceanda.priors.empirical import EmpiricalGaussian, LinearMarkovPrior
from oceanda.priors.neural_band import NeuralBandPrior
from oceanda.train.incremental import TrainSettings, train_incremental
from oceanda.validation.data import PairSet, ToyData, make_lorenz63, make_pendulum

log = logging.getLogger("oceanda.validate")
METHODS = ("z0", "var4d", "cold_diffusion", "neural", "neural_var4d")
EXTRA = ("neural_var4d_single", "particle_smoother", "var4d_from_truth", "cold_diffusion_var4d", "var4d_strong", "neural_var4d_strong",
         "cold_diffusion_var4d_strong")
SYSTEMS = ("lorenz63", "pendulum")
CHECKPOINT_VERSION = 1


@dataclass
class ModelSettings:
    """Networks of the neural band prior (paper: depth 4, width 32, bandwidth 2*phi).
    ``width`` may be a list of candidates: the one chosen by held-out validation
    (:func:`select_width`) is trained."""

    width: int | list[int] = 32
    depth: int = 4
    emb_dim: int = 16
    bandwidth: int | None = None
    residual_mean: bool = True  #: mu = z + f(z, s) (True) or mu = f(z, s), a plain MLP mean (False)


@dataclass
class ParticleSettings:
    """The particle-smoother reference (:mod:`oceanda.assim.particle`); ``n_particles = 0``
    skips it. Particles run in float32 (the Monte-Carlo error dominates round-off)."""

    n_particles: int = 100_000
    seed: int = 0


@dataclass
class Var4DSettings:
    """Stopping and damping of weak-constraint 4D-Var (see :mod:`oceanda.assim.var4d`)."""

    max_iter: int = 100
    ftol: float = 1e-8
    cost_tol: float | None = None
    decrement_tol: float | None = 0.05
    lm_init: float = 1e-3
    #: near-strong-constraint variant: model-error covariance Qm * strong_factor (null: skip it)
    strong_factor: float | None = 1e-3
    #: initial Levenberg-Marquardt damping of the polishes (4D-Var started from a learned estimate,
    #: already near a minimum); null: lm_init, as 4D-Var from z0. Stopping rules are the same for every start
    polish_lm_init: float | None = None
    #: multi-start polish (:mod:`oceanda.assim.multistart`): besides the neural output, this many draws of
    #: the neural posterior N(x_l, (Q + H^T R^-1 H)^-1) start 4D-Var, and ``neural_var4d`` is the mean of
    #: the Laplace mixture of the distinct minima (the single-start polish: ``neural_var4d_single``); 0: off
    polish_draws: int = 0
    polish_tol: float = 0.05  #: minima closer than this (RMS, normalised units) are one minimum
    polish_seed: int = 0  #: seed of the draws
    #: the minima of 4D-Var from z0 and of the cold-diffusion polish (both run anyway) join the
    #: multi-start mixture (its time and Gauss-Newton count then include theirs)
    polish_baselines: bool = False
    #: background on x0: 1, the Gaussian of :func:`background`; K > 1, a K-component Gaussian mixture
    #: fitted by EM to the same states (:class:`oceanda.assim.var4d.MixtureBackground`; L63 only)
    background_components: int = 1


@dataclass
class ExperimentSettings:
    """One validation experiment. ``data`` holds the keyword arguments of
    :func:`~oceanda.validation.data.make_lorenz63` / ``make_pendulum``."""

    system: str
    data: dict = field(default_factory=dict)
    n_levels: int = 5
    update: str = "cold"
    model: ModelSettings = field(default_factory=ModelSettings)
    training: TrainSettings = field(default_factory=TrainSettings)
    var4d: Var4DSettings = field(default_factory=Var4DSettings)
    particle_smoother: ParticleSettings = field(default_factory=ParticleSettings)
    z0_inflation: list[float] = field(default_factory=lambda: [1.0])
    n_plot: int = 3
    #: results measured on the experiment's fixed seeds, kept as data (preset -> {"rmse": {method: value},
    #: "rel_tol": {method: tolerance}}); not used by the run, checked by the tests on the quick preset
    expected: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.system not in SYSTEMS:
            raise ConfigError(f"experiment.system must be one of {SYSTEMS}, got {self.system!r}")
        if self.update not in UPDATES:
            raise ConfigError(f"experiment.update must be one of {UPDATES}, got {self.update!r}")
        if self.n_levels < 0:
            raise ConfigError(f"experiment.n_levels must be >= 0, got {self.n_levels}")
        if not self.z0_inflation or min(self.z0_inflation) <= 0:
            raise ConfigError(f"experiment.z0_inflation must be a non-empty list of positive factors, "
                              f"got {self.z0_inflation}")
        widths = self.model.width if isinstance(self.model.width, list) else [self.model.width]
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ConfigError(f"experiment.model.width must be a positive integer or a non-empty list of them, "
                              f"got {self.model.width}")
        if self.particle_smoother.n_particles < 0:
            raise ConfigError(f"experiment.particle_smoother.n_particles must be >= 0, "
                              f"got {self.particle_smoother.n_particles}")
        if self.var4d.strong_factor is not None and not self.var4d.strong_factor > 0:
            raise ConfigError(f"experiment.var4d.strong_factor must be > 0 or null, got {self.var4d.strong_factor}")
        v = self.var4d
        for key, value, ok, want in (
                ("max_iter", v.max_iter, v.max_iter >= 1, ">= 1"),
                ("ftol", v.ftol, v.ftol >= 0, ">= 0"),
                ("cost_tol", v.cost_tol, v.cost_tol is None or v.cost_tol >= 0, ">= 0 or null"),
                ("decrement_tol", v.decrement_tol, v.decrement_tol is None or v.decrement_tol >= 0, ">= 0 or null"),
                ("lm_init", v.lm_init, v.lm_init > 0, "> 0"),
                ("polish_draws", v.polish_draws, v.polish_draws >= 0, ">= 0"),
                ("polish_tol", v.polish_tol, v.polish_tol >= 0, ">= 0"),
                ("background_components", v.background_components,
                 v.background_components == 1 or (v.background_components > 1 and self.system == "lorenz63"),
                 ">= 1 (> 1: Lorenz-63 only)")):
            if not ok:
                raise ConfigError(f"experiment.var4d.{key} must be {want}, got {value}")
        if self.n_plot < 0:
            raise ConfigError(f"experiment.n_plot must be >= 0, got {self.n_plot}")
        for key, want in DATA_RANGES.items():
            value = self.data.get(key)
            if value is not None and isinstance(value, (int, float)) and not want[0](value):
                raise ConfigError(f"experiment.data.{key} must be {want[1]}, got {value}")
        self.training.check()


#: ranges of the numeric keys of ``experiment.data`` (the toy data makers' arguments)
DATA_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "n_train": (lambda v: v >= 2, ">= 2"),
    "n_test": (lambda v: v >= 1, ">= 1"),
    "T": (lambda v: v >= 2, ">= 2"),
    "dt": (lambda v: v > 0, "> 0"),
    "spinup_steps": (lambda v: v >= 0, ">= 0"),
    "obs_every": (lambda v: v >= 1, ">= 1"),
    "obs_noise": (lambda v: v > 0, "> 0 (an observation-noise standard deviation)"),
    "n_test_processes": (lambda v: v >= 1, ">= 1"),
    "model_noise_var": (lambda v: v >= 0, ">= 0"),
    "q_max": (lambda v: v > 0, "> 0"),
}


# --------------------------------------------------------------------------- pieces
def make_data(settings: ExperimentSettings) -> ToyData:
    maker = make_lorenz63 if settings.system == "lorenz63" else make_pendulum
    try:
        return maker(**settings.data)
    except TypeError as exc:
        raise ConfigError(f"experiment.data: {exc}") from None


def model_step(data: ToyData) -> Callable:
    """``x -> (m(x), dm/dx)`` of the true system (physical units)."""
    if data.system == "lorenz63":
        return lambda x: lorenz63.step_and_jacobian(x, data.dt)
    return lambda x: pendulum.step_and_jacobian(x, data.dt)


def background(data: ToyData) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the initial state (physical units): L63, the empirical
    moments of the training windows' first states (the attractor's); pendulum, the moments
    of the uniform initial-condition distribution."""
    if data.system == "lorenz63":
        x0 = data.raw_train_x[:, 0]
        return x0.mean(0), torch.cov(x0.T)
    q_max, p_max = data.ic_box
    return torch.zeros(2, dtype=torch.float64), torch.diag(torch.tensor([q_max ** 2 / 3, p_max ** 2 / 3],
                                                                        dtype=torch.float64))


def initial_particles(data: ToyData, n: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """``n`` draws ``(n, phi)`` of the true initial-state distribution (physical units): the
    attractor sampler of the data (L63), the uniform box (pendulum)."""
    if data.system == "lorenz63":
        return lorenz63.sample_attractor(n, data.dt, data.spinup_steps, math.sqrt(data.model_noise_var), generator,
                                         dtype)
    return pendulum.sample_initial(n, *data.ic_box, generator, dtype)


def run_particle_smoother(data: ToyData, pairs: PairSet, s: ParticleSettings, dtype=torch.float32,
                          x0_particles: torch.Tensor | None = None):
    """The particle smoother on ``pairs`` (physical units); returns ``(result, seconds)``,
    the time excluding the draw of the initial particles. ``x0_particles`` ``(P, phi)``
    (physical units) replace the draws of the true initial-state distribution
    (:func:`initial_particles`, ``s.n_particles`` of them): another prior on x0."""
    g = torch.Generator().manual_seed(s.seed)
    pool = initial_particles(data, s.n_particles, g, dtype) if x0_particles is None else x0_particles.to(dtype)
    step = (lambda x: lorenz63.step(x, data.dt)) if data.system == "lorenz63" else (lambda x: pendulum.step(x, data.dt))
    yraw = torch.where(pairs.mask, data.norm.to_raw(pairs.y), torch.zeros_like(pairs.y)).to(dtype)
    t0 = time.perf_counter()
    res = particle_smoother(step, math.sqrt(data.model_noise_var), pool, yraw, pairs.mask, data.R_raw, generator=g)
    return res, time.perf_counter() - t0


def build_var4d(data: ToyData, s: Var4DSettings, factor: float = 1.0, polish: bool = False) -> WeakConstraint4DVar:
    """Weak-constraint 4D-Var with the true model and noise; ``factor`` scales the
    model-error covariance (``var4d.strong_factor``: near-strong constraint); ``polish``
    starts with the damping ``var4d.polish_lm_init`` (when set) instead of ``lm_init``."""
    xb, Bc = background(data)
    lm = s.polish_lm_init if polish and s.polish_lm_init is not None else s.lm_init
    K = s.background_components
    if K > 1 and K not in data.x0_mixtures:
        try:
            data.x0_mixtures[K] = MixtureBackground.fit(data.raw_train_x[:, 0], K, seed=0)
        except InputError as exc:
            raise ConfigError(f"experiment.var4d.background_components={K}: {exc} "
                              "(raise experiment.data.n_train or lower the components)") from exc
    mix = data.x0_mixtures.get(K)
    return WeakConstraint4DVar(
        model_step(data), factor * data.model_noise_var * torch.eye(data.phi, dtype=torch.float64), data.R_raw,
        xb, Bc, max_iter=s.max_iter, ftol=s.ftol, cost_tol=s.cost_tol, decrement_tol=s.decrement_tol,
        lm_init=lm, background=mix,
    )


class FirstGuess:
    """``z0`` of every pair, normalised ``(N, d)`` float64 (see module docstring)."""

    def __init__(self, data: ToyData, inflation: list[float]):
        self.data = data
        self.description = ""
        if data.system == "lorenz63":
            one = data.train.process == 0  # each training trajectory once
            self.prior = EmpiricalGaussian.fit(data.train.x[one].reshape(int(one.sum()), -1))
            self.description = "MAP under the empirical mean and covariance of the training trajectories"
            self.inflation = None
        else:
            best = None
            for c in inflation:  # model-noise inflation of the linear prior, chosen on training pairs
                self.inflation = c
                self.prior = self._linear_prior(c)
                err = float((self(data.train) - data.train.flat()[0]).pow(2).mean().sqrt())
                log.info("pendulum z0: inflation %g -> train RMSE %.4f", c, err)
                if best is None or err < best[0]:
                    best = (err, c)
            self.inflation = best[1]
            self.prior = self._linear_prior(best[1])
            self.description = (f"MAP under the linearised (damped oscillator) Gaussian prior, model-noise "
                                f"variance x{best[1]:g} (chosen on the training pairs)")

    def _linear_prior(self, c):
        d = self.data
        M = pendulum.linear_step_matrix(d.dt)
        m0, P0 = background(d)
        Qm = c * d.model_noise_var * torch.eye(2, dtype=torch.float64)
        return LinearMarkovPrior(M, Qm, m0, P0, d.T)

    def __call__(self, pairs: PairSet) -> torch.Tensor:
        d = self.data
        x, y, mask = pairs.flat()
        if d.system == "lorenz63":
            return self.prior.map(y, mask, d.R_norm)
        N = len(pairs)
        yraw = torch.where(pairs.mask, d.norm.to_raw(pairs.y), torch.zeros_like(pairs.y)).reshape(N, -1)
        zr = self.prior.map(yraw, mask, d.R_raw)
        return d.norm.to_norm(zr.reshape(N, d.T, d.phi)).reshape(N, -1)


def _timed(fn, repeat: int = 3):
    """``(fn(), median wall time of `repeat` calls)``; every method is timed the same way."""
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return out, sorted(ts)[len(ts) // 2]


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


# --------------------------------------------------------------------------- experiment
@dataclass
class ExperimentResult:
    metrics: dict
    estimates: dict  #: method -> normalised (N, T, phi)
    var4d_runs: dict  #: "var4d"/"neural_var4d" -> Var4DResult
    data: ToyData
    histories: dict
    extra: dict


def validation_split(data: ToyData, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit, val)`` boolean masks over the training pairs: the pairs of the last
    ``fraction`` of the training trajectories (every process) are ``val``, never the test windows."""
    n_traj = int(data.train.traj.max()) + 1
    n_val = max(1, round(fraction * n_traj))
    if n_val >= n_traj:
        raise ConfigError(f"experiment: a validation split of {fraction} needs >= 2 training trajectories")
    val = data.train.traj >= n_traj - n_val
    return ~val, val


def fit_prior(settings: ExperimentSettings, data: ToyData, z0_train: torch.Tensor, keep: torch.Tensor,
              conditional: bool, seed: int, dtype=torch.float32, on_epoch=None):
    """A new prior (torch seeded with ``seed`` once it is built: the order of the earlier
    runs, whose numbers the experiment files keep) trained on the training pairs ``keep``;
    with ``training.early_stopping``
    on those of them outside the validation split, kept at its best validation epoch (the
    same rule for the neural prior and for the cold-diffusion ablation). Returns
    ``(prior, TrainRecord)``."""
    x, y, mask = data.train.flat()
    fit, val = keep, None
    if settings.training.early_stopping:
        f, v = validation_split(data, settings.training.val_fraction)
        fit, val_sel = keep & f, keep & v
        val = (x[val_sel].to(dtype), z0_train[val_sel].to(dtype), y[val_sel].to(dtype), mask[val_sel])
    prior = new_prior(settings, data, conditional)
    torch.manual_seed(seed)
    rec = train_incremental(prior, x[fit].to(dtype), z0_train[fit].to(dtype), y[fit].to(dtype), mask[fit],
                            data.R_norm, temperature_levels(settings.n_levels), settings.training,
                            conditional=conditional, on_epoch=on_epoch, val=val)
    return prior, rec


def train_models(settings: ExperimentSettings, data: ToyData, z0_train: torch.Tensor, dtype=torch.float32,
                 progress: bool = True):
    """Train the neural prior (objective (3.5)) and the unconditional ablation; returns
    ``(priors, records)`` (name -> :class:`~oceanda.train.incremental.TrainRecord`)."""
    from tqdm.auto import tqdm

    out = {}
    histories = {}
    every = torch.ones(len(data.train), dtype=torch.bool)
    for name, conditional in (("neural", True), ("cold_diffusion", False)):
        bar = tqdm(total=settings.training.epochs, desc=f"train {name}", disable=not progress, leave=False)

        def on_epoch(e, loss, bar=bar):
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}")

        out[name], histories[name] = fit_prior(settings, data, z0_train, every, conditional,
                                               settings.training.seed + (0 if conditional else 1), dtype, on_epoch)
        bar.close()
    return out, histories


def train_heldout_model(settings: ExperimentSettings, data: ToyData, z0_train: torch.Tensor, dtype=torch.float32,
                        progress: bool = True):
    """The diagnostic model of ``processes="all"``: the neural prior trained, with the same
    settings and seed, on the training pairs of every phase but ``data.processes_heldout``."""
    from tqdm.auto import tqdm

    keep = ~torch.isin(data.train.process, torch.tensor(data.processes_heldout))
    bar = tqdm(total=settings.training.epochs, desc="train neural (held-out phases)", disable=not progress, leave=False)
    prior, hist = fit_prior(settings, data, z0_train, keep, True, settings.training.seed, dtype,
                            lambda e, loss: bar.update(1))
    bar.close()
    return prior, hist


def select_width(settings: ExperimentSettings, data: ToyData, z0_train: torch.Tensor, dtype=torch.float32,
                 progress: bool = True) -> dict:
    """Capacity by held-out validation, never by the test windows: each candidate width of
    ``settings.model.width`` (a list) trains the neural prior on the training pairs of all
    but the last ``training.val_fraction`` of the training trajectories and is scored by the
    RMSE of its assimilation on the pairs of those held-out trajectories (same training
    processes; with ``training.early_stopping``, at its best validation epoch). Sets
    ``settings.model.width`` to the best candidate (the networks are then trained as usual)
    and returns ``{"widths", "val_rmse", "chosen", "n_val_trajectories"}``."""
    from tqdm.auto import tqdm

    widths = list(settings.model.width)
    levels = temperature_levels(settings.n_levels)
    fit, val = validation_split(data, settings.training.val_fraction)
    n_val = int(data.train.traj[val].unique().numel())
    x, y, mask = data.train.flat()
    scores = []
    for w in tqdm(widths, desc="choose width", disable=not progress, leave=False):
        s_w = replace(settings, model=replace(settings.model, width=w))
        keep = torch.ones_like(fit) if settings.training.early_stopping else fit  # fit_prior splits off val itself
        prior, _ = fit_prior(s_w, data, z0_train, keep, True, settings.training.seed, dtype)
        est = incremental_assimilation(prior, z0_train[val].to(dtype), y[val].to(dtype), mask[val], data.R_norm, levels,
                                       update=settings.update)
        scores.append(rmse(est, x[val]))
        log.info("width %d: validation RMSE %.4f (%d held-out training trajectories)", w, scores[-1], n_val)
    chosen = widths[min(range(len(widths)), key=scores.__getitem__)]
    settings.model.width = chosen
    return {"widths": widths, "val_rmse": scores, "chosen": chosen, "n_val_trajectories": n_val}


def multistart_polish(settings: ExperimentSettings, data: ToyData, prior: NeuralBandPrior, z0: torch.Tensor,
                      y: torch.Tensor, mask: torch.Tensor, solver: WeakConstraint4DVar, var: WeakConstraint4DVar,
                      single: Var4DResult, extra: tuple[Var4DResult, ...] = ()) -> tuple[Var4DResult, dict]:
    """The multi-start polish of ``neural_var4d`` (module docstring): ``single`` is 4D-Var
    from the neural output (already run); ``var4d.polish_draws`` draws of the neural
    posterior (:func:`~oceanda.assim.incremental.posterior_draws`) are polished by
    ``solver``, the distinct minima (``var4d.polish_tol``) of each window weighted by
    ``exp(-J) det(G)^(-1/2)`` (``var``'s cost and Gauss-Newton Hessian). Returns the
    :class:`Var4DResult` of the mixture mean (``iters``: Gauss-Newton systems of every start;
    ``cost``: the lowest minimum; ``converged``: every start converged; ``history``: the single
    start's) and a summary (minima per window, weight of the minimum the neural start reached).
    ``extra``: minima of other starts already run (``var4d.polish_baselines``) joining the mixture."""
    v = settings.var4d
    N, T, phi = data.test.x.shape
    g = torch.Generator().manual_seed(v.polish_seed)
    _, draws = posterior_draws(prior, z0, y, mask, data.R_norm, temperature_levels(settings.n_levels),
                               v.polish_draws, g, update=settings.update)
    yraw = torch.where(data.test.mask, data.norm.to_raw(data.test.y), torch.zeros_like(data.test.y))
    K = v.polish_draws
    start = data.norm.to_raw(draws.reshape(K * N, T, phi))
    rep = lambda a: a.unsqueeze(0).expand(K, *a.shape).reshape(K * N, *a.shape[1:])  # noqa: E731
    r = solver.solve(start, rep(yraw), rep(data.test.mask))
    xs = torch.cat((single.x.unsqueeze(0), r.x.reshape(K, N, T, phi), *(e.x.unsqueeze(0) for e in extra)))
    cost = torch.cat((single.cost.unsqueeze(0), r.cost.reshape(K, N), *(e.cost.unsqueeze(0) for e in extra)))
    iters = torch.cat((single.iters.unsqueeze(0), r.iters.reshape(K, N), *(e.iters.unsqueeze(0) for e in extra)))
    conv = torch.cat((single.converged.unsqueeze(0), r.converged.reshape(K, N),
                      *(e.converged.unsqueeze(0) for e in extra)))
    K += len(extra)  # every start after the neural one
    logdet = var.hessian_logdet(xs.reshape(-1, T, phi), torch.cat((yraw, rep(yraw))),
                                torch.cat((data.test.mask, rep(data.test.mask)))).reshape(K + 1, N)
    xn = data.norm.to_norm(xs).reshape(K + 1, N, T * phi)
    keep = distinct_minima(xn, cost, v.polish_tol, valid=torch.isfinite(logdet))
    mean, pi = laplace_mixture_mean(xn, cost, torch.nan_to_num(logdet), keep)
    res = Var4DResult(x=data.norm.to_raw(mean.reshape(N, T, phi)), iters=iters.sum(0),
                      cost=torch.where(keep, cost, torch.inf).min(0).values, converged=conv.all(0),
                      history=single.history)
    n_min = keep.sum(0).double()
    return res, {"n_starts": K + 1, "tol": v.polish_tol, "minima_median": float(n_min.median()),
                 "minima_mean": float(n_min.mean()), "multimodal_fraction": float((n_min > 1).double().mean()),
                 # weight of the minimum the neural start reached (whichever start of it was kept)
                 "neural_start_weight_median": float(torch.where(
                     (xn - xn[:1]).pow(2).mean(-1).sqrt() <= v.polish_tol, pi, torch.zeros_like(pi)).sum(0).median()),
                 "draws_lower_cost_fraction": float((torch.where(keep[1:], cost[1:], torch.inf).min(0).values
                                                     < cost[0] - 1.0).double().mean())}


def new_prior(settings: ExperimentSettings, data: ToyData, conditional: bool) -> NeuralBandPrior:
    m = settings.model
    return NeuralBandPrior(data.T, data.phi, m.bandwidth, m.width, m.depth, m.emb_dim, precision=conditional,
                           residual=m.residual_mean)


def save_checkpoint(path: Path, settings: ExperimentSettings, priors: dict, histories: dict) -> None:
    from oceanda.data.files import atomic_path

    with atomic_path(path) as tmp:
        torch.save({
            "version": CHECKPOINT_VERSION,
            "system": settings.system,
            "model": asdict(settings.model),
            "n_levels": settings.n_levels,
            "data": dict(settings.data),
            "state_dicts": {k: v.state_dict() for k, v in priors.items()},
            "histories": histories,
        }, tmp)


def read_checkpoint(path: str | Path, system: str) -> dict:
    """The content of a checkpoint written by :func:`save_checkpoint` for ``system``;
    :class:`InputError` naming the file when it is missing, unreadable (truncated, not a torch
    file), of another version or of another system."""
    path = Path(path)
    ck = read_torch_file(path)
    if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"checkpoint {path}: not an oceanda validate checkpoint (version {CHECKPOINT_VERSION})")
    if ck.get("system") != system:
        raise InputError(f"checkpoint {path} was trained on {ck.get('system')!r}, not {system!r}")
    return ck


def load_checkpoint(path: Path, settings: ExperimentSettings, data: ToyData):
    """Networks saved by :func:`save_checkpoint`; checks they fit this experiment."""
    path = Path(path)
    ck = read_checkpoint(path, settings.system)
    if ck["data"] != dict(settings.data):
        log.warning("checkpoint %s was trained with data settings %s (now %s)", path, ck["data"], settings.data)
    settings.model = ModelSettings(**ck["model"])
    settings.n_levels = ck["n_levels"]
    priors = {}
    for name, sd in ck["state_dicts"].items():
        prior = new_prior(settings, data, name.startswith("neural"))
        try:
            prior.load_state_dict(sd)
        except RuntimeError as exc:
            raise InputError(f"checkpoint {path}: network {name!r} does not fit T={data.T}, "
                             f"phi={data.phi}: {exc}") from None
        prior.eval()
        priors[name] = prior
    return priors, ck.get("histories", {})


def run_experiment(
    settings: ExperimentSettings,
    out_dir: Path | None = None,
    checkpoint: Path | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> ExperimentResult:
    """Run one experiment end to end (module docstring). Saves ``model.pt`` in ``out_dir``
    when training (nothing else is written here: see :mod:`oceanda.validation.report`)."""
    from tqdm.auto import tqdm

    settings.check()
    torch.manual_seed(settings.training.seed)
    data = make_data(settings)
    log.info("%s: %d training pairs (%d processes), %d test pairs (%d %s processes)", settings.system,
             len(data.train), len(data.processes_train), len(data.test), len(data.processes_test),
             "training" if data.processes_heldout else "held-out")
    fg = FirstGuess(data, settings.z0_inflation)
    z0_train = fg(data.train)
    (z0_test, t_z0) = _timed(lambda: fg(data.test))
    selection = stopping = skipped = None
    if checkpoint is not None:
        priors, histories = load_checkpoint(Path(checkpoint), settings, data)
        log.info("loaded networks from %s (training skipped)", checkpoint)
    else:
        if isinstance(settings.model.width, list):
            selection = select_width(settings, data, z0_train, dtype, progress)
        priors, records = train_models(settings, data, z0_train, dtype, progress)
        if data.processes_heldout:
            priors["neural_heldout"], records["neural_heldout"] = train_heldout_model(settings, data, z0_train,
                                                                                      dtype, progress)
        histories = {k: r.loss for k, r in records.items()}
        skipped = {k: len(r.skipped) for k, r in records.items()}  # training steps skipped (non-finite)
        if settings.training.early_stopping:
            stopping = {k: {"best_epoch": r.best_epoch, "val_rmse_best": r.val_rmse[r.best_epoch],
                            "val_rmse_last": r.val_rmse[-1]} for k, r in records.items()}
        if out_dir is not None:
            save_checkpoint(Path(out_dir) / "model.pt", settings, priors, histories)
    levels = temperature_levels(settings.n_levels)
    N, T, phi = data.test.x.shape
    x, y, mask = data.test.flat()
    yd, z0d = y.to(dtype), z0_test.to(dtype)

    def neural_pass(update, conditional=True, prior=None):
        prior = prior or priors["neural"]
        return incremental_assimilation(prior, z0d, yd, mask, data.R_norm, levels, update=update,
                                        conditional=conditional).double()

    # warm-up (numba compilation, allocator) on a few windows, not timed
    incremental_assimilation(priors["neural"], z0d[:2], yd[:2], mask[:2], data.R_norm, levels)
    est, times = {"z0": z0_test}, {"z0": t_z0}
    est["neural"], times["neural"] = _timed(lambda: neural_pass(settings.update))
    updates, update_notes = {}, {}
    for u in UPDATES:
        try:
            updates[u] = rmse(neural_pass(u), x)
        except NumericalError as exc:  # the update as printed can leave the training range and blow up
            updates[u], update_notes[u] = math.nan, f"diverged: {exc}"
    est["cold_diffusion"], times["cold_diffusion"] = _timed(
        lambda: neural_pass(settings.update, conditional=False, prior=priors["cold_diffusion"]))

    var = build_var4d(data, settings.var4d)
    var_p = build_var4d(data, settings.var4d, polish=True)
    yraw = torch.where(data.test.mask, data.norm.to_raw(data.test.y), torch.zeros_like(data.test.y))
    to_raw = lambda a: data.norm.to_raw(a.double().reshape(-1, T, phi))  # noqa: E731
    var.solve(to_raw(z0_test[:2]), yraw[:2], data.test.mask[:2])  # warm-up
    runs: dict[str, Var4DResult] = {}
    for name, solver, start in (("var4d", var, est["z0"]), ("neural_var4d", var_p, est["neural"])):
        bar = tqdm(total=3 * settings.var4d.max_iter, desc=f"4D-Var {name}", disable=not progress, leave=False)

        def prog(k, n_active, bar=bar):
            bar.update(1)
            bar.set_postfix(active=n_active)

        runs[name], times[name] = _timed(lambda solver=solver, start=start, prog=prog: solver.solve(
            to_raw(start), yraw, data.test.mask, prog))
        bar.close()
        est[name] = data.norm.to_norm(runs[name].x).reshape(N, -1)
    times["neural_var4d"] += times["neural"]
    # references and variants: run once each (timings of one run); with var4d.polish_baselines the
    # cold-diffusion polish runs first, a start of the multi-start polish
    starts = {"cold_diffusion_var4d": (var_p, est["cold_diffusion"], times["cold_diffusion"]),
              "var4d_from_truth": (var, x, 0.0)}
    if settings.var4d.strong_factor is not None:
        var_s = build_var4d(data, settings.var4d, settings.var4d.strong_factor)
        var_sp = build_var4d(data, settings.var4d, settings.var4d.strong_factor, polish=True)
        starts.update({"var4d_strong": (var_s, est["z0"], 0.0),
                       "neural_var4d_strong": (var_sp, est["neural"], times["neural"]),
                       "cold_diffusion_var4d_strong": (var_sp, est["cold_diffusion"], times["cold_diffusion"])})

    def run_starts(names):
        for name in names:
            solver, start, t_start = starts.pop(name)
            bar = tqdm(total=settings.var4d.max_iter, desc=f"4D-Var {name}", disable=not progress, leave=False)
            runs[name], times[name] = _timed(lambda solver=solver, start=start, bar=bar: solver.solve(
                to_raw(start), yraw, data.test.mask, lambda k, n: bar.update(1)), repeat=1)
            bar.close()
            times[name] += t_start
            est[name] = data.norm.to_norm(runs[name].x).reshape(N, -1)

    if settings.var4d.polish_draws > 0:
        baselines = settings.var4d.polish_baselines
        if baselines:
            run_starts(["cold_diffusion_var4d"])
        runs["neural_var4d_single"], est["neural_var4d_single"] = runs["neural_var4d"], est["neural_var4d"]
        times["neural_var4d_single"] = times["neural_var4d"]
        extra = (runs["var4d"], runs["cold_diffusion_var4d"]) if baselines else ()
        (runs["neural_var4d"], multistart), t_ms = _timed(lambda: multistart_polish(
            settings, data, priors["neural"], z0d, yd, mask, var_p, var, runs["neural_var4d_single"], extra))
        est["neural_var4d"] = data.norm.to_norm(runs["neural_var4d"].x).reshape(N, -1)
        times["neural_var4d"] = t_ms + times["neural_var4d_single"] + (
            times["var4d"] + times["cold_diffusion_var4d"] if baselines else 0.0)
        multistart["baselines"] = baselines
    run_starts(list(starts))
    ps_info = {}
    if settings.particle_smoother.n_particles > 0:
        log.info("particle smoother: %d particles x %d windows", settings.particle_smoother.n_particles, N)
        ps, times["particle_smoother"] = run_particle_smoother(data, data.test, settings.particle_smoother)
        est["particle_smoother"] = data.norm.to_norm(ps.mean.double()).reshape(N, -1)
        ess = ps.ess_min.double()
        ps_info = {"n_particles": ps.n_particles, "ess_min_median": float(ess.median()), "ess_min_min": float(ess.min()),
                   "unique_x0_median": float(ps.n_unique0.double().median()),
                   "unique_x0_min": int(ps.n_unique0.min())}
    shown = [m for m in (*METHODS, *EXTRA) if m in est]

    metrics = {}
    for m in shown:
        xr = to_raw(est[m])
        metrics[m] = {
            "rmse": rmse(est[m], x),
            "rmse_raw": rmse(xr, data.norm.to_raw(data.test.x)),
            "time_per_window_ms": 1e3 * times[m] / N,
        }
        if m == "particle_smoother":
            metrics[m].update(ps_info)
        if m in runs:
            it = runs[m].iters.double()
            metrics[m]["gn_iters_median"] = float(it.median())
            metrics[m]["gn_iters_mean"] = float(it.mean())
            metrics[m]["converged_fraction"] = float(runs[m].converged.double().mean())
            metrics[m]["cost_median"] = float(runs[m].cost.median())
    # Algorithm 2's iterations: the error of each MAP output x_k (k = 0: one MAP step from z0)
    _, path = incremental_assimilation(priors["neural"], z0d, yd, mask, data.R_norm, levels, update=settings.update,
                                       return_path=True)
    level_rmse = [rmse(p, x) for p in path]
    cost_truth = var.cost(data.norm.to_raw(data.test.x), yraw, data.test.mask)
    extra = {
        "update_rmse": updates,
        "capacity_selection": selection,
        "early_stopping": stopping,
        "skipped_training_steps": skipped,
        "multistart": multistart if settings.var4d.polish_draws > 0 else None,
        "level_rmse": level_rmse,
        "update_used": settings.update,
        "update_notes": update_notes,
        "levels": levels,
        "z0": fg.description,
        "cost_truth_median": float(cost_truth.median()),
        "n_test_windows": N,
        "n_train_pairs": len(data.train),
        "processes_train": data.processes_train,
        "processes_test": data.processes_test,
        "process_family": "all" if data.processes_heldout else "heldout",
        "obs_std_norm": data.obs_std_norm,
        "obs_std_raw": data.obs_std_raw,
        "model_noise_var": data.model_noise_var,
        "normaliser": {"mean": data.norm.mean.tolist(), "std": data.norm.std.tolist()},
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        # distinct local minima: final costs differing by more than 1 (J is half a chi-square;
        # stopping within decrement_tol of a minimum moves J by far less)
        "minima": {
            "polish_lower_fraction": float((runs["neural_var4d"].cost < runs["var4d"].cost - 1.0).double().mean()),
            "z0_lower_fraction": float((runs["var4d"].cost < runs["neural_var4d"].cost - 1.0).double().mean()),
            # 4D-Var from z0 ends in a minimum of higher cost than 4D-Var started from the truth
            "var4d_worse_fraction": float((runs["var4d"].cost > runs["var4d_from_truth"].cost + 1.0).double().mean()),
            "neural_var4d_worse_fraction": float(
                (runs["neural_var4d"].cost > runs["var4d_from_truth"].cost + 1.0).double().mean()),
            **({"neural_var4d_single_worse_fraction": float(
                (runs["neural_var4d_single"].cost > runs["var4d_from_truth"].cost + 1.0).double().mean())}
               if "neural_var4d_single" in runs else {}),
        },
    }
    if data.test_seen is not None:  # diagnostic: same held-out trajectories, training processes
        xs, ys, ms = data.test_seen.flat()
        zs = fg(data.test_seen)
        extra["seen_processes"] = {
            "z0": rmse(zs, xs),
            "neural": rmse(incremental_assimilation(priors["neural"], zs.to(dtype), ys.to(dtype), ms, data.R_norm,
                                                    levels, update=settings.update), xs),
            "cold_diffusion": rmse(incremental_assimilation(priors["cold_diffusion"], zs.to(dtype), ys.to(dtype), ms,
                                                            data.R_norm, levels, update=settings.update,
                                                            conditional=False), xs),
        }
    if settings.var4d.polish_lm_init is not None:  # the polishes again with 4D-Var's own damping lm_init
        same = {}
        pairs = [("neural_var4d", var, est["neural"])]
        if settings.var4d.strong_factor is not None:
            pairs.append(("neural_var4d_strong", var_s, est["neural"]))
        for name, solver, start in pairs:
            r = solver.solve(to_raw(start), yraw, data.test.mask)
            same[name] = {"gn_iters_median": float(r.iters.double().median()),
                          "rmse": rmse(data.norm.to_norm(r.x).reshape(N, -1), x)}
        extra["polish_damping"] = {"lm_init": settings.var4d.lm_init, "polish_lm_init": settings.var4d.polish_lm_init,
                                   "with_lm_init": same}
    if "neural_heldout" in priors:  # diagnostic of processes="all": a model trained without some phases
        held = torch.isin(data.test.process, torch.tensor(data.processes_heldout))
        heldout = {"processes": [data.processes_test[i] for i in data.processes_heldout]}
        for part, sel in (("heldout", held), ("seen", ~held)):
            est_h = incremental_assimilation(priors["neural_heldout"], z0d[sel], yd[sel], mask[sel], data.R_norm,
                                             levels, update=settings.update)
            heldout[part] = {"n_windows": int(sel.sum()), "neural_without": rmse(est_h, x[sel]),
                             "neural": rmse(est["neural"][sel], x[sel]), "z0": rmse(z0_test[sel], x[sel]),
                             "cold_diffusion": rmse(est["cold_diffusion"][sel], x[sel])}
        extra["heldout_processes"] = heldout
    if data.system == "pendulum":  # windows outside the linear regime: max |q| > 45 degrees
        qmax = data.norm.to_raw(data.test.x)[..., 0].abs().amax(-1)
        big = qmax > math.pi / 4
        extra["large_angle"] = {"threshold_rad": math.pi / 4, "n_windows": int(big.sum()),
                                **{m: rmse(est[m][big], x[big]) for m in shown}}
        extra["small_angle"] = {"n_windows": int((~big).sum()),
                                **{m: rmse(est[m][~big], x[~big]) for m in shown}}
    estimates = {m: est[m].reshape(N, T, phi) for m in shown}
    return ExperimentResult(metrics, estimates, runs, data, histories, extra)
