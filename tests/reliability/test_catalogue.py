"""A generated catalogue of bad inputs, run against every app that reads them.

Each :class:`Case` writes one bad input from a valid one (the stores of ``good_obs``); the
catalogue is the cross product of the cases with the *roles* an input plays (the observations
of ``infer``, the observations / the truth of ``train``, the truth / the analysis of
``evaluate``). Every run must be a clean refusal (:func:`harness.assert_refused`): exit 2,
``oceanda APP: error:`` naming the store and what is wrong in it (variable, coordinate,
attribute), the error last, the output folder untouched, within its timeout. Config cases
(periods, domains, time steps) run against the app and against ``oceanda config validate APP``.

Every role's command line is first run on the *valid* input (``test_valid_input_is_accepted``):
a refusal below is the bad input's doing, not the command's.

1 rank runs are forked from a fork server (``harness.run_app(forked=True)``: the same process
a user runs, without 4 s of imports each). The quick part runs every case against one input of
each app (infer's observations, train's observations, evaluate's truth) and one case of infer and
of train on 2 ranks (``mpiexec``); the part marked ``catalogue`` (run by default and in CI, about
5 minutes; ``-m 'not catalogue'`` skips it) runs the other inputs (infer's and train's truth,
evaluate's analysis) and every case on 2 ranks.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from oceanda.data import names as N
from tests.reliability.conftest import SMALL
from tests.reliability.harness import assert_refused, refuse, run_app

# --------------------------------------------------------------------------- the roles

OI = ["method=oi", "method.Lx_km=40", "method.Lt_days=4"]
TRAIN = ["model=4dvarnet_small", "model.n_steps=1", "model.prior_hidden=4", "model.lstm_hidden=4",
         "patch.size=[5,8,8]", "patch.stride=[1,6,6]", "patch.crop=[1,1]", "gap_days=2",
         "train.epochs=1", "train.batch_size=2", "train.max_batches=1", "progress=false"]


@dataclass(frozen=True)
class Role:
    """An input an app reads: ``var`` is the field variable it must hold; ``args(bad, good,
    out)`` the command line with the bad store ``bad`` in that role (``good``: the valid
    ``good_obs`` paths)."""

    app: str
    input: str                      # "obs" or "truth": which valid store the case starts from
    var: str
    args: Callable[[Path, dict, Path], list[str]]
    mpi: bool = False               # the app runs under MPI: also run on 2 ranks
    fast: bool = True               # every case in the quick part (else marked `catalogue`)


ROLES = {
    "infer-obs": Role("infer", "obs", N.SSH_OBS,
                      lambda bad, g, out: [f"obs_path={bad}", f"out_dir={out}", *SMALL, *OI], mpi=True),
    "infer-truth": Role("infer", "truth", N.SSH,
                        lambda bad, g, out: [f"obs_path={g['obs']}", f"truth_path={bad}", f"out_dir={out}",
                                             *SMALL, *OI], fast=False),
    "train-obs": Role("train", "obs", N.SSH_OBS,
                      lambda bad, g, out: [f"obs_path={bad}", f"truth_path={g['truth']}", f"out_dir={out}",
                                           *TRAIN], mpi=True),
    "train-truth": Role("train", "truth", N.SSH,
                        lambda bad, g, out: [f"obs_path={g['obs']}", f"truth_path={bad}", f"out_dir={out}",
                                             *TRAIN], fast=False),
    "evaluate-truth": Role("evaluate", "truth", N.SSH,
                           lambda bad, g, out: [f"truth_path={bad}", f"analysis={g['truth']}",
                                                f"out_dir={out}", "figures=false"]),
    "evaluate-analysis": Role("evaluate", "truth", N.SSH,
                              lambda bad, g, out: [f"truth_path={g['truth']}", f"analysis={bad}",
                                                   f"out_dir={out}", "figures=false"], fast=False),
}


# --------------------------------------------------------------------------- the cases


def _xr(fn: Callable[[xr.Dataset, str], xr.Dataset]):
    """A case writer from a dataset transformation ``fn(valid, var) -> bad``."""
    def write(valid: xr.Dataset, var: str, path: Path) -> None:
        bad = fn(valid.copy(deep=True), var)
        for v in bad.variables.values():
            v.encoding.clear()
        bad.to_zarr(path, mode="w", consolidated=False)
    return write


def _set_coord(dim: str, fn: Callable[[np.ndarray], np.ndarray], attrs: dict | None = None):
    def transform(ds: xr.Dataset, var: str) -> xr.Dataset:
        values = fn(np.array(ds[dim].values))
        return ds.assign_coords({dim: (dim, values, attrs if attrs is not None else ds[dim].attrs)})
    return _xr(transform)


def _set_var(fn: Callable[[xr.DataArray], xr.DataArray]):
    return _xr(lambda ds, var: ds.assign({var: fn(ds[var])}))


def _swap(values: np.ndarray, i: int, j: int) -> np.ndarray:
    values[[i, j]] = values[[j, i]]
    return values


def _with(values: np.ndarray, i: int, v) -> np.ndarray:
    values[i] = v
    return values


def _write_text(text: bytes):
    def write(valid, var, path: Path) -> None:
        path.write_bytes(text)
    return write


def _empty_dir(valid, var, path: Path) -> None:
    path.mkdir()


def _garbage_metadata(valid, var, path: Path) -> None:
    _xr(lambda ds, v: ds)(valid, var, path)
    (path / var / "zarr.json").write_text("{not json")


@dataclass(frozen=True)
class Case:
    """One bad input: ``write(valid, var, path)`` writes it at ``path`` from the valid dataset
    ``valid`` whose field variable is ``var``; the error must name ``names`` (``{var}`` is
    replaced by the variable) besides the path."""

    id: str
    cls: str
    write: Callable[[xr.Dataset, str, Path], None]
    names: tuple[str, ...]
    roles: tuple[str, ...] = tuple(ROLES)


CASES = [
    # wrong units
    Case("ssh_in_cm", "units", _set_var(lambda da: (da * 100).assign_attrs(units="cm")), ("{var}", "'cm'")),
    Case("lon_in_radians", "units", _set_coord(N.LON, np.deg2rad, {"units": "radians"}), ("'lon'", "radians")),
    Case("lat_out_of_range", "units", _set_coord(N.LAT, lambda v: v + 100.0), ("'lat'", "[-90, 90]")),
    Case("time_float_no_units", "units", _set_coord(N.TIME, lambda v: np.arange(v.size, dtype=float), {}),
         ("'time'", "units")),
    # wrong dtypes
    Case("ssh_strings", "dtype", _set_var(lambda da: da.astype(str)), ("{var}", "dtype")),
    Case("ssh_integers", "dtype", _set_var(lambda da: (da.fillna(0) * 100).astype(np.int32)),
         ("{var}", "int32")),
    Case("lat_strings", "dtype", _set_coord(N.LAT, lambda v: v.astype(str)), ("'lat'",)),
    # empty / degenerate extents
    Case("empty_time", "extent", _xr(lambda ds, var: ds.isel({N.TIME: slice(0, 0)})), ("'time'", "empty")),
    Case("one_row", "extent", _xr(lambda ds, var: ds.isel({N.LAT: slice(20, 21)})), ("lat",)),
    # coordinates
    Case("duplicated_lat", "coordinates", _set_coord(N.LAT, lambda v: _with(v, 5, v[4])), ("'lat'", "duplicated")),
    Case("duplicated_time", "coordinates", _set_coord(N.TIME, lambda v: _with(v, 3, v[2])), ("'time'", "duplicated")),
    Case("nan_lon", "coordinates", _set_coord(N.LON, lambda v: _with(v, 3, np.nan)), ("'lon'", "NaN")),
    Case("non_monotonic_lon", "coordinates", _set_coord(N.LON, lambda v: _swap(v, 2, 3)), ("'lon'", "monotonic")),
    # missing pieces
    Case("missing_variable", "missing", _xr(lambda ds, var: ds.drop_vars(var)), ("'{var}'",)),
    Case("variable_wrong_dims", "missing",
         _xr(lambda ds, var: ds.assign({var: ((N.TIME, "y", "x"), ds[var].values)})), ("'{var}'", "dims")),
    Case("missing_lat_coordinate", "missing", _xr(lambda ds, var: ds.drop_vars(N.LAT)), ("'lat'",)),
    Case("ocean_mask_wrong_dims", "missing",
         _xr(lambda ds, var: ds.assign({N.OCEAN: (("y", "x"), ds[N.OCEAN].values)})), ("'ocean'",),
         roles=tuple(r for r in ROLES if r != "evaluate-analysis")),  # evaluate reads the truth's mask only
    # not a store at all
    Case("text_file", "format", _write_text(b"this is not a dataset\n"), ("a file, not a zarr store",)),
    Case("empty_directory", "format", _empty_dir, ("not a zarr store",)),
    Case("garbage_metadata", "format", _garbage_metadata, ("variable '{var}'", "not valid JSON")),
    Case("all_nan", "values", _set_var(lambda da: da * np.nan), ("{var}", "NaN")),
    Case("inf_values", "values", _set_var(lambda da: da.where(~np.isfinite(da) | (da < 0), np.inf)),
         ("{var}",)),
    Case("huge_values", "values", _set_var(lambda da: da.where(~np.isfinite(da) | (da < 0), 1e30)),
         ("{var}",)),
]
CASE_BY_ID = {c.id: c for c in CASES}

#: (role, case) also run on 2 ranks in the default suite (every case in the `catalogue` part): a store that
#: is no dataset (infer), a variable in the wrong units (train)
MPI_FAST = {("infer-obs", "text_file"), ("train-obs", "ssh_in_cm")}


@pytest.fixture(scope="module")
def valid(good_obs):
    return {k: xr.open_zarr(good_obs[k], consolidated=False).load() for k in ("obs", "truth")}


def _bad_store(case: Case, role: Role, valid: dict, tmp_path: Path) -> Path:
    path = tmp_path / f"{case.id}.zarr"
    case.write(valid[role.input], role.var, path)
    return path


def _params(ranks: int):
    out = []
    for case in CASES:
        for role_id in case.roles:
            role = ROLES[role_id]
            if ranks > 1 and not role.mpi:
                continue
            marks = [pytest.mark.mpi] if ranks > 1 else []
            if not role.fast or (ranks > 1 and (role_id, case.id) not in MPI_FAST):
                marks.append(pytest.mark.catalogue)
            out.append(pytest.param(case.id, role_id, marks=marks, id=f"{role_id}-{case.id}"))
    return out


def _refuse_case(case_id: str, role_id: str, valid, good_obs, tmp_path, ranks: int) -> None:
    case, role = CASE_BY_ID[case_id], ROLES[role_id]
    bad = _bad_store(case, role, valid, tmp_path)
    out = tmp_path / "out"
    names = [str(bad), *(n.format(var=role.var) for n in case.names)]
    refuse(role.app, role.args(bad, good_obs, out), *names, outputs=[out], ranks=ranks,
           timeout=120 if ranks > 1 else 60, forked=ranks == 1)


@pytest.mark.parametrize("role_id", [pytest.param(r, marks=[] if role.fast else [pytest.mark.catalogue])
                                     for r, role in ROLES.items()])
def test_valid_input_is_accepted(role_id, valid, good_obs, tmp_path):
    """The control: each role's command line on the valid input (rewritten by the same writer
    as the cases) runs to the end."""
    role = ROLES[role_id]
    store = tmp_path / "valid.zarr"
    _xr(lambda ds, var: ds)(valid[role.input], role.var, store)
    res = run_app(role.app, *role.args(store, good_obs, tmp_path / "out"), forked=True, timeout=120)
    assert res.returncode == 0, res.describe()


@pytest.mark.parametrize("case_id, role_id", _params(1))
def test_bad_input_is_refused(case_id, role_id, valid, good_obs, tmp_path):
    _refuse_case(case_id, role_id, valid, good_obs, tmp_path, ranks=1)


@pytest.mark.parametrize("case_id, role_id", _params(2))
def test_bad_input_is_refused_on_2_ranks(case_id, role_id, valid, good_obs, tmp_path):
    _refuse_case(case_id, role_id, valid, good_obs, tmp_path, ranks=2)


# --------------------------------------------------------------------------- config cases


@dataclass(frozen=True)
class ConfigCase:
    """A bad config value for ``app`` (the valid inputs of ``good_obs`` given): refused by the
    app and, when ``static`` (it needs no data to see), by ``oceanda config validate APP``."""

    id: str
    app: str
    args: Callable[[dict, Path], list[str]]
    names: tuple[str, ...]
    static: bool = True


def _infer(*extra):
    return lambda g, out: [f"obs_path={g['obs']}", f"out_dir={out}", *SMALL, *OI, *extra]


def _train(*extra):
    return lambda g, out: [f"obs_path={g['obs']}", f"truth_path={g['truth']}", f"out_dir={out}", *TRAIN, *extra]


def _evaluate(*extra):
    return lambda g, out: [f"truth={g['truth']}", f"analysis={g['truth']}", f"out_dir={out}", "figures=false",
                           *extra]


def _generate(*extra):
    return lambda g, out: [f"out_dir={out}", "truth=gaussian", "figures=false", "progress=false", *extra]


BOX_1X1 = ["domain=box", "domain.lon_min=-40", "domain.lon_max=-39.95", "domain.lat_min=30", "domain.lat_max=30.05"]
CONFIG_CASES = [
    ConfigCase("infer_period_reversed", "infer", _infer("period=[2012-10-10,2012-10-01]"), ("period", "start is after")),
    ConfigCase("infer_period_not_dates", "infer", _infer("period=[october,2012-10-01]"), ("period", "YYYY-MM-DD")),
    ConfigCase("infer_box_lat_out_of_range", "infer", _infer("box=[-65,-62,33,95]"), ("box", "[-90, 90]")),
    ConfigCase("infer_period_outside_data", "infer", _infer("period=[2020-01-01,2020-01-05]"), ("period", "'time'"),
               static=False),
    ConfigCase("infer_box_outside_data", "infer", _infer("box=[0,5,0,5]"), ("box", "outside"), static=False),
    ConfigCase("train_period_reversed", "train", _train("period=[2012-10-10,2012-10-01]"), ("period", "start is after")),
    ConfigCase("train_val_period_reversed", "train", _train("val_period=[2012-10-10,2012-10-01]"),
               ("val_period", "start is after")),
    ConfigCase("train_period_outside_data", "train", _train("period=[2020-01-01,2020-01-05]"), ("'time'",),
               static=False),
    ConfigCase("evaluate_period_reversed", "evaluate", _evaluate("period=[2012-10-10,2012-10-01]"),
               ("period", "start is after")),
    ConfigCase("evaluate_period_outside_data", "evaluate", _evaluate("period=[2020-01-01,2020-01-05]"),
               ("period", "'time'"), static=False),
    ConfigCase("generate_period_reversed", "generate", _generate("period.start=2012-10-10", "period.end=2012-10-01"),
               ("period", "start is after")),
    ConfigCase("generate_empty_box", "generate", _generate(*BOX_1X1[:2], "domain.lon_max=-40", *BOX_1X1[3:]),
               ("domain", "lon_min")),
    ConfigCase("generate_lat_out_of_range", "generate", _generate(*BOX_1X1[:3], "domain.lat_min=89.5",
                                                                  "domain.lat_max=90.5"), ("domain", "[-90, 90]")),
    ConfigCase("validate_dt_zero", "validate", lambda g, out: [f"out_dir={out}", "dt=0"], ("dt",)),
    ConfigCase("validate_no_training_data", "validate", lambda g, out: [f"out_dir={out}", "experiment.data.n_train=0"],
               ("n_train",)),
    ConfigCase("validate_missing_checkpoint", "validate",
               lambda g, out: [f"out_dir={out}", f"checkpoint={out.parent / 'none.pt'}"], ("none.pt",), static=False),
]


def _config_params():
    out = []
    for case in CONFIG_CASES:
        out.append(pytest.param(case.id, False, id=f"{case.app}-{case.id}"))
        if case.static:
            out.append(pytest.param(case.id, True, id=f"config-validate-{case.app}-{case.id}"))
    return out


@pytest.mark.parametrize("case_id, validate_only", _config_params())
def test_bad_config_is_refused(case_id, validate_only, good_obs, tmp_path):
    case = next(c for c in CONFIG_CASES if c.id == case_id)
    out = tmp_path / "out"
    args = case.args(good_obs, out)
    if validate_only:
        refuse("config", ["validate", case.app, *args], *case.names, outputs=[out], forked=True, timeout=60)
    else:
        refuse(case.app, args, *case.names, outputs=[out], forked=True, timeout=60)


CHECKPOINT_USERS = {
    "validate": lambda g, ck, out: [f"checkpoint={ck}", f"out_dir={out}", "progress=false"],
    "infer": lambda g, ck, out: [f"obs_path={g['obs']}", f"out_dir={out}", *SMALL, "method=4dvarnet",
                                 f"method.checkpoint={ck}"],
    "train": lambda g, ck, out: [f"obs_path={g['obs']}", f"truth_path={g['truth']}", f"out_dir={out}", *TRAIN,
                                 f"init_checkpoint={ck}"],
}


@pytest.mark.parametrize("app", list(CHECKPOINT_USERS))
@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", bytes(range(256)) * 16],
                         ids=["empty", "truncated", "garbage"])
def test_damaged_checkpoint_is_refused(app, content, good_obs, tmp_path):
    """A checkpoint file that is empty, truncated or garbage: refused naming it, one line (no
    torch text asking to file an issue), before any work."""
    ck = tmp_path / "model.pt"
    ck.write_bytes(content)
    out = tmp_path / "out"
    res = refuse(app, CHECKPOINT_USERS[app](good_obs, ck, out), str(ck), "cannot be read", outputs=[out],
                 forked=True, timeout=60)
    assert "file an issue" not in res.stderr, res.describe()


def test_base_config_of_generate_and_validate_is_valid(tmp_path):
    """The control of the generate / validate config cases: their base command lines are valid."""
    for args in (["generate", *_generate()({}, tmp_path / "g")], ["validate", f"out_dir={tmp_path / 'v'}"]):
        res = run_app("config", "validate", *args, forked=True, timeout=60)
        assert res.returncode == 0 and "is valid" in res.stdout, res.describe()


# --------------------------------------------------------------------------- MPI, degenerate domains, disk full


@pytest.mark.mpi
def test_more_ranks_than_tiles_works_or_is_refused(good_obs, tmp_path):
    """One tile (the whole 16 x 40 x 48 domain) on 2 ranks: either the analysis is the 1-rank
    one, bitwise, or the run is refused naming ``tile``, on every rank, nothing written; it
    never hangs (the idle rank is the risk)."""
    one_tile = [a for a in SMALL if not a.startswith("tile=")] + ["tile=[16,40,48]"]
    out = tmp_path / "r2"
    res = run_app("infer", f"obs_path={good_obs['obs']}", f"out_dir={out}", *one_tile, *OI, ranks=2, timeout=180)
    if res.returncode != 0:
        assert_refused(res, "tile", "2 ranks", before={out: None})
        return
    ref = run_app("infer", f"obs_path={good_obs['obs']}", f"out_dir={tmp_path / 'r1'}", *one_tile, *OI,
                  forked=True, timeout=120)
    assert ref.returncode == 0, ref.describe()
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "r1" / "analysis.zarr")[N.SSH].values,
                                  xr.open_zarr(out / "analysis.zarr")[N.SSH].values)


def test_longitudes_0_360_are_read_like_minus_180_180(valid, good_obs, tmp_path):
    """Not a refusal: the same observations with longitudes 295..297.35 instead of -65..-62.65
    give the same analysis (the README says both conventions are read)."""
    store = tmp_path / "lon360.zarr"
    _set_coord(N.LON, lambda v: v + 360.0)(valid["obs"], N.SSH_OBS, store)
    got = {}
    for name, path in (("180", good_obs["obs"]), ("360", store)):
        res = run_app("infer", f"obs_path={path}", f"out_dir={tmp_path / name}", *SMALL, *OI, "dtype=float64",
                      forked=True, timeout=120)
        assert res.returncode == 0, res.describe()
        got[name] = xr.open_zarr(tmp_path / name / "analysis.zarr")
    np.testing.assert_allclose(got["360"][N.LON].values, got["180"][N.LON].values + 360.0)
    np.testing.assert_allclose(got["360"][N.SSH].values, got["180"][N.SSH].values, rtol=0, atol=1e-9)


def test_one_cell_one_day_store_works_or_is_refused(valid, good_obs, tmp_path):
    """A 1 x 1 cell, 1 day store (an observed cell): infer either reconstructs it or refuses it
    cleanly, naming the store; it never crashes or hangs."""
    obs = valid["obs"]
    t, j, i = (int(v[0]) for v in np.nonzero(np.isfinite(obs[N.SSH_OBS].values)))
    store = tmp_path / "one_cell.zarr"
    _xr(lambda ds, var: ds.isel({N.TIME: [t], N.LAT: [j], N.LON: [i]}))(obs, N.SSH_OBS, store)
    out = tmp_path / "out"
    res = run_app("infer", f"obs_path={store}", f"out_dir={out}", *SMALL, *OI, forked=True, timeout=60)
    if res.returncode == 0:
        got = xr.open_zarr(out / "analysis.zarr")[N.SSH].values
        assert got.shape == (1, 1, 1) and np.isfinite(got).all(), res.describe()
    else:
        assert_refused(res, str(store), before={out: None})


def _mount_tiny_fs(path: Path, size: str = "64k") -> None:
    path.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (``mount -t tmpfs``; skipped where mounting is not permitted)."""
    path = tmp_path / "tiny"
    _mount_tiny_fs(path)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, check=False)


