"""Run identity by content, shared by the apps: a check computed once on rank 0 whose
refusal reaches every rank, and the identity of a training run (its inputs' content digests
and the config that determines its weights) recorded in ``OUT_DIR/train_run.json``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from oceanda.errors import InputError, OceandaError

if TYPE_CHECKING:
    from oceanda.cli.schema import TrainAppConfig

#: the identity of the training run whose checkpoints an out_dir holds
TRAIN_MANIFEST = "train_run.json"
#: what a training run writes into its out_dir
TRAIN_OUTPUTS = ("checkpoint.pt", "best_checkpoint.pt", "history.json")
#: what marks an out_dir as an inference run's
INFER_MARKERS = ("restart/manifest.json", "analysis.zarr", "analysis.zarr.incomplete")


def digest_of(obj: Any) -> str:
    """A short digest of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def bcast_checked(comm, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result broadcast; its :class:`OceandaError` raised on every rank
    (so that no rank waits for one that refused)."""
    result: tuple[str, Any] = ("", None)
    if comm.rank == 0:
        try:
            result = ("ok", fn())
        except OceandaError as exc:
            result = ("error", str(exc))
    kind, value = comm.bcast(result)
    if kind == "error":
        raise InputError(value)
    return value


def path_digest(path: Any) -> str:
    """Content digest of an input: a store, a file or along-track files (a glob or a list)."""
    from oceanda.data.alongtrack import is_alongtrack, resolve_paths
    from oceanda.data.integrity import content_digest

    if is_alongtrack(path):
        return content_digest([str(p) for p in resolve_paths(path)])
    return content_digest(path)


def train_identity(cfg: TrainAppConfig) -> dict[str, Any]:
    """``{"inputs": {name: content digest}, "config": digest}`` of a training run: the data
    (by content), the model, the patches and the split; not the number of epochs, the
    learning rate or the progress settings, which a resumed run may change."""
    inputs = {"obs": path_digest(cfg.obs_path)}
    if cfg.truth_path is not None:
        inputs["truth"] = path_digest(cfg.truth_path)
    model = dataclasses.asdict(cfg.model) if dataclasses.is_dataclass(cfg.model) else cfg.model
    config = {"kind": cfg.kind, "model": model, "patch": cfg.patch.as_config(), "box": cfg.box,
              "dates": cfg.dates, "val_period": cfg.val_period, "val_fraction": cfg.val_fraction,
              "gap_days": cfg.gap_days, "stride": cfg.stride, "aug": cfg.aug, "holdout": cfg.holdout,
              "mode": getattr(cfg.train, "mode", None)}
    return {"inputs": inputs, "config": digest_of(config)}


def check_train_out_dir(out_dir: Path, ident: dict[str, Any], resume: bool = False) -> None:
    """Refuse an ``out_dir`` holding an inference run, or the checkpoints of a training run
    on other inputs or another model / data config (:data:`TRAIN_MANIFEST`). With
    ``resume``, a config change is left to the checkpoint reader, which names the key that
    differs (model config, patch mode)."""
    for marker in INFER_MARKERS:
        if (out_dir / marker).exists():
            raise InputError(f"out_dir {out_dir} holds an oceanda infer run ({marker}): train into another "
                             "out_dir (checkpoints are never mixed into an inference run's folder)")
    manifest = out_dir / TRAIN_MANIFEST
    if manifest.is_file():
        try:
            other = json.loads(manifest.read_text())
            theirs, their_config = dict(other["inputs"]), other["config"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{manifest}: unreadable; use another out_dir") from None
        changed = [k for k in sorted(set(theirs) | set(ident["inputs"]))
                   if theirs.get(k) != ident["inputs"].get(k)]
        if changed:
            raise InputError(f"out_dir {out_dir} holds a training run on other inputs ({', '.join(changed)} "
                             "changed since, by content): use another out_dir, or delete it to start over")
        if their_config != ident["config"] and not resume:
            raise InputError(f"out_dir {out_dir} holds another training run (model / patch / split config "
                             f"hash {their_config} != {ident['config']}): use another out_dir")
        return
    found = [n for n in TRAIN_OUTPUTS if (out_dir / n).exists()]
    if found:
        raise InputError(f"out_dir {out_dir} holds {found[0]} of another run (no {TRAIN_MANIFEST}): use "
                         "another out_dir")


def record_train_run(out_dir: Path, ident: dict[str, Any]) -> None:
    """Write :data:`TRAIN_MANIFEST` (rank 0, before the first checkpoint)."""
    from oceanda import __version__
    from oceanda.data.io import write_json_atomic

    write_json_atomic(out_dir / TRAIN_MANIFEST, {**ident, "version": __version__})
