"""4DVarNet as the public 4dvarnet-starter writes it (``src/models.py``: ``BilinAEPriorCost``,
``ConvLstmGradModel``, ``BaseObsCost``, ``GradSolver``), re-implemented op for op: the
reference that ``tests/unit/test_fourdvarnet.py`` checks oceanda's model against (same
weights, same outputs) and that ``hpc/bench/fourdvarnet.py`` times ours against.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from oceanda.assim.fourdvarnet import FourDVarNet


class RefBilinAEPriorCost(nn.Module):
    def __init__(self, dim_in, dim_hidden, kernel_size=3, downsamp=None, bilin_quad=True):
        super().__init__()
        self.bilin_quad = bilin_quad
        p = kernel_size // 2
        self.conv_in = nn.Conv2d(dim_in, dim_hidden, kernel_size=kernel_size, padding=p)
        self.conv_hidden = nn.Conv2d(dim_hidden, dim_hidden, kernel_size=kernel_size, padding=p)
        self.bilin_1 = nn.Conv2d(dim_hidden, dim_hidden, kernel_size=kernel_size, padding=p)
        self.bilin_21 = nn.Conv2d(dim_hidden, dim_hidden, kernel_size=kernel_size, padding=p)
        self.bilin_22 = nn.Conv2d(dim_hidden, dim_hidden, kernel_size=kernel_size, padding=p)
        self.conv_out = nn.Conv2d(2 * dim_hidden, dim_in, kernel_size=kernel_size, padding=p)
        self.down = nn.AvgPool2d(downsamp) if downsamp is not None else nn.Identity()
        self.up = nn.UpsamplingBilinear2d(scale_factor=downsamp) if downsamp is not None else nn.Identity()

    def forward_ae(self, x):
        x = self.down(x)
        x = self.conv_in(x)
        x = self.conv_hidden(F.relu(x))
        nonlin = self.bilin_21(x) ** 2 if self.bilin_quad else (self.bilin_21(x) * self.bilin_22(x))
        x = self.conv_out(torch.cat([self.bilin_1(x), nonlin], dim=1))
        return self.up(x)

    def forward(self, state):
        return F.mse_loss(state, self.forward_ae(state))


class RefBaseObsCost(nn.Module):
    def forward(self, state, obs):
        msk = obs.isfinite()
        return F.mse_loss(state[msk], obs.nan_to_num()[msk])


class RefConvLstmGradModel(nn.Module):
    def __init__(self, dim_in, dim_hidden, kernel_size=3, dropout=0.1):
        super().__init__()
        self.dim_hidden = dim_hidden
        self.gates = nn.Conv2d(dim_in + dim_hidden, 4 * dim_hidden, kernel_size=kernel_size,
                               padding=kernel_size // 2)
        self.conv_out = nn.Conv2d(dim_hidden, dim_in, kernel_size=kernel_size, padding=kernel_size // 2)
        self.dropout = nn.Dropout(dropout)
        self._state = []
        self.down = nn.Identity()
        self.up = nn.Identity()

    def reset_state(self, inp):
        size = [inp.shape[0], self.dim_hidden, *inp.shape[-2:]]
        self._grad_norm = None
        self._state = [self.down(torch.zeros(size, device=inp.device)),
                       self.down(torch.zeros(size, device=inp.device))]

    def forward(self, x):
        if self._grad_norm is None:
            self._grad_norm = (x ** 2).mean().sqrt()
        x = x / self._grad_norm
        hidden, cell = self._state
        x = self.dropout(x)
        x = self.down(x)
        gates = self.gates(torch.cat((x, hidden), 1))
        in_gate, remember_gate, out_gate, cell_gate = gates.chunk(4, 1)
        in_gate, remember_gate, out_gate = map(torch.sigmoid, [in_gate, remember_gate, out_gate])
        cell_gate = torch.tanh(cell_gate)
        cell = (remember_gate * cell) + (in_gate * cell_gate)
        hidden = out_gate * torch.tanh(cell)
        self._state = hidden, cell
        return self.up(self.conv_out(hidden))


class RefGradSolver(nn.Module):
    def __init__(self, prior_cost, obs_cost, grad_mod, n_step, lr_grad=0.2):
        super().__init__()
        self.prior_cost, self.obs_cost, self.grad_mod = prior_cost, obs_cost, grad_mod
        self.n_step, self.lr_grad = n_step, lr_grad

    def solver_step(self, state, obs, step):
        var_cost = self.prior_cost(state) + self.obs_cost(state, obs)
        grad = torch.autograd.grad(var_cost, state, create_graph=True)[0]
        gmod = self.grad_mod(grad)
        return state - (1 / (step + 1) * gmod + self.lr_grad * (step + 1) / self.n_step * grad)

    def forward(self, obs):
        with torch.set_grad_enabled(True):
            state = obs.nan_to_num().detach().requires_grad_(True)
            self.grad_mod.reset_state(obs)
            for step in range(self.n_step):
                state = self.solver_step(state, obs, step=step)
                if not self.training:
                    state = state.detach().requires_grad_(True)
        return state


def sobel(x):
    """kornia.filters.sobel (normalized, replicate border, magnitude with eps 1e-6)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype) / 8.0
    k = torch.stack([kx, kx.T]).unsqueeze(1).to(x.device)
    b, c, h, w = x.shape
    xp = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    g = F.conv2d(xp, k).reshape(b, c, 2, h, w)
    return torch.sqrt(g[:, :, 0] ** 2 + g[:, :, 1] ** 2 + 1e-6)


