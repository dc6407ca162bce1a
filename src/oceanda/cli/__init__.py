"""The ``oceanda`` command line: one console script, one sub-command per app.

``oceanda APP [hydra overrides...]`` composes ``configs/APP.yaml`` (packaged with the
wheel) with the overrides, validates it once into the app's typed config
(:func:`oceanda.cli.schema.load`: unknown keys, ``+key=`` included, wrong types and bad values
are refused) and calls ``oceanda.cli.APP.run(typed_cfg)``. Hydra is used here and only here:
library modules take plain, typed arguments.

Extra flags understood by every app:

``--cfg``            print the composed config and exit;
``--config-dir DIR`` add a directory of the user's own configs in front of the packaged ones;
``-h/--help``        describe the app and print its config.

Errors caused by the user (bad config value, missing or malformed input) are raised as
:class:`oceanda.errors.OceandaError`; they are printed without a traceback and the
process exits with status 2. A write to a full device (or past a quota) is one too: the error
names the file, else the app's ``out_dir``.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from oceanda import __version__
from oceanda.errors import ConfigError, OceandaError

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger("oceanda")

#: errno values of a write to a full device or an exhausted quota (a user error: exit 2)
DEVICE_FULL = (errno.ENOSPC, errno.EDQUOT)

#: app name -> one-line description. An app is offered when ``oceanda.cli.<name>`` exists.
APPS: dict[str, str] = {
    "generate": "build an OSSE: synthetic SSH truth, satellite observations, quick-look figures",
    "evaluate": "score an analysis against a truth with the SSH mapping data-challenge metrics",
    "infer": "distributed reconstruction over DAW patches (mpiexec/srun), blended, restartable",
    "train": "train 4DVarNet / SPDE-prior 4DVarNet on OSSE patches (data-parallel over ranks)",
    "validate": "pendulum / Lorenz-63 validation of neural incremental DA against 4D-Var",
    "config": "show or validate a composed config: oceanda config validate APP [overrides]",
}


#: app -> {key a user types: config key}. ``obs``, ``truth`` and ``period`` are config
#: *groups* of ``generate`` (observation sets, truth generators, named periods), so the apps
#: that take paths or a ``[start, end]`` list store them as ``obs_path`` / ``truth_path`` /
#: ``dates``; users may write either spelling.
ALIASES: dict[str, dict[str, str]] = {
    "infer": {"obs": "obs_path", "truth": "truth_path", "period": "dates"},
    "train": {"obs": "obs_path", "truth": "truth_path", "period": "dates"},
    "evaluate": {"truth": "truth_path", "period": "dates"},
}


def apply_aliases(app: str, overrides: list[str]) -> list[str]:
    """Rewrite ``obs=PATH`` into ``obs_path=PATH`` etc. for ``app`` (see :data:`ALIASES`)."""
    table = ALIASES.get(app, {})
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        out.append(f"{table[key]}={value}" if sep and key in table else item)
    return out


def available_apps() -> dict[str, str]:
    """The apps whose module is installed, in :data:`APPS` order."""
    return {
        name: text
        for name, text in APPS.items()
        if importlib.util.find_spec(f"oceanda.cli.{name}") is not None
    }


def config_dir() -> Path:
    """Directory holding the hydra configs.

    The wheel carries them as ``oceanda/configs``; an editable install or a source
    checkout uses the repository's top-level ``configs/``.
    """
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "configs", here.parent.parent / "configs"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"cannot find oceanda's configs next to {here} (broken install?)")


def compose(app: str, overrides: list[str], user_dir: str | None = None) -> DictConfig:
    """Compose ``configs/<app>.yaml`` with hydra overrides (``key=value``, ``group=option``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = apply_aliases(app, overrides)
    if user_dir is not None:
        path = Path(user_dir).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"--config-dir {user_dir}: not a directory")
        overrides.append(f"hydra.searchpath=[file://{path}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
            return hydra_compose(config_name=app, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"config of '{app}': {exc}") from None


def _usage() -> str:
    apps = available_apps()
    width = max(map(len, apps), default=8)
    lines = [
        f"oceanda {__version__}: neural data assimilation of sea-surface height",
        "",
        "usage: oceanda APP [key=value ...] [--cfg] [--config-dir DIR]",
        "       oceanda APP --help",
        "",
        "apps:",
        *(f"  {name:<{width}}  {text}" for name, text in apps.items()),
        "",
        "Overrides use hydra syntax (domain=gulfstream, out_dir=runs/x, +new.key=1).",
    ]
    return "\n".join(lines)


def _split_flags(args: list[str]) -> tuple[list[str], dict[str, str | bool]]:
    flags: dict[str, str | bool] = {}
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        if arg in ("-h", "--help", "--cfg"):
            flags[arg.lstrip("-")] = True
        elif arg == "--config-dir":
            value = next(it, None)
            if value is None:
                raise ConfigError("--config-dir needs a directory")
            flags["config-dir"] = value
        elif arg.startswith("--config-dir="):
            flags["config-dir"] = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown flag {arg!r} (overrides are written key=value)")
        else:
            rest.append(arg)
    return rest, flags


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at emit time (so that a
    redirected or captured stderr, e.g. under pytest, is honoured after it is swapped)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: str | int | None = None) -> None:
    """Log ``oceanda.*`` records to stderr (level from ``OCEANDA_LOGLEVEL``, default INFO)."""
    level = level or os.environ.get("OCEANDA_LOGLEVEL", "INFO")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``oceanda`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        print(__version__)
        return 0
    app, args = args[0], args[1:]
    apps = available_apps()
    if app not in apps:
        print(f"oceanda: unknown app {app!r}; one of: {', '.join(apps)}", file=sys.stderr)
        return 2
    setup_logging()
    if argv is None:  # the process's own command line (not a call from Python code)
        _raise_on_sigterm()
    try:
        module = importlib.import_module(f"oceanda.cli.{app}")
        if app == "config":  # the config app composes other apps' configs itself
            return int(module.run_argv(args) or 0)
        overrides, flags = _split_flags(args)
        cfg = compose(app, overrides, user_dir=flags.get("config-dir"))  # type: ignore[arg-type]
        if flags.get("help") or flags.get("cfg"):
            from omegaconf import OmegaConf

            if flags.get("help"):
                print(f"oceanda {app}: {apps[app]}\n")
                print((module.__doc__ or "").strip() + "\n\nconfig (override with key=value):\n")
            print(OmegaConf.to_yaml(cfg))
            return 0
        from oceanda.cli.schema import load

        typed = load(app, cfg)
        try:
            return int(module.run(typed) or 0)
        except OSError as exc:
            if exc.errno not in DEVICE_FULL:
                raise
            where = exc.filename or getattr(typed, "out_dir", None) or "the output"
            raise OceandaError(f"{where}: the device is full ({exc.strerror}): free space or choose "
                               "another out_dir") from None
    except OceandaError as exc:
        return _fail(f"oceanda {app}: error: {exc}", 2)
    except Terminated:
        return _fail(f"oceanda {app}: terminated (SIGTERM); temporary files removed", 143)
    except KeyboardInterrupt:
        return _fail(f"oceanda {app}: interrupted", 130)
    except Exception:
        if "oceanda.parallel.comm" in sys.modules and _world() is not None:
            import traceback

            _close_bars()
            traceback.print_exc()  # a bug on one rank: its traceback, then stop every rank
            _fail(f"oceanda {app}: internal error (the traceback above)", 1)
        raise


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job's time limit, ``kill``), raised in the main thread like Ctrl-C's
    KeyboardInterrupt: every ``with`` block unwinds, so that atomic writes remove their
    temporaries (:func:`oceanda.data.files.atomic_path`, ``generate``'s ``*.tmp-PID``)."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process outright
    raise Terminated()


def _raise_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` (only if nobody set a handler: an embedding
    program keeps its own; not on other threads, where Python cannot set one)."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _world() -> tuple[int, int] | None:
    from oceanda.parallel.comm import world_rank

    return world_rank()


def _close_bars() -> None:
    """Close every live tqdm progress bar, so that nothing redraws one after the error."""
    tq = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tq, "tqdm", None), "_instances", ()) or ()):
        with contextlib.suppress(Exception):  # a broken bar must not hide the error
            bar.close()


def _fail(line: str, code: int) -> int:
    """Print ``line`` as the last thing the user sees and return ``code``; under MPI (more
    than one rank) name the rank and stop every rank with ``code`` (the failing rank's message
    stays the last line; :func:`oceanda.parallel.comm.abort_world`)."""
    _close_bars()
    world = _world() if "oceanda.parallel.comm" in sys.modules else None
    if world is not None:
        line += f" [rank {world[0]} of {world[1]}: every rank stopped]"
        if world[0] != 0:  # rank 0 may be drawing the progress bar: start a line of our own
            line = "\n" + line
        from oceanda.parallel.comm import abort_world

        abort_world(code, line)  # does not return
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    return code
