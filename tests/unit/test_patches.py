"""Patch geometry and blend weights: coverage, normalisation, land skipping, errors; modes
(mapping / near-real-time / forecast lead), observation cut-off, trained-mode checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oceanda.data.patches import PatchGeometry, coverage_1d, make_patches
from oceanda.errors import ConfigError, InputError
from oceanda.testing import check_tiling, check_weights_normalise


def test_anchor_geometry_matches_4dvarnet_anchor():
    g = PatchGeometry()  # 15 x 240 x 240, stride 1 x 200 x 200, crop 20
    w = g.weights()
    assert w.wt.argmax() == 7 and w.wt[7] == 1.0 and (w.wt > 0).all()
    np.testing.assert_array_equal(w.wt, w.wt[::-1])
    assert w.support == ((0, 15), (20, 220), (20, 220))
    # crop weights with stride = interior tile the plane exactly: total weight 1 in space
    starts = g.starts_1d(1, 600)
    np.testing.assert_array_equal(coverage_1d(starts, w.wy, 600), 1.0)
    assert starts[0] == -20
    # time: every day is the centre of one window; triangle sums to the same everywhere inside
    cov = coverage_1d(g.starts_1d(0, 40), w.wt, 40)
    np.testing.assert_allclose(cov[7:-7], w.wt.sum())


def test_land_only_patches_skipped_and_every_ocean_cell_covered():
    ocean = np.zeros((50, 60), bool)
    ocean[5:20, 3:25] = True  # ocean only in one corner
    g = PatchGeometry(size=(3, 20, 20), stride=(1, 16, 16), crop=(2, 2))
    ps = make_patches(g, (4, 50, 60), ocean)
    full = len(g.starts_1d(0, 4)) * len(g.starts_1d(1, 50)) * len(g.starts_1d(2, 60))
    assert 0 < len(ps) < full
    check_tiling(ps, ocean)
    check_weights_normalise(ps, ocean)
    # canonical order: lexicographic starts
    assert np.array_equal(np.lexsort(ps.starts.T[::-1]), np.arange(len(ps)))


def test_near_real_time_uses_only_the_end_day():
    g = PatchGeometry(size=(5, 10, 10), stride=(1, 8, 8), crop=(1, 1), anchor="end",
                      time_weight="anchor")
    assert g.weights().support[0] == (4, 5)
    ps = make_patches(g, (6, 12, 12), np.ones((12, 12), bool))
    assert (ps.starts[:, 0] + 4 == ps.centres()[:, 0]).all()
    assert (ps.footprint(0)[0][1] - 1) == 0  # first window ends on day 0
    check_tiling(ps, np.ones((12, 12), bool))


@settings(max_examples=40, deadline=None)
@given(nt=st.integers(1, 9), ny=st.integers(8, 40), nx=st.integers(8, 40),
       T=st.integers(1, 7), H=st.integers(5, 12), W=st.integers(5, 12),
       cy=st.integers(0, 2), cx=st.integers(0, 2), st_t=st.integers(1, 3),
       frac_y=st.floats(0.3, 1.0), frac_x=st.floats(0.3, 1.0),
       taper=st.booleans(), seed=st.integers(0, 10))
def test_property_tiling_covers_and_weights_normalise(nt, ny, nx, T, H, W, cy, cx, st_t,
                                                      frac_y, frac_x, taper, seed):
    T = min(T, nt)
    H, W = min(H, ny), min(W, nx)
    sy = max(1, int(frac_y * (H - 2 * cy)))
    sx = max(1, int(frac_x * (W - 2 * cx)))
    if H - 2 * cy < 1 or W - 2 * cx < 1:
        return
    kw = dict(space_weight="taper", taper=1) if taper and min(H - 2 * cy, W - 2 * cx) >= 3 else {}
    g = PatchGeometry(size=(T, H, W), stride=(min(st_t, T), sy, sx), crop=(cy, cx), **kw)
    rng = np.random.default_rng(seed)
    ocean = rng.random((ny, nx)) > 0.4
    if not ocean.any():
        ocean[0, 0] = True
    ps = make_patches(g, (nt, ny, nx), ocean)
    check_weights_normalise(ps, ocean)


def test_geometry_errors():
    with pytest.raises(InputError, match="larger than the domain"):
        make_patches(PatchGeometry(size=(3, 50, 10), stride=(1, 40, 8), crop=(1, 1)),
                     (5, 20, 20), np.ones((20, 20), bool))
    with pytest.raises(ConfigError, match="uncovered"):
        PatchGeometry(size=(3, 20, 20), stride=(1, 19, 16), crop=(2, 2))
    with pytest.raises(ConfigError, match="anchor"):
        PatchGeometry(anchor="end")
    with pytest.raises(InputError, match="no ocean"):
        make_patches(PatchGeometry(size=(1, 4, 4), stride=(1, 2, 2), crop=(1, 1)),
                     (2, 8, 8), np.zeros((8, 8), bool))


def test_checker_detects_uncovered_cells():
    g = PatchGeometry(size=(2, 6, 6), stride=(1, 4, 4), crop=(1, 1), time_weight="anchor")
    ocean = np.ones((10, 10), bool)
    ps = make_patches(g, (3, 10, 10), ocean)
    from dataclasses import replace

    holey = replace(ps, starts=ps.starts[1:])  # drop one patch: its cells are uncovered
    with pytest.raises(AssertionError, match="not covered"):
        check_tiling(holey, ocean)


# ----------------------------------------------------------------------------- modes


def _forecast(lead=2, **kw):
    d = dict(size=(5, 10, 10), stride=(1, 8, 8), crop=(1, 1), anchor="end", time_weight="anchor",
             lead=lead)
    d.update(kw)
    return PatchGeometry(**d)


def test_modes_and_forecast_geometry():
    assert PatchGeometry().mode == "mapping" and PatchGeometry().obs_days == (0, 15)
    nrt = _forecast(lead=0)
    assert nrt.mode == "nrt" and nrt.obs_days == (0, 5)
    g = _forecast(lead=2)
    assert g.mode == "forecast" and g.obs_days == (0, 3)
    # the reconstructed (weighted) day is the window's last day, as in near-real-time
    assert g.weights().support[0] == (4, 5) and g.anchor_offset == 4
    ps = make_patches(g, (6, 12, 12), np.ones((12, 12), bool))
    np.testing.assert_array_equal(ps.starts, make_patches(nrt, (6, 12, 12), np.ones((12, 12), bool)).starts)
    check_tiling(ps, np.ones((12, 12), bool))
    assert g.mode_record() == {"mode": "forecast", "anchor": "end", "lead": 2, "n_time": 5,
                               "time_weight": "anchor"}


def test_mask_obs_drops_exactly_the_last_lead_days():
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 4, 4))
    g = _forecast(lead=2)
    m = g.mask_obs(x)
    assert np.isnan(m[:, 3:]).all()
    np.testing.assert_array_equal(m[:, :3], x[:, :3])
    assert np.isfinite(x).all()  # the input is not modified
    t = torch.from_numpy(x)
    mt = g.mask_obs(t)
    np.testing.assert_array_equal(mt.numpy(), m)
    assert torch.isfinite(t).all()
    assert _forecast(lead=0).mask_obs(x) is x  # no copy when nothing is dropped


@pytest.mark.parametrize("kw, message", [
    (dict(lead=2, anchor="centre", time_weight="triangle"), "needs patch.anchor=end"),
    (dict(lead=5), "leaves no observed day"),
    (dict(lead=-1), "lead must be >= 0"),
    (dict(lead=1.5), "integer"),
    (dict(lead=True), "integer"),
])
def test_forecast_geometry_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        _forecast(**kw)


def test_check_trained_mode():
    from oceanda.data.patches import check_trained_mode, mode_record_from_patch

    mapping = PatchGeometry(size=(5, 10, 10), stride=(1, 8, 8), crop=(1, 1))
    f2, f4, nrt = _forecast(2), _forecast(4), _forecast(0)
    assert check_trained_mode(None, f2) == []
    assert check_trained_mode(f2.mode_record(), f2) == []
    with pytest.raises(ConfigError, match=r"checkpoint ck.pt was trained for forecast .*lead=2.* "
                                          r"the patches are forecast .*lead=4.*patch=forecast2"):
        check_trained_mode(f2.mode_record(), f4, "checkpoint ck.pt")
    with pytest.raises(ConfigError, match="trained for mapping.*patches are nrt.*patch=anchor"):
        check_trained_mode(mapping.mode_record(), nrt)
    with pytest.raises(ConfigError, match="trained for nrt.*patch=nrt"):
        check_trained_mode(nrt.mode_record(), mapping)
    diffs = check_trained_mode(mapping.mode_record(), f2, allow_mismatch=True)
    assert len(diffs) == 1 and "mapping" in diffs[0]
    # the window length is never negotiable
    long = PatchGeometry(size=(7, 10, 10), stride=(1, 8, 8), crop=(1, 1))
    with pytest.raises(ConfigError, match="trained on 5-day windows but patch.size.0.=7"):
        check_trained_mode(mapping.mode_record(), long, allow_mismatch=True)
    # records derived from the patch dicts of older checkpoints (no anchor / lead keys)
    assert mode_record_from_patch({"size": [5, 10, 10]}) == mapping.mode_record() | {"time_weight": "triangle"}
    assert mode_record_from_patch({"size": [5, 8, 8], "anchor": "end", "time_weight": "anchor"}) == nrt.mode_record()
    assert mode_record_from_patch(None) is None and mode_record_from_patch({"a": 1}) is None
