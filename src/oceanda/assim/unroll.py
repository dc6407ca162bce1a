"""Unrolling of a solver step: ``x_{k+1}, s_{k+1} = step(x_k, s_k, k, ...)``, ``k = 0..n-1``.

Kept apart from the step itself (:class:`oceanda.assim.fourdvarnet.SolverStep`) so that the
loop can be tested, truncated or replaced (e.g. by a compiled or checkpointed loop) without
touching the model. The step is any callable
``step(x, state, k, *args, create_graph=...) -> (x_new, state_new)``; the recurrent state
starts as ``state_factory()`` (an empty :class:`~oceanda.assim.convlstm.LSTMState`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from oceanda.assim.convlstm import LSTMState


def unroll(step: Callable[..., tuple[Tensor, Any]], x0: Tensor, state0: Any, n_steps: int,
           *args: Any, create_graph: bool = False, return_all: bool = False,
           **kwargs: Any) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Apply ``step`` ``n_steps`` times from ``(x0, state0)``; returns ``x_n``
    (and the list ``[x_0, ..., x_n]`` when ``return_all``).

    Without ``create_graph`` each iterate is detached, so memory does not grow with
    ``n_steps`` (inference); with it the whole unrolled graph is kept for training.
    """
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    x, state = x0, state0
    xs = [x0] if return_all else []
    for k in range(n_steps):
        x, state = step(x, state, k, *args, create_graph=create_graph, **kwargs)
        if not create_graph:
            x = x.detach()
        if return_all:
            xs.append(x)
    return (x, xs) if return_all else x


class UnrolledSolver(nn.Module):
    """``n_steps`` unrolled applications of a solver-step module (its parameters are shared
    across steps). ``forward(x0, *args, create_graph=False)`` -> ``x_n``; extra ``args``
    (observations, masks) are passed to every step. ``state_factory`` builds the initial
    recurrent state (default: an empty ConvLSTM state)."""

    def __init__(self, step: nn.Module, n_steps: int,
                 state_factory: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.step, self.n_steps = step, int(n_steps)
        self.state_factory = state_factory if state_factory is not None else LSTMState

    def forward(self, x0: Tensor, *args: Any, create_graph: bool = False,
                return_all: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        ctx = torch.enable_grad() if create_graph else torch.no_grad()
        if torch.is_inference_mode_enabled():
            ctx = torch.inference_mode()
        with ctx:
            return unroll(self.step, x0, self.state_factory(), self.n_steps, *args,
                          create_graph=create_graph, return_all=return_all)