DISK_FULL_APPS = {
    "evaluate": lambda g, out: [f"truth={g['truth']}", f"analysis={g['truth']}", f"out_dir={out}"],
    "infer": lambda g, out: [f"obs_path={g['obs']}", f"out_dir={out}", *SMALL, *OI, "dtype=float64"],
    "train": lambda g, out: [f"obs_path={g['obs']}", f"truth_path={g['truth']}", f"out_dir={out}", *TRAIN],
}


@pytest.mark.parametrize("app", DISK_FULL_APPS)
def test_disk_full_is_refused(app, full_disk, good_obs):
    """The output folder on a full device: exit 2 naming it, nothing partial left (the 64 KiB
    device is filled first, so that the app fails on its first sizeable write). A refused
    ``infer`` may keep its restart state (``restart/``: the same command resumes once there is
    space) but no analysis."""
    filler = full_disk / "filler"
    try:
        filler.write_bytes(b"\0" * (60 << 10))
    except OSError as exc:  # pragma: no cover - the device is smaller than said
        assert exc.errno == errno.ENOSPC
    out = full_disk / "run"
    res = run_app(app, *DISK_FULL_APPS[app](good_obs, out), forked=True, timeout=120)
    if app != "infer":
        assert_refused(res, str(out), before={out: None})
        return
    assert_refused(res, str(out))
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    assert all(p == "restart" or p.startswith("restart/") for p in left), left
