"""Datasets of the validation experiments (Blanke et al. 2024, Sec. 4), as the paper states them.

Lorenz-63: RK4 steps of ``dt = 0.025`` plus model noise ``N(0, dt I_3)`` at every step,
windows of ``T = 32`` states (``d = 96``) starting on the attractor (spin-up), each component
normalised to zero mean and unit variance (statistics of the training trajectories), ``u1``
observed every ``obs_every`` steps with noise std ``0.05`` in normalised units.

Pendulum: ``T = 100`` (``d = 200``) RK4 steps of ``dt = 0.1`` from initial conditions uniform
in ``[-3pi/4, 3pi/4] x [-1, 1]`` (large angles, outside the linear regime), small model
noise, position observed every ``obs_every`` steps with noise std ``rho = 0.01`` (radians).

An *observation process* is the set of observed times ``{phase + j * obs_every}``; the
``obs_every`` phases are shuffled and split into training and ``n_test_processes`` held-out
processes. ``processes`` chooses the family the test uses:

* ``"heldout"``: training pairs every training trajectory with every training process (one
  noise draw each), the test pairs the held-out trajectories with the held-out processes
  (observation times never seen in training); ``test_seen`` pairs the held-out trajectories
  with the training processes (a diagnostic);
* ``"all"``: training and test both use every phase (the family is finite: ``obs_every``
  phases), the test windows are held-out trajectories with new noise, as the authors'
  public code (its 16 test/train processes ``(24 j + 3 i) mod 96`` are 8 phases, each
  twice). ``test_heldout_split`` keeps the split (``processes_heldout``) for a diagnostic
  model trained without the held-out phases.

All arrays are float64, time-major ``(N, T, phi)``; ``y`` is zero where ``mask`` is False.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from oceanda.dynamics import lorenz63, pendulum
from oceanda.errors import ConfigError

DT64 = torch.float64


@dataclass(frozen=True)
class Normaliser:
    """Per-component affine map ``x_n = (x - mean) / std`` (``mean``, ``std`` ``(phi,)``)."""

    mean: torch.Tensor
    std: torch.Tensor

    def to_norm(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)

    def to_raw(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x) + self.mean.to(x)


@dataclass
class PairSet:
    """Pairs (trajectory, observation process): ``x``, ``y`` (normalised) and ``mask``
    ``(N, T, phi)``; ``traj`` and ``process`` ``(N,)`` indices."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    traj: torch.Tensor
    process: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def flat(self):
        """``(x, y, mask)`` flattened to ``(N, d)``."""
        N = len(self)
        return self.x.reshape(N, -1), self.y.reshape(N, -1), self.mask.reshape(N, -1)


@dataclass
class ToyData:
    """Everything an experiment needs: normalised pairs, the normaliser, the observation
    processes (lists of observed times), the noise levels and the physical settings."""

    system: str
    T: int
    phi: int
    dt: float
    train: PairSet
    test: PairSet
    norm: Normaliser
    processes_train: list[list[int]]
    processes_test: list[list[int]]
    obs_std_norm: float  #: observation-noise std, normalised units (R_n = obs_std_norm^2)
    obs_std_raw: float  #: the same in physical units
    model_noise_var: float  #: model-noise variance per step and component (physical)
    ic_box: tuple[float, float] | None = None  #: pendulum: (q_max, p_max) of the uniform initial states
    spinup_steps: int | None = None  #: Lorenz-63: spin-up of the attractor sampler
    raw_train_x: torch.Tensor | None = field(default=None, repr=False)
    #: diagnostic: held-out trajectories observed by the *training* processes
    test_seen: PairSet | None = field(default=None, repr=False)
    #: ``processes="all"``: indices (into ``processes_train`` = ``processes_test``) of the phases a
    #: diagnostic model is trained without (the split of ``processes="heldout"``); empty otherwise
    processes_heldout: list[int] = field(default_factory=list)
    #: mixture backgrounds of 4D-Var fitted to ``raw_train_x[:, 0]``, by number of components (filled
    #: once by :func:`oceanda.validation.runner.build_var4d`, which builds several solvers per run)
    x0_mixtures: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def R_norm(self) -> float:
        return self.obs_std_norm ** 2

    @property
    def R_raw(self) -> float:
        return self.obs_std_raw ** 2


def observation_processes(T: int, obs_every: int, n_test: int, generator: torch.Generator):
    """Split the ``obs_every`` phases into training and held-out test processes."""
    if obs_every < 1 or obs_every > T:
        raise ConfigError(f"obs_every must be in [1, T={T}], got {obs_every}")
    if not 1 <= n_test < obs_every:
        raise ConfigError(f"n_test_processes must be in [1, obs_every={obs_every}), got {n_test}")
    phases = torch.randperm(obs_every, generator=generator).tolist()
    procs = [list(range(p, T, obs_every)) for p in phases]
    return procs[n_test:], procs[:n_test]


