"""Two-layer QG truth generator: conservation, Rossby waves, sampling, seeds, spectra."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from oceanda.dynamics import qg
from oceanda.errors import ConfigError

F64 = torch.float64


def _free(**kw) -> qg.QGParams:
    """Unforced, undamped 64x64 model (beta kept unless overridden)."""
    base = dict(nx=64, ny=64, Lx=640e3, Ly=640e3, Ld=30e3, jet_u=0.0, tau_relax=math.inf, rek=0.0)
    base.update(kw)
    return qg.QGParams(**base)


def _random_state(model: qg.QGModel, seed: int = 0) -> torch.Tensor:
    return model.random_state(torch.Generator().manual_seed(seed), ssh_amp=0.1, scale=40e3)


@pytest.mark.parametrize("beta", [0.0, 1.8e-11])
def test_advection_conserves_energy_and_enstrophy(beta):
    model = qg.QGModel(_free(beta=beta), dtype=F64)
    qh = _random_state(model)
    # semi-discrete: each layer's <psi_i, dq_i/dt> (energy) and, without beta,
    # <q_i, dq_i/dt> (enstrophy) vanish to round-off for the dealiased advection
    tend = model.tendency(qh, forcing=False)
    psih = model.invert(qh)
    rel_e = model.spectral_sum(psih, tend) / model.spectral_sum(psih.abs(), tend.abs())
    assert float(rel_e.abs().max()) < 1e-13
    if beta == 0.0:
        rel_z = model.spectral_sum(qh, tend) / model.spectral_sum(qh.abs(), tend.abs())
        assert float(rel_z.abs().max()) < 1e-13
    # time-discrete: RK4 drifts by O(dt^5) per step
    e0, z0 = model.energy(qh), model.enstrophy(qh)
    dt = 0.1 * model.p.dx / model.max_speed(qh)
    q = qh
    for _ in range(20):
        q = model.step(q, dt, forcing=False, hyperviscosity=False)
    e1, z1 = model.energy(q), model.enstrophy(q)
    assert float(((q - qh).abs()).max()) > 1e-3 * float(qh.abs().max())  # the flow did evolve
    assert abs(float(e1 / e0) - 1) < 1e-8
    if beta == 0.0:
        torch.testing.assert_close(z1, z0, rtol=1e-8, atol=0)
    # dissipation only removes energy
    q = qh
    for _ in range(5):
        q = model.step(q, dt, forcing=True, hyperviscosity=True)
    model_d = qg.QGModel(replace(model.p, rek=1 / (5 * qg.DAY)), dtype=F64)
    qd = qh
    for _ in range(5):
        qd = model_d.step(qd, dt)
    assert float(model_d.energy(qd)) < float(e0)


@pytest.mark.parametrize("mode", ["barotropic", "baroclinic"])
@pytest.mark.parametrize("U", [0.0, 0.1])
def test_linear_rossby_wave_phase_speed(mode, U):
    p = _free(beta=1.8e-11, U1=U, U2=U)
    model = qg.QGModel(p, dtype=F64)
    ik, il = 3, 2
    k, l = 2 * math.pi * ik / p.Lx, 2 * math.pi * il / p.Ly
    K2 = k * k + l * l
    ratio = 1.0 if mode == "barotropic" else -p.delta  # psi2 = ratio * psi1
    kd2 = 0.0 if mode == "barotropic" else p.F1 + p.F2
    omega = U * k - p.beta * k / (K2 + kd2)  # psi ~ exp(i (k x + l y - omega t))
    x = model.x[None, :]
    y = model.y[:, None]
    psi1 = 1e3 * torch.cos(k * x + l * y)
    psi = torch.stack((psi1, ratio * psi1))
    qh = model.pv_from_psi(model.fft(psi))
    T = 5 * qg.DAY
    n = 200
    for _ in range(n):
        qh = model.step(qh, T / n, nonlinear=False, forcing=False, hyperviscosity=False)
    psih = model.invert(qh)
    a0 = model.fft(psi)[0, il, ik]
    a1 = psih[0, il, ik]
    phase = float(torch.angle(a1 / a0))
    assert phase == pytest.approx(-omega * T, abs=1e-7)
    assert float(abs(a1 / a0)) == pytest.approx(1.0, abs=1e-9)
    # the mode kept its vertical structure
    torch.testing.assert_close(psih[1, il, ik], ratio * a1, rtol=1e-9, atol=0)


def test_baroclinic_instability_grows_only_above_critical_shear():
    """Phillips model: a uniform shear destabilises the baroclinic mode iff U1 - U2 > beta / F2
    (for delta < 1, long waves); below it the flow stays linearly stable."""
    p = _free(nx=32, ny=32, beta=1.8e-11)
    crit = p.beta / p.F2
    growth = {}
    for factor in (0.5, 3.0):
        model = qg.QGModel(replace(p, U1=factor * crit, U2=0.0), dtype=F64)
        qh = model.random_state(torch.Generator().manual_seed(0), ssh_amp=1e-6, scale=100e3)
        e0 = float(model.energy(qh))
        for _ in range(120):
            qh = model.step(qh, 0.5 * qg.DAY, nonlinear=False, forcing=False, hyperviscosity=False)
        growth[factor] = float(model.energy(qh)) / e0
    assert growth[3.0] > 10.0
    assert growth[0.5] < 2.0


def test_jet_forcing_profile():
    p = qg.QGParams(nx=32, ny=128, Lx=320e3, Ly=1280e3, jet_u=0.8, jet_width=50e3, jet_y=100e3)
    model = qg.QGModel(p, dtype=F64)
    psi = model.jet_psi1()
    # u = -dpsi/dy by a spectral derivative vs the sech^2 profile minus its mean
    l = 2 * math.pi * torch.fft.fftfreq(p.ny, d=p.dy, dtype=F64)
    u = -torch.fft.ifft(1j * l * torch.fft.fft(psi)).real
    d = torch.remainder(model.y - p.jet_y + p.Ly / 2, p.Ly) - p.Ly / 2
    ref = p.jet_u / torch.cosh(d / p.jet_width) ** 2
    torch.testing.assert_close(u, ref - ref.mean(), rtol=0, atol=1e-9)
    # the SSH step across the jet is f0/g * U0 * 2 w (northward drop for an eastward jet)
    ssh = model.ssh(model.qh_jet)[:, 0]
    jump = float(ssh[model.y.argmin()] - ssh[p.ny // 2 + 2 * p.ny // 10])
    assert jump > 0


def test_spectral_sampler_matches_closed_form():
    p = _free(nx=64, ny=48, Lx=640e3, Ly=480e3)
    model = qg.QGModel(p, dtype=F64)
    k, l = 2 * math.pi * 9 / p.Lx, 2 * math.pi * 7 / p.Ly  # ~70 km wavelength, 8 dx
    f = torch.cos(k * model.x[None, :] + l * model.y[:, None] + 0.3)
    rng = np.random.default_rng(1)
    x = rng.uniform(-250e3, 250e3, size=(5, 7))
    y = rng.uniform(-180e3, 180e3, size=(5, 7))
    out = qg.SpectralSampler(model, x, y)(model.fft(f))
    np.testing.assert_allclose(out, np.cos(k * x + l * y + 0.3), rtol=0, atol=1e-3)
    with pytest.raises(ConfigError, match="does not fit"):
        qg.SpectralSampler(model, np.array([[400e3]]), np.array([[0.0]]))


def test_resample_coarse_to_fine_is_exact_for_resolved_modes():
    p = _free(nx=32, ny=32)
    coarse = qg.QGModel(p, dtype=F64)
    fine = qg.QGModel(replace(p, nx=64, ny=64), dtype=F64)
    qh = _random_state(coarse)
    qf = coarse.resample(qh, fine)
    torch.testing.assert_close(fine.ifft(qf)[:, ::2, ::2], coarse.ifft(qh), rtol=0, atol=1e-12)
    torch.testing.assert_close(fine.energy(qf), coarse.energy(qh), rtol=1e-12, atol=0)


def _tiny_truth(seed):
    lon = np.arange(-60.0, -58.0, 0.25) + 0.125
    lat = np.arange(37.0, 39.0, 0.25) + 0.125
    cfg = qg.QGTruthConfig(dx_km=20.0, margin_km=100.0, spinup_days=4, spinup_fine_days=1, dtype="float64")
    return np.stack(list(qg.qg_truth(lon, lat, days=2, seed=seed, cfg=cfg)))


def test_truth_is_reproducible_from_seed():
    a, b, c = _tiny_truth(3), _tiny_truth(3), _tiny_truth(4)
    assert a.shape == (2, 8, 8) and a.dtype == np.float32
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_truth_config_errors():
    lon = np.array([-60.0, -59.0])
    lat = np.array([37.0, 38.0])
    with pytest.raises(ConfigError, match="truth.dx_km"):  # raised at the call, before any day
        qg.qg_truth(lon, lat, 1, cfg=qg.QGTruthConfig(dx_km=0))
    with pytest.raises(ConfigError, match="truth.dtype"):
        next(qg.qg_truth(lon, lat, 1, cfg=qg.QGTruthConfig(dtype="float16")))
    with pytest.raises(ConfigError, match="latitude"):
        next(qg.qg_truth(lon, np.array([-1.0, 1.0]), 1))
    with pytest.raises(ConfigError, match="truth.nx"):
        qg.QGParams(nx=33)


def test_zonal_spectrum_recovers_a_known_power_law():
    rng = np.random.default_rng(0)
    n, dx = 256, 5.0
    k = np.fft.rfftfreq(n, d=dx)
    amp = np.zeros_like(k)
    amp[1:] = k[1:] ** (-4.5 / 2)
    coef = amp * np.exp(2j * np.pi * rng.uniform(size=(400, k.size)))
    rows = np.fft.irfft(coef, n=n, axis=1).reshape(4, 100, n)
    kk, psd = qg.zonal_spectrum(rows, dx)
    assert qg.spectral_slope(kk, psd, (20.0, 250.0)) == pytest.approx(-4.5, abs=0.3)
    # a white field has slope ~0
    kk, psd = qg.zonal_spectrum(rng.normal(size=(50, n)), dx)
    assert abs(qg.spectral_slope(kk, psd)) < 0.5


@pytest.mark.slow
def test_gulfstream_truth_statistics():
    """Default QG truth on the data-challenge box: SSH std 0.1-0.3 m and a 50-250 km
    zonal spectral slope between -5.5 and -3.5 (several minutes on one core)."""
    from oceanda.data.domains import get_domain

    g = get_domain("gulfstream")
    ssh = np.stack(list(qg.qg_truth(g.lon, g.lat, days=20, seed=0)))
    assert 0.1 <= float(ssh.std()) <= 0.3
    k, psd = qg.zonal_spectrum(ssh, g.dx_m[:, 0] / 1e3)
    assert -5.5 <= qg.spectral_slope(k, psd) <= -3.5


# ----------------------------------------------------------------------------- Gaussian truth
from oceanda.dynamics import gaussian as gs  # noqa: E402


@pytest.mark.parametrize("kind, nu", [("matern", 0.5), ("matern", 1.5), ("gaussian", 1.0)])
def test_gaussian_field_covariance_matches_closed_form(kind, nu):
    L, dx, n = 30.0, 3.0, 256  # plane of 25 L: periodic images are negligible
    f = gs.PeriodicGaussianField(n, n, dx, dx, L, kind, nu)
    c = f.torus_correlation().numpy()
    r = np.arange(0, 40) * dx  # lags up to 4 L along x, y and the diagonal
    ref = gs.spatial_correlation(r, L, kind, nu)
    tol = 3e-2 if nu == 0.5 else 2e-3  # nu = 1/2: the K^-3 tail beyond the grid cut-off is lost
    np.testing.assert_allclose(c[0, :40], ref, rtol=0, atol=tol)
    np.testing.assert_allclose(c[:40, 0], ref, rtol=0, atol=tol)
    rd = np.sqrt(2) * np.arange(0, 28) * dx
    np.testing.assert_allclose(np.diag(c)[:28], gs.spatial_correlation(rd, L, kind, nu), rtol=0, atol=tol)
    # Monte Carlo: the synthesised samples have this covariance
    gen = torch.Generator().manual_seed(0)
    s = torch.stack([f.field(f.sample_hat(gen)) for _ in range(40)]).numpy()
    assert s.var() == pytest.approx(1.0, rel=0.1)
    lag = 10  # 30 km = L
    emp = (s[:, :, :-lag] * s[:, :, lag:]).mean() / s.var()
    assert emp == pytest.approx(ref[lag], abs=0.06)


def test_gaussian_time_correlation():
    T = 4.0
    w = gs._time_weights(T)
    for tau in range(0, 10):
        rho = float(np.sum(w[: len(w) - tau] * w[tau:]))
        assert rho == pytest.approx(gs.temporal_correlation(tau, T, "gaussian"), abs=2e-3)
    # AR(1) (exponential kernel): Monte Carlo lag-1 correlation of the generated fields
    lon = np.arange(-62.0, -58.0, 0.5) + 0.25
    lat = np.arange(36.0, 40.0, 0.5) + 0.25
    cfg = gs.GaussianFieldConfig(std_m=0.2, length_km=40.0, time_days=3.0, time_kernel="exponential")
    x = np.stack(list(gs.gaussian_truth(lon, lat, days=300, seed=1, cfg=cfg))).astype(np.float64)
    assert x.shape == (300, 8, 8)
    assert x.std() == pytest.approx(0.2, rel=0.1)
    r1 = (x[1:] * x[:-1]).mean() / (x * x).mean()
    assert r1 == pytest.approx(math.exp(-1 / 3.0), abs=0.06)


def test_gaussian_truth_non_stationary_variance_and_seed():
    lon = np.arange(-62.0, -58.0, 0.25) + 0.125
    lat = np.arange(34.0, 42.0, 0.25) + 0.125
    cfg = gs.GaussianFieldConfig(std_m=0.1, length_km=30.0, time_days=0.3, std_ratio=3.0,
                                 length_ratio=2.0, n_scales=3, time_kernel="exponential")
    x = np.stack(list(gs.gaussian_truth(lon, lat, days=200, seed=5, cfg=cfg))).astype(np.float64)
    sd = x.std(axis=(0, 2))  # per latitude row
    assert sd[:4].mean() == pytest.approx(0.1 * 3.0 ** (2 / 31), rel=0.12)
    assert sd[-4:].mean() == pytest.approx(0.1 * 3.0 ** (29.5 / 31), rel=0.12)
    a = np.stack(list(gs.gaussian_truth(lon, lat, days=2, seed=5, cfg=cfg)))
    np.testing.assert_array_equal(a, x[:2].astype(np.float32))
    with pytest.raises(ConfigError, match="truth.covariance"):
        gs.GaussianFieldConfig(covariance="cauchy")
    with pytest.raises(ConfigError, match="truth.length_km"):
        gs.GaussianFieldConfig(length_km=-1)


@pytest.mark.gpu
def test_qg_on_cuda_matches_cpu():
    p = _free(beta=1.8e-11, jet_u=0.5, tau_relax=20 * qg.DAY, rek=1 / (40 * qg.DAY), U1=0.05)
    cpu = qg.QGModel(p, dtype=F64)
    gpu = qg.QGModel(p, device="cuda", dtype=F64)
    q0 = _random_state(cpu)
    qc, qd = q0, q0.to("cuda")
    for _ in range(10):
        qc = cpu.step(qc, 3600.0)
        qd = gpu.step(qd, 3600.0)
    torch.testing.assert_close(qd.cpu(), qc, rtol=1e-9, atol=1e-9 * float(qc.abs().max()))
