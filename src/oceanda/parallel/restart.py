"""Restart bookkeeping of a distributed inference run (files only; no MPI).

``OUT_DIR/restart/`` holds

* ``manifest.json``: the run's id (hash of the config that determines the output and of
  the content digests of its inputs), those digests and the version. A rerun with another
  id in the same ``OUT_DIR`` is refused (:class:`InputError`), before anything is written,
  saying which input changed when one did.
* ``partials/tile_NNNNNN.npz``: the blended partial sums of one tile's patches over its
  support box (``den = sum_p w_p``, ``mean = sum_p w_p out_p``, optional ``var`` and
  ``members``, float64), saved atomically
  right after the tile is computed. A rerun loads them instead of recomputing the tile.
* ``written/tile_NNNNNN``: marker created after the tile's output region is flushed to
  ``analysis.zarr``. A rerun never rewrites it.

Partials are deleted once every tile is written (markers are kept).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from oceanda import __version__
from oceanda.data.files import atomic_path, write_bytes_atomic
from oceanda.errors import InputError


class RunState:
    """Restart files of the run in ``out_dir`` (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike, run_id: str, inputs: dict[str, str] | None = None,
                 config: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / "restart"
        self.run_id = run_id
        self.inputs = dict(inputs or {})
        self.config = config

    # ------------------------------------------------------------------ manifest
    def check(self, *outputs: str | os.PathLike) -> bool:
        """Refuse an out_dir holding another run (other config, or other inputs by content:
        ``inputs`` maps each input to its content digest); True if this run was started before."""
        manifest = self.root / "manifest.json"
        if manifest.exists():
            try:
                record = json.loads(manifest.read_text())
                other = record["run_id"]
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{manifest}: unreadable restart manifest; use a new out_dir") from None
            if other != self.run_id:
                theirs = record.get("inputs") or {}
                changed = [k for k in self.inputs if k in theirs and theirs[k] != self.inputs[k]]
                if changed:
                    raise InputError(
                        f"out_dir {self.out_dir} holds a run on other inputs ({', '.join(changed)} changed "
                        f"since: content digest {theirs[changed[0]][:16]} != {self.inputs[changed[0]][:16]}): "
                        "use a new out_dir, or delete it to start over")
                raise InputError(
                    f"out_dir {self.out_dir} holds a different run (config hash {other} != "
                    f"{self.run_id}): use a new out_dir, or delete it to start over")
            return True
        for output in outputs:
            if Path(output).exists():
                raise InputError(f"{output} exists but was not written by this run (no restart "
                                 f"manifest in {self.root}): use a new out_dir")
        return False

    def init(self) -> None:
        """Create the directories and the manifest (rank 0)."""
        (self.root / "partials").mkdir(parents=True, exist_ok=True)
        (self.root / "written").mkdir(parents=True, exist_ok=True)
        manifest = self.root / "manifest.json"
        if not manifest.exists():
            write_bytes_atomic(manifest, json.dumps({"run_id": self.run_id, "version": __version__,
                                                     "inputs": self.inputs, "config": self.config},
                                                    indent=2).encode(), fsync=False)

    # ------------------------------------------------------------------ tiles
    def _partial(self, tile: int) -> Path:
        return self.root / "partials" / f"tile_{tile:06d}.npz"

    def _written(self, tile: int) -> Path:
        return self.root / "written" / f"tile_{tile:06d}"

    def written(self) -> set[int]:
        d = self.root / "written"
        if not d.is_dir():
            return set()
        return {int(p.name.split("_")[1]) for p in d.iterdir() if p.name.startswith("tile_")}

    def has_partial(self, tile: int) -> bool:
        return self._partial(tile).exists()

    def save_partial(self, tile: int, fields: dict[str, np.ndarray]) -> None:
        """Save a tile's weighted sums (``den``, ``mean``, optional ``var``, ``members``)."""
        # no fsync: the rename is atomic for process crashes
        with atomic_path(self._partial(tile)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **fields)

    def load_partial(self, tile: int) -> dict[str, np.ndarray]:
        with np.load(self._partial(tile)) as z:
            return {k: z[k] for k in z.files}

    def mark_written(self, tile: int) -> None:
        write_bytes_atomic(self._written(tile), b"", fsync=False)

    def clear_partials(self) -> None:
        shutil.rmtree(self.root / "partials", ignore_errors=True)