def make_pairs(x: torch.Tensor, processes, comp: int, noise_std: float, generator) -> PairSet:
    """Every trajectory of ``x`` ``(N, T, phi)`` (normalised) paired with every observation
    process (a list of observed times of component ``comp``), with fresh noise of std ``noise_std``."""
    N, T, phi = x.shape
    xs, ys, ms, ti, pi = [], [], [], [], []
    for p, times in enumerate(processes):
        mask = torch.zeros(T, phi, dtype=torch.bool)
        mask[times, comp] = True
        noise = noise_std * torch.randn(N, T, phi, generator=generator, dtype=DT64)
        y = torch.where(mask, x + noise, torch.zeros_like(x))
        xs.append(x), ys.append(y), ms.append(mask.expand(N, T, phi))
        ti.append(torch.arange(N)), pi.append(torch.full((N,), p))
    return PairSet(torch.cat(xs), torch.cat(ys), torch.cat(ms), torch.cat(ti), torch.cat(pi))


PROCESS_FAMILIES = ("heldout", "all")


def _finish(system, raw_train, raw_test, T, phi, dt, obs_every, n_test_processes, obs_std_norm,
            obs_std_raw, model_noise_var, g, processes="heldout") -> ToyData:
    flat = raw_train.reshape(-1, phi)
    norm = Normaliser(flat.mean(0), flat.std(0))
    if obs_std_norm is None:
        obs_std_norm = obs_std_raw / float(norm.std[0])
    else:
        obs_std_raw = obs_std_norm * float(norm.std[0])
    if processes not in PROCESS_FAMILIES:
        raise ConfigError(f"experiment.data.processes must be one of {PROCESS_FAMILIES}, got {processes!r}")
    p_train, p_test = observation_processes(T, obs_every, n_test_processes, g)
    xtr, xte = norm.to_norm(raw_train), norm.to_norm(raw_test)
    common = dict(system=system, T=T, phi=phi, dt=dt, norm=norm, obs_std_norm=obs_std_norm, obs_std_raw=obs_std_raw,
                  model_noise_var=model_noise_var, raw_train_x=raw_train)
    if processes == "all":  # every phase, the split kept for the held-out diagnostic (the last n_test_processes)
        p_all = p_train + p_test
        return ToyData(train=make_pairs(xtr, p_all, 0, obs_std_norm, g), test=make_pairs(xte, p_all, 0, obs_std_norm, g),
                       processes_train=p_all, processes_test=p_all,
                       processes_heldout=list(range(len(p_train), len(p_all))), **common)
    return ToyData(
        train=make_pairs(xtr, p_train, 0, obs_std_norm, g), test=make_pairs(xte, p_test, 0, obs_std_norm, g),
        test_seen=make_pairs(xte, p_train, 0, obs_std_norm, g), processes_train=p_train, processes_test=p_test, **common,
    )


def make_lorenz63(n_train: int, n_test: int, T: int = 32, dt: float = 0.025, spinup_steps: int = 2000,
                  obs_every: int = 8, obs_noise: float = 0.05, n_test_processes: int = 3,
                  seed: int = 0, processes: str = "heldout") -> ToyData:
    """Lorenz-63 windows (module docstring); ``obs_noise`` in normalised units."""
    _check_sizes(n_train, n_test, T)
    g = torch.Generator().manual_seed(seed)
    noise_std = math.sqrt(dt)
    x0 = lorenz63.sample_attractor(n_train + n_test, dt, spinup_steps, noise_std, g)
    traj = lorenz63.simulate(x0, T - 1, dt, noise_std, g)
    data = _finish("lorenz63", traj[:n_train], traj[n_train:], T, 3, dt, obs_every, n_test_processes,
                   obs_noise, None, dt, g, processes)
    data.spinup_steps = spinup_steps
    return data


def make_pendulum(n_train: int, n_test: int, T: int = 100, dt: float = 0.1, obs_every: int = 10,
                  obs_noise: float = 0.01, model_noise_var: float = 1e-5, q_max: float = 0.75 * math.pi,
                  p_max: float = 1.0, n_test_processes: int = 3, seed: int = 0, processes: str = "heldout") -> ToyData:
    """Pendulum windows (module docstring); ``obs_noise`` (rho) in radians."""
    _check_sizes(n_train, n_test, T)
    g = torch.Generator().manual_seed(seed)
    x0 = pendulum.sample_initial(n_train + n_test, q_max, p_max, g)
    traj = pendulum.simulate(x0, T - 1, dt, math.sqrt(model_noise_var), g)
    data = _finish("pendulum", traj[:n_train], traj[n_train:], T, 2, dt, obs_every, n_test_processes,
                   None, obs_noise, model_noise_var, g, processes)
    data.ic_box = (q_max, p_max)
    return data


def _check_sizes(n_train, n_test, T):
    if n_train < 2 or n_test < 1 or T < 2:
        raise ConfigError(f"experiment.data: need n_train >= 2, n_test >= 1, T >= 2 (got {n_train}, {n_test}, {T})")


def check_data(maker, data: dict) -> None:
    """The checks ``maker(**data)`` (:func:`make_lorenz63` / :func:`make_pendulum`) runs first,
    without making the data (``oceanda config validate validate``)."""
    import inspect

    args = inspect.signature(maker).bind(**data)
    args.apply_defaults()
    _check_sizes(args.arguments["n_train"], args.arguments["n_test"], args.arguments["T"])
