"""Double-gyre QG truth (oceanda.dynamics.gyre): transforms, inversion, conservation, forcing
response, and the truth's dependence on the date only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

from oceanda.dynamics import gyre
from oceanda.errors import ConfigError, InputError

torch.set_num_threads(1)


def _small(**kw) -> gyre.GyreParams:
    base = dict(nx=24, ny=20, Lx=480e3, Ly=400e3, steps_per_day=8)
    base.update(kw)
    return gyre.GyreParams(**base)


def test_dst1_matches_scipy_and_inverts():
    x = torch.randn(3, 7, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = scipy.fft.dst(x.numpy(), type=1, axis=-1)
    np.testing.assert_allclose(gyre.dst1(x, -1).numpy(), ref, rtol=1e-12, atol=1e-12)
    ref2 = scipy.fft.dstn(x.numpy(), type=1, axes=(-2, -1))
    np.testing.assert_allclose(gyre.dst1(gyre.dst1(x, -1), -2).numpy(), ref2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gyre.idst2(gyre.dst2(x)).numpy(), x.numpy(), atol=1e-13)


def test_rossby_radius_of_two_layers_matches_the_closed_form():
    H1, H2, gp = 500.0, 3500.0, 0.02
    p = _small(H=(H1, H2), g_prime=(1e6, gp))  # near rigid lid: one baroclinic mode
    m = gyre.GyreModel(p)
    expect = math.sqrt(gp * H1 * H2 / (H1 + H2)) / p.f0 / 1e3
    assert m.rossby_radii_km[1] == pytest.approx(expect, rel=1e-4)


def test_inversion_solves_the_discrete_elliptic_problem_and_conserves_mass():
    p = _small()
    m = gyre.GyreModel(p)
    gen = torch.Generator().manual_seed(1)
    dq = torch.randn((p.nl, p.ny, p.nx), dtype=torch.float64, generator=gen) * 1e-6
    dpsi = m.psi_from_dq(dq)
    # (lap - f0^2 A) dpsi = dq interpolated to the interior vertices
    lhs = (m.laplacian(dpsi) - m.stretching(dpsi))[..., 1:-1, 1:-1]
    np.testing.assert_allclose(lhs.numpy(), m.to_inner_vertices(dq).numpy(), rtol=1e-9, atol=1e-18)
    # each layer constant on the walls; each mode's basin mean zero
    for f in dpsi:
        edge = torch.cat((f[0], f[-1], f[:, 0], f[:, -1]))
        assert float(edge.max() - edge.min()) <= 1e-12 * float(f.abs().max())
    modes = torch.einsum("lm,m...->l...", m.Cl2m, m.to_cells(dpsi)).mean(dim=(-2, -1))
    assert float(modes.abs().max()) < 1e-12 * float(dpsi.abs().max())


def test_flux_reconstruction_is_fifth_order_in_the_interior():
    errs = []
    for n in (40, 80):
        x = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # cell centres of [0, 1]
        # cell means of sin(2 pi x): exact face values are sin at the faces
        h = 1.0 / n
        q = (torch.cos(2 * math.pi * (x - h / 2)) - torch.cos(2 * math.pi * (x + h / 2))) / (2 * math.pi * h)
        faces = torch.sin(2 * math.pi * (torch.arange(1, n, dtype=torch.float64) / n))
        for u in (1.0, -1.0):
            f = gyre._flux(q[None], torch.full((1, n - 1), u, dtype=torch.float64), -1)[0] / u
            errs.append((n, u, float((f - faces)[3:-3].abs().max())))
    for u in (1.0, -1.0):
        e40 = next(e for n, uu, e in errs if n == 40 and uu == u)
        e80 = next(e for n, uu, e in errs if n == 80 and uu == u)
        assert math.log2(e40 / e80) > 4.5


def _poly_cells(coef: list[float], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell means on ``n`` cells of [0, 1] and the values at the ``n - 1`` interior faces of the
    polynomial ``sum c_k x^k`` (exact, from its antiderivative)."""
    x = torch.arange(n + 1, dtype=torch.float64) / n
    anti = sum(c * x ** (k + 1) / (k + 1) for k, c in enumerate(coef))
    faces = sum(c * x[1:-1] ** k for k, c in enumerate(coef))
    return torch.diff(anti) * n, faces


