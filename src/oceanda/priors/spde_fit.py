"""Maximum-likelihood fitting of SPDE prior parameters from trajectories.

Minimises the exact negative log-likelihood (:meth:`SPDEPrior.nll`, quadratic form by the
matrix-free stencil plus the dense log-det of the ``n x n`` blocks, autograd through both)
summed over training trajectories, with L-BFGS in unconstrained coordinates:
``log`` for the positive parameters (``kappa``, ``tau``, ``gamma``, ``beta``), identity for
the signed ones (``vx``, ``vy``, ``mx``, ``my``). A parameter is *stationary* (one scalar)
or *spatially varying*: its log (or value) is bilinear in a coarse ``(cy, cx)`` grid of
control values, ``cy, cx >= 2``. Standard errors come from the inverse Hessian of the NLL
at the optimum (observed Fisher information).

Log-determinant (``logdet``): ``"dense"`` (dense ``slogdet`` of the ``n x n`` blocks, exact,
``n <= 6000``) or ``"sparse"`` (sparse factors: exact value, and for stationary parameters an
exact gradient by the complex step, :meth:`SPDEPrior.logdet_torch`; standard errors then from
central differences of that gradient); ``"auto"``: dense for spatially varying fits or grids
of at most 6000 cells, sparse otherwise (e.g. 100 x 100 patches).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as Fnn

from oceanda.errors import ConfigError, InputError
from oceanda.priors.spde import PARAM_NAMES, SPDEPrior

POSITIVE = ("kappa", "tau", "gamma", "beta")


@dataclass
class SPDEFit:
    """Result of :func:`fit_spde`: ``params`` (name -> float or ``(ny, nx)`` array),
    ``stderr`` (name -> float or array of the control values' standard errors in the
    unconstrained coordinates, ``None`` if the Hessian is singular), final ``nll`` (sum
    over trajectories) and the number of L-BFGS ``iterations``."""

    params: dict
    stderr: dict | None
    nll: float
    iterations: int


def fit_spde(
    x,
    dx,
    dy,
    ocean=None,
    *,
    dt: float = 1.0,
    alpha: int = 2,
    init: str = "stationary",
    fit: dict | None = None,
    fixed: dict | None = None,
    spatial: dict | None = None,
    max_iter: int = 200,
    tol: float = 1e-9,
    stderr: bool = True,
    logdet: str = "auto",
) -> SPDEFit:
    """Fit SPDE parameters to trajectories ``x`` ``(N, T, ny, nx)`` by maximum likelihood.

    Args:
        x: training trajectories (prior mean 0; subtract a mean first).
        dx, dy, ocean, dt, alpha, init: as :class:`SPDEPrior`.
        fit: name -> initial value of each fitted parameter (default
            ``{"kappa": 0.5, "tau": 1.0, "gamma": 1.0}``).
        fixed: name -> value of the parameters held fixed.
        spatial: name -> ``(cy, cx)`` coarse control grid for parameters fitted as
            spatially varying fields (the others in ``fit`` are stationary).
        logdet: ``"auto"``, ``"dense"`` or ``"sparse"`` (module docstring).
    """
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if x.ndim != 4:
        raise InputError(f"fit_spde: x must be (N, T, ny, nx), got {tuple(x.shape)}")
    fit = dict(fit or {"kappa": 0.5, "tau": 1.0, "gamma": 1.0})
    fixed = dict(fixed or {})
    spatial = dict(spatial or {})
    for name in list(fit) + list(fixed):
        if name not in PARAM_NAMES:
            raise ConfigError(f"fit_spde: unknown SPDE parameter {name!r}")
    for name, cg in spatial.items():
        if name not in fit or len(cg) != 2 or min(cg) < 2:
            raise ConfigError(f"fit_spde: spatial[{name!r}] must be a (cy, cx) grid >= 2 of "
                              "a fitted parameter")
    ny, nx = x.shape[-2:]
    if logdet not in ("auto", "dense", "sparse"):
        raise ConfigError(f"fit_spde: logdet must be 'auto', 'dense' or 'sparse', got {logdet!r}")
    if logdet == "auto":
        logdet = "dense" if (spatial or ny * nx <= 6000) else "sparse"
    raw = {}
    for name, v0 in fit.items():
        u0 = float(np.log(v0)) if name in POSITIVE else float(v0)
        shape = tuple(spatial[name]) if name in spatial else ()
        raw[name] = torch.full(shape, u0, dtype=torch.float64, requires_grad=True)

    def to_params(raw_):
        out = dict(fixed)
        for name, u in raw_.items():
            if u.ndim == 2:
                u = Fnn.interpolate(u[None, None], size=(ny, nx), mode="bilinear",
                                    align_corners=True)[0, 0]
            out[name] = torch.exp(u) if name in POSITIVE else u
        return out

    T = x.shape[1]

    def nll_of(raw_):
        P = SPDEPrior(dx, dy, ocean, T=T, dt=dt, alpha=alpha, init=init, **to_params(raw_))
        return P.nll(x, logdet_method=logdet).sum()

    opt = torch.optim.LBFGS(list(raw.values()), max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=tol * 1e-3, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nll_of(raw)
        loss.backward()
        return loss

    opt.step(closure)
    iters = opt.state[opt._params[0]]["n_iter"]
    with torch.no_grad():
        final = float(nll_of(raw))
    params = {k: (v.detach().numpy() if v.ndim else float(v))
              for k, v in to_params({k: u.detach() for k, u in raw.items()}).items()}
    errs = None
    if stderr:
        names = list(raw)
        flat0 = torch.cat([raw[k].detach().reshape(-1) for k in names])
        sizes = [raw[k].numel() for k in names]

        def f(flat):
            parts = torch.split(flat, sizes)
            return nll_of({k: p.reshape(raw[k].shape) for k, p in zip(names, parts)})

        if logdet == "dense":
            Hm = torch.autograd.functional.hessian(f, flat0)
        else:  # the sparse log-det has no second derivative: differences of the gradient
            def grad(flat):
                flat = flat.detach().clone().requires_grad_(True)
                return torch.autograd.grad(f(flat), flat)[0]

            h = 1e-4
            cols = []
            for i in range(flat0.numel()):
                e = torch.zeros_like(flat0)
                e[i] = h
                cols.append((grad(flat0 + e) - grad(flat0 - e)) / (2 * h))
            Hm = torch.stack(cols, 1)
            Hm = 0.5 * (Hm + Hm.T)
        try:
            cov = torch.linalg.inv(Hm)
            sd = torch.sqrt(torch.clamp(torch.diagonal(cov), min=0.0))
            errs = {k: (p.reshape(raw[k].shape).numpy() if raw[k].ndim else float(p))
                    for k, p in zip(names, torch.split(sd, sizes))}
        except RuntimeError:
            errs = None
    return SPDEFit(params=params, stderr=errs, nll=final, iterations=int(iters))
