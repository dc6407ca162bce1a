"""Show or validate the composed config of an app.

usage:
  oceanda config show APP [overrides...]       print the composed config (interpolations unresolved)
  oceanda config validate APP [overrides...]   run the app's config validation
                                               (:func:`oceanda.cli.schema.load`): every mandatory value
                                               (``???``) set, every interpolation resolved, every key known
                                               (``+key=`` too), every value typed and in range
"""

from __future__ import annotations

from omegaconf import OmegaConf

from oceanda.cli import APPS, _split_flags, compose
from oceanda.cli.schema import load
from oceanda.errors import ConfigError


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
    load(app, cfg)
    print(f"config of '{app}' is valid")
    return 0
