"""Content digests of the stores oceanda writes, verified whenever they are read.

Every zarr store oceanda writes (an OSSE's ``truth.zarr`` and ``obs.zarr``, ``analysis.zarr``)
holds a digest file :data:`DIGEST_FILE` at its root: the BLAKE2b-128 digest of the *stored
bytes* of every chunk, keyed by the chunk's store key (``ssh_obs/c/2/0/0``)::

    {"format": "oceanda-digests/1", "algorithm": "blake2b-128",
     "chunks": {"ssh_obs/c/0/0/0": "9f0c...", ...}}

A chunk absent from ``chunks`` was not written (zarr leaves out chunks that are all fill
value), so it legitimately reads as the fill value. Readers (:func:`oceanda.data.io.open_dataset`)
wrap the store in :class:`VerifiedStore`, which checks each chunk as it is fetched, before it
is decoded: a chunk recorded but missing, a chunk whose bytes differ (truncated, overwritten,
garbage) and a chunk present but never recorded are each an :class:`InputError` naming the
store, the variable and the chunk index. Hashing the stored (compressed) bytes costs one pass
of BLAKE2b over what is read anyway (about 1 GB/s), nothing is decoded twice.

Stores written by others carry no digest file. For them :func:`absent_field_chunks` compares
zarr's listing of chunk keys with the chunk grid: an absent chunk of a field whose fill value
is a number that is not declared missing (``_FillValue`` / ``missing_value``) would be read as
that constant, so it is refused; when the fill value is NaN or a declared missing value, an
absent chunk cannot be told from a chunk with no data (see the README).

Along-track files an OSSE writes (``alongtrack/<mission>.nc``) get the same digest file, keyed
by file name (:func:`files_record`); :func:`verify_files` checks them when they are used.

The *identity* of an input (:func:`content_digest`) is a digest of its content, never of its
path: all chunk bytes and array metadata of a zarr store (checked against its digest file when
it has one), or all bytes of a file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from zarr.storage import WrapperStore

from oceanda.errors import InputError

#: name of the digest file at the root of a store oceanda wrote
DIGEST_FILE = "oceanda_digests.json"
FORMAT = "oceanda-digests/1"
ALGORITHM = "blake2b-128"
#: zarr (v2 and v3) metadata documents: not chunks
METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})
_BLOCK = 1 << 22


def digest_bytes(data: bytes | bytearray | memoryview) -> str:
    """BLAKE2b-128 hex digest of ``data``."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """BLAKE2b-128 hex digest of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def is_chunk_key(key: str) -> bool:
    """True for a store key holding chunk bytes (not metadata, not the digest file)."""
    name = key.rsplit("/", 1)[-1]
    return key != DIGEST_FILE and name not in METADATA_NAMES and not name.startswith(".")


def _files(root: Path) -> list[str]:
    """Store keys (posix, relative to ``root``) of every file in the store, sorted."""
    keys = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        keys += [(rel / f).as_posix() for f in filenames]
    return sorted(keys)


def compute_chunk_digests(root: str | os.PathLike) -> dict[str, str]:
    """``{chunk key: digest}`` of every chunk file of the zarr store ``root``."""
    root = Path(root)
    return {k: file_digest(root / k) for k in _files(root) if is_chunk_key(k)}


def store_record(root: str | os.PathLike) -> dict[str, Any]:
    """The content of :data:`DIGEST_FILE` for the finished store ``root`` (every chunk
    hashed); :func:`oceanda.data.io.write_digests` writes it into the store."""
    return {"format": FORMAT, "algorithm": ALGORITHM, "chunks": compute_chunk_digests(root)}


def read_digests(root: str | os.PathLike) -> dict[str, str] | None:
    """The recorded ``{chunk key: digest}`` of ``root``, or None when it has no digest file."""
    path = Path(root) / DIGEST_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT or record.get("algorithm") != ALGORITHM:
            raise ValueError(f"format {record.get('format')!r}, algorithm {record.get('algorithm')!r}")
        chunks = record["chunks"]
        if not isinstance(chunks, dict):
            raise ValueError("'chunks' is not a mapping")
    except (ValueError, KeyError, AttributeError) as exc:
        raise InputError(f"{path}: unreadable integrity digests ({exc})") from None
    return {str(k): str(v) for k, v in chunks.items()}


def describe_key(key: str) -> tuple[str, str]:
    """``(variable, chunk)`` of a chunk key: ``ssh_obs/c/2/0/1`` (zarr 3) and ``ssh_obs/2.0.1``
    (zarr 2) both give ``("ssh_obs", "(2, 0, 1)")``."""
    var, _, rest = key.partition("/")
    parts = rest.split("/")
    if parts and parts[0] == "c":
        parts = parts[1:]
    if len(parts) == 1:
        parts = parts[0].split(".")
    if all(p.isdigit() for p in parts) and parts:
        return var, "(" + ", ".join(parts) + ")"
    return var, rest


def _chunk_error(where: str, key: str, problem: str) -> InputError:
    var, idx = describe_key(key)
    return InputError(f"{where}: variable '{var}', chunk {idx} (file {key}) {problem}")


def verify_chunk(where: str, key: str, data: bytes | None, digests: dict[str, str]) -> None:
    """Raise :class:`InputError` unless chunk ``key``'s stored bytes ``data`` (None: absent)
    match ``digests``."""
    expected = digests.get(key)
    if data is None:
        if expected is not None:
            raise _chunk_error(where, key, "is missing: the store was written with it "
                               f"(recorded in {DIGEST_FILE}); restore the store or write it again")
        return
    if expected is None:
        raise _chunk_error(where, key, f"was not written by oceanda (not recorded in {DIGEST_FILE})")
    if digest_bytes(data) != expected:
        raise _chunk_error(where, key, f"is corrupt: its {len(data)} bytes do not match the "
                           f"digest recorded when it was written (truncated or overwritten)")