@pytest.mark.parametrize("u", [1.0, -1.0])
def test_flux_upwind_weight_blends_towards_the_centred_sixth_order_value(u):
    n = 16
    quint = [0.3, -1.0, 2.0, 0.5, -3.0, 4.0]  # degree 5: exact only for the centred 6-point value
    quart = quint[:5]  # degree 4: exact for the 5-point upwind one as well
    vel = torch.full((1, n - 1), u, dtype=torch.float64)
    err = {}
    for name, coef in (("quint", quint), ("quart", quart)):
        q, faces = _poly_cells(coef, n)
        for w in (0.0, 0.5, 1.0):
            f = gyre._flux(q[None], vel, -1, upwind=w)[0] / u
            err[name, w] = float((f - faces)[2:-2].abs().max())  # the 5-point faces
    assert err["quint", 0.0] < 1e-12 and err["quart", 0.5] < 1e-12 and err["quart", 1.0] < 1e-12
    assert err["quint", 1.0] > 1e-6  # the upwind bias is a 5th difference: degree 5 is not exact
    assert err["quint", 0.5] == pytest.approx(0.5 * err["quint", 1.0], rel=1e-9)
    with pytest.raises(ConfigError, match="truth.upwind"):
        _small(upwind=1.5)


def test_tilted_wind_forcing_is_the_curl_of_the_tilted_stress():
    tilt = 0.3
    p = _small(nx=40, ny=36, wind_tilt=tilt)
    m = gyre.GyreModel(p)
    x = (torch.arange(p.nx, dtype=torch.float64) + 0.5) * p.dx
    y = (torch.arange(p.ny, dtype=torch.float64) + 0.5) * p.dy

    def tau_x(yy):  # tau_x = -tau0 cos(2 pi (y - tilt (x - Lx/2)) / Ly)
        return -p.tau0 * torch.cos(2 * math.pi * (yy[:, None] - tilt * (x[None, :] - p.Lx / 2)) / p.Ly)

    h = 1e-3 * p.dy  # curl = -d tau_x / dy by a centred difference
    curl = -(tau_x(y + h) - tau_x(y - h)) / (2 * h)
    np.testing.assert_allclose(m.wind.numpy(), (curl / (p.rho0 * p.H[0])).numpy(), rtol=1e-6, atol=1e-20)
    # the zero-curl line passes through the basin centre and rises eastwards with the tilt
    for col in (0, p.nx - 1):
        w = m.wind[:, col]
        ys = (torch.nonzero(w[:-1] * w[1:] < 0)[:, 0] + 1).double() * p.dy  # sign changes between rows
        y_mid = float(ys[torch.argmin((ys - p.Ly / 2).abs())])
        assert y_mid == pytest.approx(p.Ly / 2 + tilt * (float(x[col]) - p.Lx / 2), abs=p.dy)
    flat = gyre.GyreModel(_small(nx=40, ny=36))
    assert torch.equal(flat.wind[:, 0], flat.wind[:, -1]) and not torch.equal(m.wind[:, 0], m.wind[:, -1])


