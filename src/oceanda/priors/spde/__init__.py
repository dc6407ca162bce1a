"""SPDE Gaussian prior (4DVarNet-Gen): the prior, its precision operator, posterior solvers."""

from oceanda.priors.spde.prior import PARAM_NAMES, SPDEPrior, tau_for_std

__all__ = ["PARAM_NAMES", "SPDEPrior", "tau_for_std"]
