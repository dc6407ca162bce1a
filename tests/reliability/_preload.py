"""Imported once by the harness's fork server (:mod:`tests.reliability.harness`): every
module the apps import, and one composition of each app's config (hydra's first composition
reads and caches its config repository), so that each forked app run starts warm."""

from __future__ import annotations

import importlib

from oceanda.cli import APPS, compose

for _app in APPS:
    importlib.import_module(f"oceanda.cli.{_app}")
for _module in ("oceanda.cli.schema", "oceanda.data.store", "oceanda.data.alongtrack", "oceanda.parallel.driver",
                "oceanda.train.fourdvarnet", "oceanda.metrics", "oceanda.assim.registry", "oceanda.validation.runner", "xarray", "zarr", "dask.array",
                "torch", "scipy.sparse", "matplotlib.pyplot"):
    importlib.import_module(_module)
for _app in ("infer", "train", "evaluate", "generate", "validate"):
    compose(_app, [] if _app != "train" else ["truth_path=x", "obs_path=x", "out_dir=x"])