def test_advection_conserves_total_pv_and_its_dissipation_converges():
    losses = []
    for n in (24, 48):
        p = _small(nx=n, ny=n * 20 // 24, tau0=0.0, drag=0.0, steps_per_day=n)
        m = gyre.GyreModel(p)
        psi = m.perturbation(torch.Generator().manual_seed(2), 0.1, scale=120e3)
        q = m.q_from_psi(psi)
        dq = m.tendency(q, psi)
        assert abs(float(dq.sum())) < 1e-12 * float(dq.abs().sum())  # flux form, closed walls
        e0 = float(m.energy(psi))
        q1, psi1 = m.run(q, psi, 3)
        assert float(q1.sum() - q.sum()) == pytest.approx(0.0, abs=1e-10 * float(q.abs().sum()))
        losses.append(1 - float(m.energy(psi1)) / e0)
    # the upwind scheme's implicit dissipation: positive, and much smaller at twice the resolution
    assert losses[0] > 0 and 0 <= losses[1] < losses[0] / 4


def test_a_smaller_upwind_weight_dissipates_less_and_still_conserves_pv():
    losses = []
    for w in (1.0, 0.5):
        p = _small(nx=48, ny=40, tau0=0.0, drag=0.0, steps_per_day=48, upwind=w)
        m = gyre.GyreModel(p)
        psi = m.perturbation(torch.Generator().manual_seed(2), 0.1, scale=120e3)
        q = m.q_from_psi(psi)
        q1, psi1 = m.run(q, psi, 3)
        assert float(q1.sum() - q.sum()) == pytest.approx(0.0, abs=1e-10 * float(q.abs().sum()))
        losses.append(1 - float(m.energy(psi1)) / float(m.energy(psi)))
    assert 0 < losses[1] < 0.5 * losses[0]  # measured: 0.5 % vs 2.5 % of the energy in 3 days


def test_wind_spins_up_a_western_intensified_double_gyre():
    p = _small(nx=32, ny=32, Lx=1.2e6, Ly=1.2e6, H=(1000.0,), g_prime=(0.02,), steps_per_day=6, drag=0.0)
    m = gyre.GyreModel(p)
    q, psi = m.rest_state()
    q, psi = m.run(q, psi, 60)
    eta = m.ssh(psi[0])
    south, north = eta[: p.ny // 2], eta[p.ny // 2 + 1:]
    assert float(south.mean()) > 0 > float(north.mean())  # anticyclonic subtropical gyre: high SSH
    # the northward western boundary current of the subtropical gyre is faster than any interior flow
    _, v = m.velocities(psi)
    row = v[0, p.ny // 4]
    assert float(row[:4].max()) > 2 * float(row[8:-4].abs().max())


@pytest.fixture
def state_file(tmp_path):
    p = _small(nx=32, ny=32, Lx=1.6e6, Ly=1.6e6)
    m = gyre.GyreModel(p)
    psi = m.perturbation(torch.Generator().manual_seed(5), 0.3, scale=300e3)
    path = tmp_path / "state.npz"
    gyre.save_state(path, p, psi, "2012-09-01", {"x0_km": 800.0, "y0_km": 800.0})
    return path


def _lonlat():
    return np.arange(-62.0, -58.0, 0.25), np.arange(36.0, 40.0, 0.25)


def test_truth_of_a_date_does_not_depend_on_the_period(state_file):
    lon, lat = _lonlat()
    cfg = gyre.GyreTruthConfig(state=str(state_file))
    full = np.stack(list(gyre.gyre_truth(lon, lat, np.datetime64("2012-09-01"), 5, seed=3, cfg=cfg)))
    late = np.stack(list(gyre.gyre_truth(lon, lat, np.datetime64("2012-09-04"), 2, seed=3, cfg=cfg)))
    np.testing.assert_array_equal(late, full[3:5])
    other = np.stack(list(gyre.gyre_truth(lon, lat, np.datetime64("2012-09-04"), 2, seed=4, cfg=cfg)))
    assert float(np.abs(other - late).max()) > 1e-3
    assert full.dtype == np.float32 and full.shape == (5, len(lat), len(lon))


def test_truth_errors_name_the_bad_input(state_file, tmp_path):
    lon, lat = _lonlat()
    cfg = gyre.GyreTruthConfig(state=str(state_file))
    with pytest.raises(ConfigError, match="reference date 2012-09-01"):
        gyre.gyre_truth(lon, lat, np.datetime64("2012-08-01"), 2, cfg=cfg)
    with pytest.raises(ConfigError, match="does not fit"):
        gyre.gyre_truth(np.arange(-80.0, -40.0, 1.0), lat, np.datetime64("2012-09-02"), 2, cfg=cfg)
    with pytest.raises(InputError, match="no such gyre state"):
        gyre.gyre_truth(lon, lat, np.datetime64("2012-09-02"), 2,
                        cfg=gyre.GyreTruthConfig(state=str(tmp_path / "missing.npz")))


def test_generate_osse_with_the_gyre_truth(state_file, tmp_path):
    import xarray as xr

    from oceanda.data.osse import generate_osse

    dom = {"name": "tiny", "lon_min": -61.0, "lon_max": -59.0, "lat_min": 37.0, "lat_max": 39.0,
           "resolution": 0.1, "land": False}
    truth = {"kind": "gyre", "state": str(state_file)}
    a = generate_osse(domain=dom, obs=None, period={"start": "2012-09-03", "end": "2012-09-04"}, out_dir=tmp_path / "a",
                      truth=truth, figures=False, progress=False, device="cpu")
    b = generate_osse(domain=dom, obs=None, period={"start": "2012-09-01", "end": "2012-09-04"}, out_dir=tmp_path / "b",
                      truth=truth, figures=False, progress=False, device="cpu")
    ta = xr.open_zarr(a["truth"])["ssh"].values
    tb = xr.open_zarr(b["truth"])["ssh"].values
    np.testing.assert_array_equal(ta, tb[2:])
