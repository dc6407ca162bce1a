"""oceanda.data.integrity: chunk digests against hashlib, verified reads, content identity,
foreign stores, absurd values, checkpoint weight digests."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from oceanda.assim.checkpoint import check_state_digest, state_digest
from oceanda.data import integrity, io
from oceanda.data import names as N
from oceanda.errors import InputError

pytestmark = [pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
              pytest.mark.filterwarnings("ignore:Failed to open Zarr store with consolidated metadata")]


def _store(path: Path, values: np.ndarray | None = None, digests: bool = True, **enc) -> Path:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(6, 4, 5)).astype(np.float32) if values is None else values
    v[:3, 0, 0] = np.nan
    ds = xr.Dataset({N.SSH_OBS: (N.FIELD_DIMS, v)},
                    coords={N.TIME: np.arange(6.0), N.LAT: np.arange(4.0), N.LON: np.arange(5.0)})
    ds[N.TIME].attrs["units"] = "days"  # day numbers (numbers without units are refused)
    ds.to_zarr(path, encoding={N.SSH_OBS: {"chunks": (2, 4, 5), **enc}})
    if digests:
        io.write_digests(path)
    return path


def test_digests_are_blake2b_of_the_stored_bytes(tmp_path):
    data = b"oceanda chunk \x00\x01\x02" * 100
    assert integrity.digest_bytes(data) == hashlib.blake2b(data, digest_size=16).hexdigest()
    f = tmp_path / "f.bin"
    f.write_bytes(data * 50_000)  # several 4 MiB blocks
    assert integrity.file_digest(f) == hashlib.blake2b(data * 50_000, digest_size=16).hexdigest()
    store = _store(tmp_path / "s.zarr")
    rec = integrity.read_digests(store)
    chunk = store / N.SSH_OBS / "c" / "1" / "0" / "0"
    assert rec[f"{N.SSH_OBS}/c/1/0/0"] == hashlib.blake2b(chunk.read_bytes(), digest_size=16).hexdigest()
    assert {k for k in rec if k.startswith(N.SSH_OBS)} == {f"{N.SSH_OBS}/c/{i}/0/0" for i in range(3)}
    assert not any(k.endswith("zarr.json") for k in rec)


def test_describe_key_zarr2_and_zarr3():
    assert integrity.describe_key("ssh_obs/c/2/0/1") == ("ssh_obs", "(2, 0, 1)")
    assert integrity.describe_key("ssh_obs/2.0.1") == ("ssh_obs", "(2, 0, 1)")
    assert integrity.describe_key("lat/c/0") == ("lat", "(0)")


def test_verified_read_equals_plain_read(tmp_path):
    store = _store(tmp_path / "s.zarr")
    got = io.open_dataset(store, [N.SSH_OBS])[N.SSH_OBS].values
    ref = xr.open_zarr(store)[N.SSH_OBS].values
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("damage, message", [
    ("delete", "is missing"),
    ("truncate", "is corrupt"),
    ("garbage", "is corrupt"),
    ("extra", "not recorded"),
])
def test_damaged_chunk_is_named(tmp_path, damage, message):
    store = _store(tmp_path / "s.zarr")
    chunk = store / N.SSH_OBS / "c" / "1" / "0" / "0"
    if damage == "delete":
        chunk.unlink()
    elif damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:10])
    elif damage == "garbage":
        b = bytearray(chunk.read_bytes())
        b[len(b) // 2] ^= 0xFF
        chunk.write_bytes(bytes(b))
    else:  # a chunk present that the writer never recorded (written by something else)
        rec = integrity.read_digests(store)
        rec.pop(f"{N.SSH_OBS}/c/1/0/0")
        io.write_json_atomic(store / integrity.DIGEST_FILE, {"format": integrity.FORMAT,
                                                               "algorithm": integrity.ALGORITHM, "chunks": rec})
    ds = io.open_dataset(store, [N.SSH_OBS])
    with pytest.raises(InputError, match=message) as err:
        ds[N.SSH_OBS].values
    text = str(err.value)
    assert str(store) in text and f"variable '{N.SSH_OBS}'" in text and "chunk (1, 0, 0)" in text
    # untouched chunks still read
    np.testing.assert_array_equal(ds[N.SSH_OBS][:2].values, xr.open_zarr(store)[N.SSH_OBS][:2].values)
    with pytest.raises(InputError, match="chunk \\(1, 0, 0\\)"):  # the identity check reads them all
        integrity.content_digest(store)


def test_unreadable_digest_file(tmp_path):
    store = _store(tmp_path / "s.zarr")
    (store / integrity.DIGEST_FILE).write_text("{not json")
    with pytest.raises(InputError, match="unreadable integrity digests"):
        io.open_dataset(store, [N.SSH_OBS])


def test_content_digest_follows_content_not_path(tmp_path):
    a = _store(tmp_path / "a.zarr")
    b = tmp_path / "b.zarr"
    shutil.copytree(a, b)
    assert integrity.content_digest(a) == integrity.content_digest(b)
    foreign = _store(tmp_path / "f.zarr", digests=False)  # same bytes, no digest file
    assert integrity.content_digest(foreign) == integrity.content_digest(a)
    v = xr.open_zarr(a)[N.SSH_OBS].values.copy()
    v[5, 3, 4] += 1e-3
    shutil.rmtree(b)
    _store(b, values=v)
    assert integrity.content_digest(a) != integrity.content_digest(b)
    f = tmp_path / "x.nc"
    f.write_bytes(b"abc")
    assert integrity.content_digest(f) == hashlib.blake2b(b"abc", digest_size=16).hexdigest()
    assert integrity.content_digest([f, f]) != integrity.content_digest([f])


def test_foreign_store_missing_chunk_with_a_numeric_fill_value_is_refused(tmp_path):
    # fill value 0 and no _FillValue: an absent chunk would read as 0 m everywhere in it
    store = _store(tmp_path / "zero.zarr", digests=False, fill_value=0.0, _FillValue=None)
    (store / N.SSH_OBS / "c" / "2" / "0" / "0").unlink()
    with pytest.raises(InputError, match=r"chunk \(2, 0, 0\).*is missing.*fill value 0"):
        io.open_dataset(store, [N.SSH_OBS])
    # NaN fill (xarray's default): an absent chunk is "no observation", as zarr writes none
    # for a chunk that is all fill value: this cannot be detected without digests
    nan = _store(tmp_path / "nan.zarr", digests=False)
    (nan / N.SSH_OBS / "c" / "2" / "0" / "0").unlink()
    assert np.isnan(io.open_dataset(nan, [N.SSH_OBS])[N.SSH_OBS][4:].values).all()


def test_foreign_store_truncated_chunk_is_an_input_error(tmp_path):
    store = _store(tmp_path / "s.zarr", digests=False)
    chunk = store / N.SSH_OBS / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    da = io.open_dataset(store, [N.SSH_OBS])[N.SSH_OBS]
    with pytest.raises(InputError, match=f"{store}.*cannot be read"):
        io.compute(da, str(store), f"variable '{N.SSH_OBS}'")


@pytest.mark.parametrize("bad", [np.inf, -np.inf, 1e30, -150.0])
def test_check_values_names_the_first_absurd_value(bad):
    v = np.zeros((3, 4, 5))
    v[0, 0, 0] = np.nan
    v[1, 2, 3] = bad
    v[2, 3, 4] = bad
    da = xr.DataArray(v, dims=N.FIELD_DIMS, name="ssh",
                      coords={N.TIME: [10.0, 11.0, 12.0], N.LAT: np.arange(4.0) + 30, N.LON: np.arange(5.0)})
    with pytest.raises(InputError, match=r"variable 'ssh' holds 2 value\(s\).*at time 11.0, lat 32.0, lon 3.0"):
        io.check_values(da.chunk({N.TIME: 1}), "truth t.zarr")
    v[1, 2, 3] = v[2, 3, 4] = 99.0  # within the documented bound
    assert io.check_values(da.copy(data=v), "truth t.zarr") == v.size - 1


def test_state_digest_detects_a_changed_weight():
    sd = {"b": torch.arange(4, dtype=torch.float32), "a": torch.ones(2, 3, dtype=torch.float64)}
    ck = {"state_dict": sd, "state_digest": state_digest(sd)}
    check_state_digest(ck, "ck.pt")
    assert state_digest(dict(reversed(list(sd.items())))) == ck["state_digest"]  # order-free
    ref = hashlib.blake2b(digest_size=16)
    for name in ("a", "b"):
        t = sd[name]
        ref.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        ref.update(t.numpy().tobytes())
    assert ck["state_digest"] == ref.hexdigest()
    sd["b"][2] = 7.0
    with pytest.raises(InputError, match="ck.pt: its weights do not match"):
        check_state_digest(ck, "ck.pt")


def test_alongtrack_files_are_checked_against_their_recorded_digests(tmp_path):
    from oceanda.data.alongtrack import resolve_paths

    files = []
    for name in ("j3", "s3a"):
        f = tmp_path / f"{name}.nc"
        f.write_bytes(name.encode() * 1000)
        files.append(f)
    rec = io.write_file_digests(tmp_path, files)
    assert rec["j3.nc"] == hashlib.blake2b(b"j3" * 1000, digest_size=16).hexdigest()
    (tmp_path / "mine.nc").write_bytes(b"not recorded")  # a file of the user's: not checked
    assert [p.name for p in resolve_paths(tmp_path)] == ["j3.nc", "mine.nc", "s3a.nc"]
    files[1].write_bytes(b"s3a" * 999)  # truncated
    with pytest.raises(InputError, match="s3a.nc: its bytes differ"):
        resolve_paths(str(tmp_path / "*.nc"))


def test_train_out_dir_identity(tmp_path):
    from oceanda.cli._identity import TRAIN_MANIFEST, check_train_out_dir, record_train_run

    ident = {"inputs": {"obs": "a1", "truth": "b2"}, "config": "c3"}
    out = tmp_path / "train"
    check_train_out_dir(out, ident)  # absent: fine
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(InputError, match=f"holds checkpoint.pt of another run \\(no {TRAIN_MANIFEST}\\)"):
        check_train_out_dir(out, ident)
    record_train_run(out, ident)
    check_train_out_dir(out, ident)  # the same run: resume or retrain
    with pytest.raises(InputError, match=r"training run on other inputs \(obs changed"):
        check_train_out_dir(out, {**ident, "inputs": {"obs": "zz", "truth": "b2"}})
    with pytest.raises(InputError, match="another training run"):
        check_train_out_dir(out, {**ident, "config": "c4"})
    check_train_out_dir(out, {**ident, "config": "c4"}, resume=True)  # the checkpoint reader decides
    (out / "restart").mkdir()
    (out / "restart" / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match="holds an oceanda infer run"):
        check_train_out_dir(out, ident)


def test_analysis_store_is_renamed_only_complete_and_with_digests(tmp_path):
    from oceanda.data.store import AnalysisStore

    work, final = tmp_path / "analysis.zarr.incomplete", tmp_path / "analysis.zarr"
    days = np.arange("2012-10-01", "2012-10-05", dtype="datetime64[D]").astype("datetime64[ns]")
    kw = dict(time=days, lat=np.arange(3.0), lon=np.arange(5.0), ocean=np.ones((3, 5)), chunks=(2, 3, 5))
    store = AnalysisStore.create(work, **kw)
    store = AnalysisStore(work, final=final)
    store.write_region(N.SSH, ((0, 2), (0, 3), (0, 5)), np.ones((2, 3, 5)))
    assert xr.open_zarr(work).attrs["status"] == "incomplete" and not final.exists()
    with pytest.raises(InputError, match="status 'incomplete'"):
        io.require_complete(xr.open_zarr(work), "analysis")
    store.finalize()
    assert not work.exists() and xr.open_zarr(final).attrs["status"] == "complete"
    assert set(integrity.read_digests(final)) >= {f"{N.SSH}/c/0/0/0"}
    assert f"{N.SSH}/c/1/0/0" not in integrity.read_digests(final)  # never written: all NaN
    np.testing.assert_array_equal(io.open_dataset(final, [N.SSH])[N.SSH][:2].values, 1.0)
    # killed after its digests, before its rename: the rerun's finalize only renames it
    final.rename(work)
    before = (work / integrity.DIGEST_FILE).read_bytes()
    AnalysisStore(work, final=final).finalize()
    assert final.is_dir() and not work.exists() and (final / integrity.DIGEST_FILE).read_bytes() == before
