"""Make a shippable checkpoint from one written by ``oceanda train``.

usage: python -m oceanda.weights.export SRC.pt DST.pt [--note TEXT]

Keeps what inference needs and what documents the run (format, version, model config,
weights, normalisation, training config, epoch, per-epoch history, data provenance with
file names only) and drops the optimizer / scheduler state, so the file is about a third
of ``checkpoint.pt``. Runtime-only model options (``precision``) are removed from the
stored model config: they are chosen at inference, not trained. The result is validated
by :func:`oceanda.assim.fourdvarnet.read_checkpoint` (loads, weights fit the config)
before it is written (temporary file + rename).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

#: model-config keys that are inference-time options, not properties of trained weights
RUNTIME_KEYS = ("precision",)


def _basename(v: Any) -> Any:
    """File names only (no machine's folders), also inside lists (``extra_train``, ``val_data``)."""
    if isinstance(v, (list, tuple)):
        return [_basename(x) for x in v]
    return Path(v).name if isinstance(v, str) and os.sep in v else v


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, note: str | None = None) -> Path:
    """Write the inference part of checkpoint ``src`` to ``dst``; returns ``dst``.

    Raises :class:`oceanda.errors.InputError` (naming the file) when ``src`` is not a
    valid 4DVarNet checkpoint.
    """
    import torch

    from oceanda.assim.checkpoint import DIGEST_KEY, state_digest
    from oceanda.assim.fourdvarnet import read_checkpoint
    from oceanda.data.files import atomic_path

    ck = read_checkpoint(src)  # validates src (format, version, norm, weights vs config)
    cfg = {k: v for k, v in dict(ck["model_config"]).items() if k not in RUNTIME_KEYS}
    extra = {k: _basename(v) for k, v in dict(ck.get("extra") or {}).items()}
    if note:
        extra["note"] = str(note)
    out = {
        "format": ck["format"], "version": ck["version"], "model_config": cfg,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in ck["state_dict"].items()},
        "norm": dict(ck["norm"]), "train_config": ck.get("train_config"),
        "optimizer": None, "scheduler": None, "epoch": int(ck.get("epoch", -1)),
        "history": list(ck.get("history") or []), "extra": extra,
    }
    out[DIGEST_KEY] = state_digest(out["state_dict"])
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        torch.save(out, tmp)
        read_checkpoint(tmp)  # what we ship must load
        os.chmod(tmp, 0o644)  # package data must be world-readable, whatever the umask
    return dst


def main(argv: list[str] | None = None) -> int:
    from oceanda.errors import OceandaError

    ap = argparse.ArgumentParser(prog="python -m oceanda.weights.export", description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--note", default=None, help="free text stored in extra['note']")
    a = ap.parse_args(argv)
    try:
        p = export_checkpoint(a.src, a.dst, a.note)
    except OceandaError as exc:
        print(f"oceanda.weights.export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {p} ({p.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