def ref_training_loss(solver, obs, tgt, weight):
    out = solver(obs)
    def wmse(err):
        e = err * weight[None]
        ok = err.isfinite() & ~((torch.ones_like(err) * weight[None]) == 0.0)
        return F.mse_loss(e[ok], torch.zeros_like(e[ok]))
    loss = wmse(out - tgt)
    gloss = wmse(sobel(out) - sobel(tgt))
    pc = solver.prior_cost(out)
    return 50 * loss + 1000 * gloss + pc


def our_training_loss(model, obs, tgt, weight):
    out = model(obs)
    w = weight[None]
    def wmse(err):
        return ((err * w) ** 2).sum() / torch.count_nonzero(w.expand_as(err))
    return 50 * wmse(out - tgt) + 1000 * wmse(sobel(out) - sobel(tgt)) + model.prior_cost(out)


# ---------------------------------------------------------------- weights transfer


def copy_reference_weights(ref: RefGradSolver, ours: FourDVarNet) -> None:
    """Load the reference's weights into ours (same maths, re-packed tensors)."""
    rp, op = ref.prior_cost, ours.prior
    with torch.no_grad():
        for name in ("conv_in", "conv_hidden", "conv_out"):
            getattr(op, name).weight.copy_(getattr(rp, name).weight)
            getattr(op, name).bias.copy_(getattr(rp, name).bias)
        ws = [rp.bilin_1, rp.bilin_21] + ([] if op.quadratic else [rp.bilin_22])
        op.bilin.weight.copy_(torch.cat([m.weight for m in ws]))
        op.bilin.bias.copy_(torch.cat([m.bias for m in ws]))
        rg, og = ref.grad_mod, ours.grad_mod
        t = og.n_time
        og.gates_x.weight.copy_(rg.gates.weight[:, :t])
        og.gates_x.bias.copy_(rg.gates.bias)
        og.gates_h.weight.copy_(rg.gates.weight[:, t:])
        og.conv_out.weight.copy_(rg.conv_out.weight)
        og.conv_out.bias.copy_(rg.conv_out.bias)


def build_pair(n_time=15, prior_hidden=32, lstm_hidden=48, n_steps=10, seed=0):
    torch.manual_seed(seed)
    ref = RefGradSolver(RefBilinAEPriorCost(n_time, prior_hidden, downsamp=2), RefBaseObsCost(),
                        RefConvLstmGradModel(n_time, lstm_hidden), n_steps, lr_grad=0.2)
    ours = FourDVarNet(n_time, prior_hidden=prior_hidden, lstm_hidden=lstm_hidden,
                       n_steps=n_steps, lr_grad=0.2)
    copy_reference_weights(ref, ours)
    return ref, ours


def synthetic_patch(n_time=15, size=240, seed=1, frac_obs=0.03):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 6.28, size), torch.linspace(0, 6.28, size), indexing="ij")
    t = torch.arange(n_time, dtype=torch.float32)[:, None, None]
    tgt = (torch.sin(xx + 0.1 * t) * torch.cos(yy - 0.05 * t)).unsqueeze(0)
    obs = torch.where(torch.rand(tgt.shape, generator=g) < frac_obs, tgt, torch.full_like(tgt, float("nan")))
    return obs, tgt


# ---------------------------------------------------------------- timing
