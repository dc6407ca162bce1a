"""Typed configs of the apps, validated once at the edge (model: anemoi-core's ``schemas``).

:func:`load` turns an app's composed hydra config into a frozen, typed config object
(:class:`GenerateConfig`, :class:`InferConfig`, :class:`TrainAppConfig`,
:class:`EvaluateConfig`, :class:`ValidateConfig`): every mandatory value (``???``) set, every
interpolation resolved, every key known (also keys added with ``+key=``), every value of the
type of its field and in its range. Nothing below :mod:`oceanda.cli` sees a DictConfig: the
apps pass the typed pieces on (:class:`~oceanda.data.patches.PatchGeometry`,
:class:`~oceanda.assim.fourdvarnet.ModelConfig`, ...). ``oceanda config validate APP``
runs exactly :func:`load`.

The sections:

- ``patch``: :class:`oceanda.data.patches.PatchGeometry` (one parse of the patch config);
- ``system``: :class:`SystemConfig` (device, threads, mpi: honoured by infer and train);
- ``method``: :class:`MethodConfig` (``name`` plus the keyword arguments of the registered
  method, typed by its signature; cheap dataclass methods such as OI are built to check values);
- ``model`` / ``train`` of ``oceanda train``: :class:`~oceanda.assim.fourdvarnet.ModelConfig` +
  :class:`~oceanda.train.fourdvarnet.TrainConfig`, or with ``model.name=spde_4dvarnet`` the
  SPDE-prior pair;
- ``experiment`` of ``oceanda validate``: :class:`~oceanda.validation.runner.ExperimentSettings`.

Adding a key to an app is adding one field to its dataclass here (with its default: the
YAML in ``configs/`` stays the place of the documented values).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from oceanda.config_dataclass import check_value, from_mapping, kwargs_for
from oceanda.data.alongtrack import L3Options
from oceanda.errors import ConfigError
from oceanda.metrics.alongtrack import AlongTrackOptions

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = ["SystemConfig", "MethodConfig", "EvaluateWindow", "CompareEntry", "DemoConfig", "InferConfig", "DemoOSSE",
           "TrainAppConfig", "GenerateConfig", "AlongTrackScoring", "EvaluateConfig", "ValidateConfig", "SCHEMAS", "load",
           "load_patch", "missing_keys"]

Box = tuple[float, float, float, float]
Dates = tuple[Any, Any]


def _check_box(box: Box | None, key: str) -> None:
    if box is not None and not (box[0] < box[1] and box[2] < box[3]):
        raise ConfigError(f"{key}={list(box)}: expected [lon_min, lon_max, lat_min, lat_max] with min < max")
    if box is not None and (box[2] < -90 or box[3] > 90 or box[0] < -180 or box[1] > 360):
        raise ConfigError(f"{key}={list(box)}: latitudes must lie in [-90, 90] and longitudes in "
                          "[-180, 180] or [0, 360]")


def _check_dates(dates: Any, key: str, label: str | None = None) -> None:
    """``[start, end]``: two dates (``YYYY-MM-DD``, the end day included) or two day numbers
    (a numeric time axis), the start not after the end. ``label``: how the message shows the
    value (default ``key=[start, end]``)."""
    if dates is None:
        return
    dates = list(dates)
    label = label or f"{key}={dates}"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dates):
        start, end = (float(v) for v in dates)
    else:
        import numpy as np

        try:
            start, end = (np.datetime64(str(v)) for v in dates)
        except ValueError:
            raise ConfigError(f"{label}: expected [start, end] dates (YYYY-MM-DD) or two day "
                              "numbers") from None
        if end.dtype == np.dtype("datetime64[D]"):  # a plain end date includes its whole day
            end = end + np.timedelta64(1, "D") - np.timedelta64(1, "ns")
    if start > end:
        raise ConfigError(f"{label}: the start is after the end (an empty time range)")


# ----------------------------------------------------------------------------- shared sections


@dataclass(frozen=True)
class SystemConfig:
    """``configs/system/*.yaml``: where a rank runs."""

    device: str = "auto"                   # auto | cpu | cuda
    #: threads of every pool (torch, BLAS/OpenMP, numba) per rank: an integer, or auto / null (the
    #: rank's share of its node's cores, oceanda.parallel.threads)
    threads: int | Literal["auto"] | None = 1
    mpi: bool | Literal["auto"] = "auto"   # auto: MPI when started by a launcher with > 1 rank

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"system.device must be auto, cpu or cuda, got {self.device!r}")
        if isinstance(self.threads, int) and self.threads < 1:
            raise ConfigError(f"system.threads must be >= 1, auto or null, got {self.threads}")

    @property
    def use_mpi(self) -> bool | None:
        """The argument of :func:`oceanda.parallel.comm.get_comm` (None: decide from the launcher)."""
        return None if self.mpi == "auto" else bool(self.mpi)


def load_patch(data: Any, where: str = "patch"):
    """A :class:`~oceanda.data.patches.PatchGeometry` from a patch mapping (typed, unknown
    keys refused, the geometry's own coupling checks)."""
    from oceanda.data.patches import PatchGeometry

    return from_mapping(PatchGeometry, data, where)


@dataclass(frozen=True)
class MethodConfig:
    """``configs/method/*.yaml``: ``name`` and the keyword arguments of that method's factory
    (:mod:`oceanda.assim.registry`), checked against its signature."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Any, where: str = "method") -> MethodConfig:
        from oceanda.assim import registry

        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping with a name (method=oi), got {data!r}")
        opts = dict(data)
        name = opts.pop("name", None)
        if not name or not isinstance(name, str):
            raise ConfigError(f"{where}.name is missing (choose a method: method=oi)")
        factory = registry.get(name)
        cfg = cls(name, opts)
        kwargs = kwargs_for(factory, cfg.kwargs(), where)
        if dataclasses.is_dataclass(factory):  # cheap value objects (e.g. OI): their own range checks
            from_mapping(factory, kwargs, where)
        return cfg

    def as_dict(self) -> dict[str, Any]:
        """The method config as written (``name`` and the options as given)."""
        return {"name": self.name, **self.options}

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the method's factory: the options, with a 4DVarNet
        ``checkpoint`` of null / ``default`` / ``shipped:NAME`` resolved to the shipped weights'
        path (:func:`oceanda.weights.resolve_checkpoint`)."""
        kw = dict(self.options)
        if self.name == "4dvarnet":
            from oceanda.weights import resolve_checkpoint

            kw["checkpoint"] = resolve_checkpoint(kw.get("checkpoint"))
        return kw


# ----------------------------------------------------------------------------- infer


@dataclass(frozen=True)
class EvaluateWindow:
    """``infer``'s ``evaluate``: the scoring window (null: ``oceanda evaluate``'s defaults)."""

    period: Dates | None = None
    box: Box | None = None
    figures: bool = True


@dataclass(frozen=True)
class CompareEntry:
    """One extra demo run: a method config and overrides of the patch config."""

    method: MethodConfig
    patch: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DemoOSSE:
    """``infer``'s ``demo.generate``: the demo's OSSE (:func:`oceanda.data.osse.generate_osse`)."""

    domain: Any = "gulfstream"
    obs: Any = "4nadirs"
    period: dict[str, Any] | None = None
    truth: dict[str, Any] | None = None     # null: the default truth (the double gyre)
    seed: int = 0
    obs_noise: bool = True
    chunk_days: int = 10
    figures: bool = True


@dataclass(frozen=True)
class DemoConfig:
    """``infer``'s ``demo`` (used when ``obs_path`` is null)."""

    dir: str = "runs/gulfstream_demo"
    generate: DemoOSSE = DemoOSSE()
    compare: tuple[CompareEntry, ...] = ()


@dataclass(frozen=True)
class InferConfig:
    """``configs/infer.yaml``."""

    method: MethodConfig
    patch: Any                      # PatchGeometry
    system: SystemConfig = SystemConfig()
    #: a gridded store, or L3 along-track files (a path, a glob or a list)
    obs_path: str | tuple[str, ...] | None = None
    #: along-track input: missions left out, the analysis grid, how the files are read
    obs_exclude: str | tuple[str, ...] = ()
    grid: str | None = None
    alongtrack: L3Options = L3Options()
    truth_path: str | None = None
    out_dir: str | None = None
    box: Box | None = None
    dates: Dates | None = None
    tile: tuple[int, int, int] = (38, 100, 100)
    batch_size: int = 4
    dtype: Literal["float32", "float64"] = "float32"
    dry_run: bool = False
    allow_mode_mismatch: bool = False
    ranks: int | None = None
    progress: bool = True
    evaluate: EvaluateWindow = EvaluateWindow()
    demo: DemoConfig = DemoConfig()
    #: the composed config as YAML (provenance written into the outputs)
    source_yaml: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _check_box(self.box, "box")
        _check_dates(self.dates, "period")
        _check_dates(self.evaluate.period, "evaluate.period")
        _check_box(self.evaluate.box, "evaluate.box")
        if isinstance(self.obs_exclude, str):  # obs_exclude=c2
            object.__setattr__(self, "obs_exclude", (self.obs_exclude,))
        if min(self.tile) < 1:
            raise ConfigError(f"tile must be 3 positive integers (time, lat, lon), got {list(self.tile)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.ranks is not None and self.ranks < 1:
            raise ConfigError(f"ranks must be >= 1 or null, got {self.ranks}")

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> InferConfig:
        from oceanda.data.patches import PatchGeometry as Geometry

        _known_keys(cls, data)
        data = dict(data)
        method = MethodConfig.from_mapping(data.pop("method", None))
        patch = load_patch(data.pop("patch", None))
        demo = dict(data.pop("demo", None) or {})
        entries = []
        for i, e in enumerate(demo.pop("compare", None) or []):
            where = f"demo.compare[{i}]"
            if not isinstance(e, dict) or not isinstance(e.get("method"), dict):
                raise ConfigError(f"{where}={e!r}: expected {{method: {{name: ..., ...}}, patch: {{...}}}}")
            bad = sorted(set(e) - {"method", "patch"})
            if bad:
                raise ConfigError(f"unknown key {', '.join(f'{where}.{k}' for k in bad)}; known: method, patch")
            over = check_value(dict[str, Any], e.get("patch") or {}, f"{where}.patch")
            load_patch({**dataclasses.asdict(Geometry()), **over}, f"{where}.patch")  # keys known
            if data.get("obs_path") is None and not data.get("dry_run"):  # the demo runs it: valid with `patch`
                try:
                    load_patch({**dataclasses.asdict(patch), **over}, f"{where}.patch")
                except ConfigError as exc:
                    raise ConfigError(f"{where}.patch (over the run's patch): {exc}") from None
            entries.append(CompareEntry(MethodConfig.from_mapping(e.get("method"), f"{where}.method"), over))
        demo_cfg = from_mapping(DemoConfig, demo, "demo")
        demo_cfg = dataclasses.replace(demo_cfg, compare=tuple(entries))
        return cls(method=method, patch=patch, demo=demo_cfg, **_fields_of(from_mapping(_InferRest, data, "")))

    def compare_runs(self) -> list[InferConfig]:
        """The demo's extra runs: this config with ``method`` (and patch overrides) of each
        ``demo.compare`` entry whose method differs from ``method``."""
        out = []
        for e in self.demo.compare:
            if e.method.name == self.method.name:
                continue  # already the main run
            patch = load_patch({**dataclasses.asdict(self.patch), **e.patch})
            out.append(dataclasses.replace(self, method=e.method, patch=patch, out_dir=None,
                                           source_yaml=_yaml_with(self.source_yaml, method=e.method.as_dict(),
                                                                  patch=dataclasses.asdict(patch), out_dir=None)))
        return out


def _yaml_with(text: str, **changes: Any) -> str:
    """The YAML ``text`` of a composed config with top-level keys replaced (provenance of a
    derived run); ``text`` unchanged when empty."""
    from omegaconf import OmegaConf

    if not text:
        return text
    cfg = OmegaConf.to_container(OmegaConf.create(text))
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()})
    cfg["patch"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg["patch"].items()}
    return OmegaConf.to_yaml(OmegaConf.create(cfg))


def _rest_of(cls: type, drop: tuple[str, ...]) -> type:
    """A dataclass of ``cls``' fields less ``drop`` (the sections parsed on their own)."""
    keep = [(f.name, f.type, field(default=f.default, default_factory=f.default_factory))
            for f in dataclasses.fields(cls) if f.name not in drop and f.init]
    rest = dataclasses.make_dataclass(f"_{cls.__name__}Rest", keep, frozen=True)
    rest.__module__ = __name__
    return rest


def _known_keys(cls: type, data: dict[str, Any]) -> None:
    """Refuse top-level keys that are no field of the app config ``cls`` (all of them named)."""
    known = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in _DERIVED}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")


#: fields of the app configs filled by :func:`load`, not by the user
_DERIVED = ("source_yaml", "experiment_raw")


def _fields_of(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


# ----------------------------------------------------------------------------- train


@dataclass(frozen=True)
class TrainAppConfig:
    """``configs/train.yaml``: data, split and run settings, plus the model's ``model`` and
    ``train`` sections (4DVarNet's or, with ``model.name=spde_4dvarnet``, the SPDE prior's)."""

    model: Any                      # ModelConfig | SPDEModelConfig
    train: Any                      # TrainConfig | SPDETrainConfig
    patch: Any                      # PatchGeometry
    out_dir: str
    obs_path: str
    truth_path: str | None
    system: SystemConfig = SystemConfig()
    extra_train: tuple[tuple[str, str], ...] = ()
    val_truth_path: str | None = None
    val_obs_path: str | None = None
    box: Box | None = None
    dates: Dates | None = None
    val_period: Dates | None = None
    val_fraction: float = 0.2
    gap_days: int = 7
    stride: tuple[int, int, int] | None = None
    aug: int = 1
    holdout: float = 0.2
    resume: bool = False
    init_checkpoint: str | None = None
    zero_update: bool = False
    validate_start: bool = True
    snapshots: bool = False
    progress: bool = True
    source_yaml: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _check_box(self.box, "box")
        _check_dates(self.dates, "period")
        _check_dates(self.val_period, "val_period")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.gap_days < 0 or self.aug < 0:
            raise ConfigError(f"gap_days and aug must be >= 0, got {self.gap_days}, {self.aug}")
        if not 0 <= self.holdout < 1:
            raise ConfigError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.stride is not None and min(self.stride) < 1:
            raise ConfigError(f"stride must be 3 positive integers or null, got {list(self.stride)}")
        if (self.val_truth_path is None) != (self.val_obs_path is None) and self.truth_path is not None:
            raise ConfigError("val_truth_path and val_obs_path go together: give both (a held-out validation "
                              "OSSE) or neither (validation inside obs_path's period)")
        if self.extra_train and self.truth_path is None:
            raise ConfigError("extra_train needs supervised training (truth_path): each entry is [truth, obs]")

    @property
    def kind(self) -> str:
        """``"4dvarnet"`` or ``"spde_4dvarnet"`` (from the model section's ``name``)."""
        from oceanda.assim.spde_fourdvarnet import SPDEModelConfig

        return "spde_4dvarnet" if isinstance(self.model, SPDEModelConfig) else "4dvarnet"

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> TrainAppConfig:
        from oceanda.train.fourdvarnet import TrainConfig

        _known_keys(cls, data)
        data = dict(data)
        model = dict(check_value(dict[str, Any], data.pop("model", None), "model"))
        name = model.pop("name", "4dvarnet")
        if name == "spde_4dvarnet":
            from oceanda.assim.spde_fourdvarnet import SPDEModelConfig
            from oceanda.train.spde_fourdvarnet import SPDETrainConfig

            model_cfg = SPDEModelConfig.from_dict(model)
            train_cfg = SPDETrainConfig.from_dict(check_value(dict[str, Any], data.pop("train", None) or {}, "train"))
        elif name == "4dvarnet":
            from oceanda.assim.fourdvarnet import ModelConfig

            model_cfg = from_mapping(ModelConfig, model, "model")
            train_cfg = TrainConfig.from_dict(check_value(dict[str, Any], data.pop("train", None) or {}, "train"))
        else:
            raise ConfigError(f"model.name={name!r}: expected 4dvarnet or spde_4dvarnet")
        patch = load_patch(data.pop("patch", None))
        cfg = cls(model=model_cfg, train=train_cfg, patch=patch, **_fields_of(from_mapping(_TrainRest, data, "")))
        cfg.check_coupling()
        return cfg

    def check_coupling(self) -> None:
        """Checks across sections: window length, downsampling, supervised needs a truth."""
        geom, m = self.patch, self.model
        if m.n_time != geom.size[0]:
            raise ConfigError(f"model.n_time={m.n_time} differs from patch.size[0]={geom.size[0]}")
        if self.kind == "spde_4dvarnet":
            if geom.lead:
                raise ConfigError(f"patch.lead={geom.lead}: spde_4dvarnet trains mapping patches only "
                                  "(use patch=anchor or another mapping patch)")
            if any(n % m.lstm_downsample for n in geom.size[1:]):
                raise ConfigError(f"patch.size {geom.size}: H and W must be divisible by model.lstm_downsample")
        else:
            k = m.prior_downsample if m.prior == "bilin_ae" else 2 ** m.unet_depth
            if any(n % k or n % m.lstm_downsample for n in geom.size[1:]):
                raise ConfigError(f"patch.size {geom.size}: H and W must be divisible by the prior's "
                                  f"downsampling ({k}) and model.lstm_downsample")
        if self.truth_path is None and self.train.mode == "supervised":
            raise ConfigError("truth_path=null needs train.mode=semi (supervised training needs the truth)")


# ----------------------------------------------------------------------------- generate, evaluate, validate


@dataclass(frozen=True)
class GenerateConfig:
    """``configs/generate.yaml``; ``domain``, ``obs`` and ``truth`` are checked by the
    library's own parsers (:func:`oceanda.data.domains.domain_spec`,
    :func:`oceanda.obs.constellation`, the truth generator's config)."""

    domain: Any
    period: dict[str, Any]
    out_dir: str
    obs: Any = None
    truth: dict[str, Any] = field(default_factory=lambda: {"kind": "gyre"})
    seed: int = 0
    obs_noise: bool = True
    figures: bool = True
    progress: bool = True
    chunk_days: int = 10
    device: str = "auto"
    overwrite: bool = False
    source_yaml: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        from oceanda.data.domains import domain_spec

        if not self.out_dir:
            raise ConfigError("out_dir: must be set (out_dir=runs/my_osse)")
        if self.chunk_days < 1:
            raise ConfigError(f"chunk_days must be >= 1, got {self.chunk_days}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if set(self.period) != {"start", "end"}:
            raise ConfigError(f"period: expected period.start and period.end, got {sorted(self.period)}")
        start, end = self.period["start"], self.period["end"]
        _check_dates((start, end), "period", label=f"period.start={start}, period.end={end}")
        domain_spec(self.domain)
        if self.obs is not None:
            from oceanda.obs import constellation

            constellation(self.obs)

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> GenerateConfig:
        data = dict(data)
        if isinstance(data.get("period"), dict):  # a period config carries its name
            data["period"] = {k: v for k, v in data["period"].items() if k != "name"}
            bad = sorted(set(data["period"]) - {"start", "end"})
            if bad:
                raise ConfigError(f"unknown key {', '.join('period.' + k for k in bad)}; known: start, end")
        cfg = from_mapping(cls, data, "")
        kinds = {"qg": ("oceanda.dynamics.qg", "QGTruthConfig"),
                 "gaussian": ("oceanda.dynamics.gaussian", "GaussianFieldConfig"),
                 "gyre": ("oceanda.dynamics.gyre", "GyreTruthConfig"),
                 "spde": ("oceanda.priors.spde_truth", "SPDETruthConfig")}
        params = {k: v for k, v in cfg.truth.items() if k not in ("kind", "name", "description")}
        if cfg.truth.get("kind") in kinds:  # other kinds: checked by their generator
            import importlib

            module, name = kinds[cfg.truth["kind"]]
            from_mapping(getattr(importlib.import_module(module), name), params, "truth")
        return cfg


@dataclass(frozen=True)
class AlongTrackScoring(AlongTrackOptions):
    """``evaluate``'s ``alongtrack_options``: the along-track scores' parameters and how the L3
    reference files are read (``l3``)."""

    l3: L3Options = L3Options()

    def scores_options(self) -> AlongTrackOptions:
        return AlongTrackOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AlongTrackOptions)})


@dataclass(frozen=True)
class EvaluateConfig:
    """``configs/evaluate.yaml``: gridded scores against ``truth_path`` and / or along-track
    scores against ``alongtrack`` (L3 files: a path, a glob or a list)."""

    analysis: str
    truth_path: str | None = None
    alongtrack: str | tuple[str, ...] | None = None
    alongtrack_options: AlongTrackScoring = AlongTrackScoring()
    dates: Dates | None = None
    box: Box | None = None
    out_dir: str | None = None
    figures: bool = True
    name: str | None = None
    detrend: Literal["linear", "constant", "none"] | None = "linear"
    source_yaml: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _check_box(self.box, "box")
        _check_dates(self.dates, "period")
        if self.truth_path is None and self.alongtrack is None:
            raise ConfigError("give truth=PATH (gridded scores) and / or alongtrack=FILES (along-track scores)")


@dataclass(frozen=True)
class ValidateConfig:
    """``configs/validate.yaml`` (the ``experiment`` section: ExperimentSettings)."""

    experiment: Any                 # ExperimentSettings
    out_dir: str
    preset_name: str = "custom"
    checkpoint: str | None = None
    progress: bool = True
    threads: int | None = None
    #: the model time step: null (the experiment's), a number (that setting), a list (a dt scan)
    dt: float | tuple[float, ...] | None = None
    source_yaml: str = field(default="", compare=False)
    #: the experiment section as composed (recorded in report.json)
    experiment_raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        dts = self.dt if isinstance(self.dt, tuple) else () if self.dt is None else (self.dt,)
        if (isinstance(self.dt, tuple) and not dts) or any(not (d > 0) for d in dts):
            raise ConfigError(f"dt must be a positive number or a non-empty list of them, got {self.dt!r}")

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> ValidateConfig:
        from oceanda.validation.runner import ExperimentSettings

        _known_keys(cls, data)
        data = dict(data)
        raw = check_value(dict[str, Any], data.pop("experiment", None), "experiment")
        if "system" not in raw:
            raise ConfigError("experiment.system is missing (lorenz63 | pendulum)")
        settings = from_mapping(ExperimentSettings, raw, "experiment")
        settings.check()
        from oceanda.validation.data import check_data, make_lorenz63, make_pendulum

        maker = make_lorenz63 if settings.system == "lorenz63" else make_pendulum
        settings.data = kwargs_for(maker, settings.data, "experiment.data")
        check_data(maker, settings.data)
        return cls(experiment=settings, experiment_raw=raw, **_fields_of(from_mapping(_ValidateRest, data, "")))


_InferRest = _rest_of(InferConfig, ("method", "patch", "demo", "source_yaml"))
_TrainRest = _rest_of(TrainAppConfig, ("model", "train", "patch", "source_yaml"))
_ValidateRest = _rest_of(ValidateConfig, ("experiment", "source_yaml", "experiment_raw"))

#: app -> its typed config
SCHEMAS: dict[str, type] = {"generate": GenerateConfig, "infer": InferConfig, "train": TrainAppConfig,
                            "evaluate": EvaluateConfig, "validate": ValidateConfig}


# ----------------------------------------------------------------------------- entry


def missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of ``cfg`` whose value is the mandatory marker ``???``."""
    from omegaconf import OmegaConf

    out: list[str] = []
    for key in cfg:
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            out.append(path)
            continue
        if OmegaConf.is_interpolation(cfg, key):
            continue  # resolved (or reported) by the resolution that follows
        value = cfg[key]
        if OmegaConf.is_config(value) and not OmegaConf.is_list(value):
            out.extend(missing_keys(value, prefix=f"{path}."))
    return out


def load(app: str, cfg: DictConfig) -> Any:
    """The typed config of ``app`` from its composed DictConfig (see the module docstring);
    :class:`ConfigError` naming the first bad key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if app not in SCHEMAS:
        raise ConfigError(f"no config schema for app {app!r}")
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError(f"config of '{app}' leaves mandatory values unset: {', '.join(missing)}")
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        text = OmegaConf.to_yaml(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config of '{app}' does not resolve: {exc}") from None
    schema = SCHEMAS[app]
    typed = schema.from_mapping(data) if "from_mapping" in schema.__dict__ else from_mapping(schema, data, "")
    return dataclasses.replace(typed, source_yaml=text)
