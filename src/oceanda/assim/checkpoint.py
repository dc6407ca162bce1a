"""Reading a model checkpoint of the assimilation networks (4DVarNet, SPDE-prior 4DVarNet):
format, version, model config, weights and normalisation checked, every failure an
:class:`~oceanda.errors.InputError` naming the file. Written by :mod:`oceanda.train`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from oceanda.errors import ConfigError, InputError

__all__ = ["read_model_checkpoint", "read_torch_file", "state_digest", "check_state_digest"]

#: checkpoint key holding :func:`state_digest` of its ``state_dict`` (written by oceanda.train)
DIGEST_KEY = "state_digest"


def state_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """BLAKE2b-128 digest of a ``state_dict``: every tensor's name, dtype, shape and bytes,
    in name order (independent of the device and of how the file is serialised)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_state_digest(ck: dict[str, Any], where: str) -> None:
    """Raise :class:`InputError` when checkpoint ``ck`` records a :data:`DIGEST_KEY` that its
    weights do not match (a damaged file); checkpoints without one pass."""
    recorded = ck.get(DIGEST_KEY)
    if recorded is not None and isinstance(ck.get("state_dict"), dict):
        if state_digest(ck["state_dict"]) != recorded:
            raise InputError(f"checkpoint {where}: its weights do not match the digest recorded when it "
                             "was written (the file is damaged): train again or restore it")


def read_torch_file(path: Path) -> Any:
    """``torch.load`` of a checkpoint file (weights only, on the CPU); a missing or unreadable
    file is an :class:`InputError` naming it, with the first line of torch's reason."""
    if not path.is_file():
        raise InputError(f"checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        import pickle

        if isinstance(exc, pickle.UnpicklingError):  # torch's text suggests an unsafe reload: not ours
            reason = "no torch checkpoint of tensors in it"
        else:  # the first sentence of torch's reason
            reason = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:200]
        raise InputError(f"checkpoint {path}: cannot be read (corrupted or not a torch file: "
                         f"{type(exc).__name__}: {reason})") from None


def read_model_checkpoint(path: str | os.PathLike, *, fmt: str, version: int, config_cls, build,
                          expect=None, ignore=(), what: str, hint: str = "") -> dict[str, Any]:
    """Read and validate a checkpoint holding ``format``/``version``/``model_config`` (a
    ``config_cls`` dataclass)/``state_dict``/``norm`` (shared by 4DVarNet and the SPDE-prior
    4DVarNet). Returns its dict plus ``model`` (``build(cfg)`` with the weights loaded) and
    ``model_cfg``; every failure is an :class:`InputError` naming ``path``. ``expect``: the
    config the caller needs (fields in ``ignore`` are not compared); ``hint`` follows the
    wrong-format message."""
    p = Path(path).expanduser()
    ck = read_torch_file(p)
    if not isinstance(ck, dict) or ck.get("format") != fmt:
        found = ck.get("format") if isinstance(ck, dict) else None
        raise InputError(f"checkpoint {p}: not an oceanda {what} checkpoint"
                         + (f" (format {found!r}; {hint})" if hint else ""))
    if ck.get("version") != version:
        raise InputError(f"checkpoint {p}: version {ck.get('version')} not supported "
                         f"(expected {version})")
    for key in ("model_config", "state_dict", "norm"):
        if key not in ck:
            raise InputError(f"checkpoint {p}: missing '{key}'")
    check_state_digest(ck, str(p))
    try:
        cfg = config_cls.from_dict(ck["model_config"])
    except (ConfigError, TypeError) as exc:
        raise InputError(f"checkpoint {p}: bad model config: {exc}") from None
    norm = ck["norm"]
    if not (isinstance(norm, dict) and math.isfinite(norm.get("mean", math.nan))
            and math.isfinite(norm.get("std", math.nan)) and norm["std"] > 0):
        raise InputError(f"checkpoint {p}: bad normalisation {norm!r} (need finite mean, std > 0)")
    if expect is not None:
        diff = {k: (v, getattr(cfg, k)) for k, v in asdict(expect).items()
                if getattr(cfg, k) != v and k not in ignore}
        if diff:
            raise InputError(f"checkpoint {p} does not fit the config: "
                             + ", ".join(f"{k}: config {a!r} vs checkpoint {b!r}" for k, (a, b) in diff.items()))
    try:
        model = build(cfg)
        model.load_state_dict(ck["state_dict"])
    except (RuntimeError, ConfigError) as exc:
        raise InputError(f"checkpoint {p}: weights do not match its model config: "
                         f"{str(exc)[:300]}") from None
    ck["model"], ck["model_cfg"] = model, cfg
    return ck