class VerifiedStore(WrapperStore):
    """A read-only zarr store that checks every whole chunk it returns against ``digests``
    (:func:`verify_chunk`); metadata keys and partial (byte-range) reads pass unchecked."""

    def __init__(self, store, digests: dict[str, str], where: str) -> None:
        super().__init__(store)
        self._digests = digests
        self._where = where

    def _with_store(self, store):  # keep the digests when zarr re-wraps the store
        return type(self)(store, self._digests, self._where)

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if byte_range is None and is_chunk_key(key):
            verify_chunk(self._where, key, None if buf is None else buf.to_bytes(), self._digests)
        return buf

    async def _get_many(self, requests):  # the wrapped store's own would bypass :meth:`get`
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)


def open_verified(root: str | os.PathLike):
    """The zarr store to hand to xarray for ``root``: a :class:`VerifiedStore` when it has a
    digest file, else None (read it as any foreign store)."""
    digests = read_digests(root)
    if digests is None:
        return None
    from zarr.storage import LocalStore

    return VerifiedStore(LocalStore(str(root), read_only=True), digests, str(root))


def check_recorded(root: str | os.PathLike) -> dict[str, str] | None:
    """Verify every chunk of ``root`` against its digest file (raise naming the first bad
    one); the computed ``{key: digest}``, or None when ``root`` has no digest file."""
    root = Path(root)
    recorded = read_digests(root)
    if recorded is None:
        return None
    actual = compute_chunk_digests(root)
    for key in sorted(set(recorded) | set(actual)):
        if recorded.get(key) != actual.get(key):
            data = (root / key).read_bytes() if key in actual else None
            verify_chunk(str(root), key, data, recorded)
    return actual


def content_digest(path: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """Identity of an input by content: a digest of all chunk bytes and array metadata of a
    zarr store (verified against its digest file when it has one; the group's own
    attributes, which hold provenance, are left out), of all bytes of a file, or of several
    files in order."""
    if isinstance(path, (list, tuple)):
        h = hashlib.blake2b(digest_size=16)
        for p in path:
            h.update(content_digest(p).encode())
        return h.hexdigest()
    root = Path(path).expanduser()
    if not root.is_dir():
        return file_digest(root)
    chunks = check_recorded(root)
    if chunks is None:
        chunks = compute_chunk_digests(root)
    h = hashlib.blake2b(digest_size=16)
    for key in _files(root):
        if key in chunks:
            h.update(f"{key}={chunks[key]}\n".encode())
        elif "/" in key and key.rsplit("/", 1)[-1] in METADATA_NAMES:  # an array's metadata
            h.update(f"{key}={file_digest(root / key)}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- plain files


def files_record(files: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """The content of :data:`DIGEST_FILE` for plain files of one folder, keyed by file name
    (``{"files": {name: digest}}``); :func:`oceanda.data.io.write_file_digests` writes it."""
    return {"format": FORMAT, "algorithm": ALGORITHM, "files": {Path(f).name: file_digest(f) for f in files}}


def verify_files(paths: Iterable[str | os.PathLike]) -> None:
    """Check each file whose folder holds a :data:`DIGEST_FILE` recording it (along-track files
    oceanda wrote) against that digest; :class:`InputError` naming the first that differs.
    Files without a recorded digest pass."""
    records: dict[Path, dict[str, str]] = {}
    for p in map(Path, paths):
        folder = p.parent
        if folder not in records:
            path = folder / DIGEST_FILE
            try:
                rec = json.loads(path.read_text()).get("files") if path.is_file() else None
            except (ValueError, AttributeError):
                raise InputError(f"{path}: unreadable integrity digests") from None
            records[folder] = rec if isinstance(rec, dict) else {}
        expected = records[folder].get(p.name)
        if expected is not None and p.is_file() and file_digest(p) != expected:
            raise InputError(f"{p}: its bytes differ from the digest recorded in {folder / DIGEST_FILE} "
                             "when oceanda wrote it (truncated or overwritten)")


# --------------------------------------------------------------------------- foreign stores


def _is_missing(fill: Any, declared: Iterable[Any]) -> bool:
    """True when an absent chunk (all ``fill``) decodes as missing data."""
    try:
        f = float(fill)
    except (TypeError, ValueError):
        return fill is None
    if math.isnan(f):
        return True
    for d in declared:
        try:
            if d is not None and float(d) == f:
                return True
        except (TypeError, ValueError):
            continue
    return False


def absent_field_chunks(root: str | os.PathLike, var: str, encoding: dict[str, Any]) -> list[str]:
    """Chunk keys of ``var`` that a store without digests lacks *and* that would be read as
    a constant number (its fill value is neither NaN nor declared missing in ``encoding``'s
    ``_FillValue`` / ``missing_value``). Empty when absent chunks read as missing (NaN):
    then an absent chunk cannot be told from a chunk with no data."""
    import itertools

    import zarr

    fill = encoding.get("fill_value", encoding.get("_FillValue"))
    if _is_missing(fill, (encoding.get("_FillValue"), encoding.get("missing_value"))):
        return []
    root = Path(root)
    try:
        arr = zarr.open_array(str(root), path=var, mode="r")
        grid = arr.cdata_shape
        keys = [f"{var}/{arr.metadata.encode_chunk_key(idx)}"
                for idx in itertools.product(*(range(n) for n in grid))]
    except Exception:  # not a plain zarr array (v2 nested, sharded...): nothing to compare
        return []
    present = set(_files(root / var))
    return [k for k in keys if k.partition("/")[2] not in present]
