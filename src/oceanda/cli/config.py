"""Show or validate the composed config of an app.

usage:
  oceanda config show APP [overrides...]       print the composed, resolved config
  oceanda config validate APP [overrides...]   check that every mandatory value (``???``)
                                               is set and every interpolation resolves
"""

from __future__ import annotations

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from oceanda.cli import APPS, _split_flags, compose
from oceanda.errors import ConfigError


def missing_keys(cfg, prefix: str = "") -> list[str]:
    """Dotted keys of ``cfg`` whose value is the mandatory marker ``???``."""
    out: list[str] = []
    for key in cfg:
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            out.append(path)
            continue
        value = cfg[key]
        if OmegaConf.is_config(value) and not OmegaConf.is_list(value):
            out.extend(missing_keys(value, prefix=f"{path}."))
    return out


def run_argv(args: list[str]) -> int:
    """Run ``oceanda config`` with its own argument list (``show|validate APP ...``)."""
    if len(args) < 2 or args[0] not in ("show", "validate") or args[1] not in APPS or args[1] == "config":
        raise ConfigError(f"usage: oceanda config show|validate APP [overrides]; APP one of "
                          f"{', '.join(a for a in APPS if a != 'config')}")
    action, app = args[0], args[1]
    overrides, flags = _split_flags(args[2:])
    cfg = compose(app, overrides, user_dir=flags.get("config-dir"))  # type: ignore[arg-type]
    if action == "show":
        print(OmegaConf.to_yaml(cfg, resolve=False))
        return 0
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError(f"config of '{app}' leaves mandatory values unset: {', '.join(missing)}")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config of '{app}' does not resolve: {exc}") from None
    print(f"config of '{app}' is valid")
    return 0
