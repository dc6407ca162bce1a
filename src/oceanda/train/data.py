"""Training patches for 4DVarNet from truth / observation arrays.

Input arrays (numpy, already read by :mod:`oceanda.data.io`): ``truth`` ``(nt, ny, nx)`` [m]
(may be ``None`` for semi-supervised training), ``obs`` ``(nt, ny, nx)`` [m] NaN where
unobserved, ``ocean`` ``(ny, nx)`` bool. Everything is normalised with the training-set
statistics ``(x - mean) / std`` (:class:`Normalisation`, computed on the training days'
ocean cells only, stored in checkpoints).

Patches (:func:`patch_starts`) lie inside the domain: ``size = (T, H, W)`` windows with
``stride`` (anchor: 15 x 240 x 240, stride 1 x 200 x 200), the last start of each axis
moved back so the domain's end is covered. Their loss weights are the inference blend
weights (:meth:`oceanda.data.patches.PatchGeometry.weights`: triangle in time x crop),
times the ocean mask.

Modes (:attr:`oceanda.data.patches.PatchGeometry.mode`): training follows the inference
patch geometry. The loss weight is the blend weight, so near-real-time and forecast
patches (``time_weight="anchor"``) are trained on their last (target) day only; for a
forecast of lead ``L`` the input observations of the window's last ``L`` days are dropped
exactly as the inference runtime drops them (``lead``). Mapping (``lead=0``) items are
unchanged.

Time split with a gap (:func:`time_split`, the data challenge's practice): the evaluation
period ``[v0, v1)`` and ``gap`` days on each side are removed; training windows lie entirely
in one of the remaining segments, so no training window sees an evaluation day.

Augmentation (the anchor's ``AugmentedDataset``): item ``i + k n`` (``k = 1..aug``) is patch
``i``'s truth re-sampled through the observation mask of patch ``perm^k(i)`` (another
window's satellite coverage), a fixed seeded permutation. Semi-supervised items hold out
whole track segments (connected observed components of each day) with probability
``holdout``: the input keeps the rest, the target is the held-out observations only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from oceanda.errors import ConfigError, InputError

__all__ = ["Normalisation", "patch_starts", "time_split", "PatchDataset", "join_osses"]


@dataclass(frozen=True)
class Normalisation:
    """``x_n = (x - mean) / std`` (SSH in metres)."""

    mean: float
    std: float

    @classmethod
    def fit(cls, field: np.ndarray, ocean: np.ndarray, days: np.ndarray | None = None) -> Normalisation:
        """Mean / std of the finite ocean values of ``field (nt, ny, nx)`` on ``days``."""
        f = field if days is None else field[days]
        v = f[:, ocean]
        v = v[np.isfinite(v)]
        if v.size < 2:
            raise InputError("cannot compute normalisation statistics: fewer than 2 finite ocean "
                             "values in the training period")
        std = float(v.std())
        if not std > 0:
            raise InputError("training data has zero variance: cannot normalise")
        return cls(float(v.mean()), std)

    def apply(self, x):
        return (x - self.mean) / self.std

    def invert(self, x):
        return x * self.std + self.mean

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}


def _starts(n: int, size: int, stride: int) -> list[int]:
    if size > n:
        return []
    s = list(range(0, n - size + 1, stride))
    if s[-1] != n - size:
        s.append(n - size)
    return s


def patch_starts(days: np.ndarray, shape_yx: tuple[int, int], size: tuple[int, int, int],
                 stride: tuple[int, int, int]) -> np.ndarray:
    """``(N, 3)`` starts ``(t, y, x)`` of the patches inside the domain whose ``T`` days are
    all in ``days`` (sorted day indices; consecutive runs are segments)."""
    T, H, W = size
    days = np.asarray(sorted(set(int(d) for d in days)), np.int64)
    ys, xs = _starts(shape_yx[0], H, stride[1]), _starts(shape_yx[1], W, stride[2])
    if not ys or not xs:
        raise InputError(f"patch size {size[1:]} is larger than the domain {tuple(shape_yx)}")
    out = []
    if days.size:
        breaks = np.flatnonzero(np.diff(days) != 1) + 1
        for seg in np.split(days, breaks):
            for t in _starts(len(seg), T, stride[0]):
                for y in ys:
                    for x in xs:
                        out.append((int(seg[t]), y, x))
    return np.asarray(out, np.int64).reshape(-1, 3)


def time_split(n_days: int, val_start: int, val_days: int, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_days, val_days)`` index arrays: validation ``[val_start, val_start + val_days)``,
    training every other day farther than ``gap`` days from it."""
    if val_days <= 0 or val_start < 0 or val_start + val_days > n_days:
        raise ConfigError(f"validation period [{val_start}, {val_start + val_days}) is not inside "
                          f"the {n_days} days of data")
    if gap < 0:
        raise ConfigError(f"train.gap_days must be >= 0, got {gap}")
    d = np.arange(n_days)
    val = d[(d >= val_start) & (d < val_start + val_days)]
    train = d[(d < val_start - gap) | (d >= val_start + val_days + gap)]
    return train, val


class PatchDataset(torch.utils.data.Dataset):
    """Normalised training patches; ``__getitem__`` returns a dict of float32 tensors:

    ``obs (T, H, W)`` input observations (NaN where unobserved), ``tgt (T, H, W)`` target
    (truth, or held-out observations in semi-supervised mode; NaN where undefined),
    ``weight (T, H, W)`` loss weight (blend weight x ocean), ``ocean (H, W)`` bool, and with
    ``oi`` (keyword arguments of :func:`oceanda.assim.oi.oi_patch`; needs the grid's ``lon``,
    ``lat``) ``x0 (T, H, W)``: the normalised OI analysis of the item's input observations
    (the solver's first guess of a ``model.init=oi`` 4DVarNet), computed on the fly, so the
    augmented items (other windows' masks) get the OI of what they observe; ``cache_oi``
    keeps them (for a fixed set such as the supervised validation patches; ignored in
    semi-supervised mode, whose inputs change every epoch).

    ``lead`` (forecast): the observations of the last ``lead`` days of every window are
    removed from the input (in semi-supervised mode they join the target: nothing of them
    is seen, all of them are predicted).
    """

    def __init__(self, truth: np.ndarray | None, obs: np.ndarray, ocean: np.ndarray,
                 starts: np.ndarray, size: tuple[int, int, int], weight: np.ndarray,
                 norm: Normalisation, aug: int = 0, mode: str = "supervised",
                 holdout: float = 0.2, seed: int = 0, lead: int = 0, oi: dict | None = None,
                 lon: np.ndarray | None = None, lat: np.ndarray | None = None,
                 cache_oi: bool = False) -> None:
        if mode not in ("supervised", "semi"):
            raise ConfigError(f"train.mode must be 'supervised' or 'semi', got {mode!r}")
        if mode == "supervised" and truth is None:
            raise InputError("supervised training needs a truth dataset (or use train.mode=semi)")
        if obs.ndim != 3 or ocean.shape != obs.shape[1:]:
            raise InputError(f"obs must be (time, lat, lon) and ocean (lat, lon); got {obs.shape}, {ocean.shape}")
        if truth is not None and truth.shape != obs.shape:
            raise InputError(f"truth {truth.shape} and obs {obs.shape} do not have the same shape")
        if len(starts) == 0:
            raise InputError("no training patch fits in the training period/domain")
        if not 0 <= int(lead) < int(size[0]):
            raise ConfigError(f"lead={lead} days must be in [0, {int(size[0])}) (the window length)")
        self.lead = int(lead)
        self.truth = None if truth is None else np.where(ocean, norm.apply(truth), 0.0).astype(np.float32)
        self.obs = np.where(ocean, norm.apply(obs), np.nan).astype(np.float32)
        self.ocean = np.asarray(ocean, bool)
        self.starts, self.size = np.asarray(starts, np.int64), tuple(int(v) for v in size)
        self.weight = np.asarray(weight, np.float32)
        self.norm, self.mode, self.holdout = norm, mode, float(holdout)
        self.aug = int(aug) if mode == "supervised" else 0
        self.seed = int(seed)
        self.perm = np.random.default_rng(seed).permutation(len(self.starts))
        self.epoch = 0
        self.oi = None if oi is None else dict(oi)
        if self.oi is not None:
            if lon is None or lat is None:
                raise InputError("PatchDataset(oi=...) needs the grid's lon and lat")
            self.lon, self.lat = np.asarray(lon, np.float64), np.asarray(lat, np.float64)
            if self.lon.shape != (ocean.shape[1],) or self.lat.shape != (ocean.shape[0],):
                raise InputError(f"lon {self.lon.shape} / lat {self.lat.shape} do not fit the grid "
                                 f"{tuple(ocean.shape)}")
        # the cache is only valid for fixed inputs (semi-supervised hold-outs change per epoch)
        self.cache_oi = bool(cache_oi) and self.mode == "supervised"
        self._oi_cache: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        """Changes the semi-supervised hold-out draw (deterministic per epoch and item)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.starts) * (1 + self.aug)

    def _window(self, arr: np.ndarray, i: int) -> np.ndarray:
        t, y, x = self.starts[i]
        T, H, W = self.size
        return arr[t:t + T, y:y + H, x:x + W]

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        n = len(self.starts)
        base, k = idx % n, idx // n
        t, y, x = self.starts[base]
        oc = self.ocean[y:y + self.size[1], x:x + self.size[2]]
        w = self.weight * oc[None]
        if self.mode == "supervised":
            tgt = self._window(self.truth, base)
            if k == 0:
                obs = self._window(self.obs, base)
            else:
                j = base
                for _ in range(k):
                    j = int(self.perm[j])
                seen = np.isfinite(self._window(self.obs, j))
                obs = np.where(seen & oc[None], tgt, np.nan)
            if self.lead:
                obs = np.array(obs, copy=True)
                obs[-self.lead:] = np.nan
        else:
            full = self._window(self.obs, base)
            rng = np.random.default_rng((self.seed, self.epoch, idx))
            held = np.zeros(full.shape, bool)
            for d in range(full.shape[0]):
                lab, m = ndimage.label(np.isfinite(full[d]), structure=np.ones((3, 3)))
                if m:
                    pick = np.concatenate([[False], rng.random(m) < self.holdout])
                    held[d] = pick[lab]
            if self.lead:
                held[-self.lead:] = np.isfinite(full[-self.lead:])
            obs = np.where(held, np.nan, full)
            tgt = np.where(held, full, np.nan)
        item = {}
        if self.oi is not None:
            item["x0"] = torch.from_numpy(self._first_guess(idx, obs, y, x))
        return item | {
            "obs": torch.from_numpy(np.ascontiguousarray(obs, np.float32)),
            "tgt": torch.from_numpy(np.ascontiguousarray(tgt, np.float32)),
            "weight": torch.from_numpy(np.ascontiguousarray(w, np.float32)),
            "ocean": torch.from_numpy(np.ascontiguousarray(oc)),
        }

    def _first_guess(self, idx: int, obs: np.ndarray, y: int, x: int) -> np.ndarray:
        """Normalised OI analysis of the item's input observations ``obs`` (normalised units):
        computed in metres exactly as ``method=4dvarnet`` does on an inference patch
        (:func:`oceanda.assim.oi.oi_patch`, days ``0..T-1``), then normalised."""
        if self.cache_oi and idx in self._oi_cache:
            return self._oi_cache[idx]
        from oceanda.assim.oi import oi_patch

        T, H, W = self.size
        phys = self.norm.invert(np.asarray(obs, np.float64))
        a = oi_patch(phys, self.lon[x:x + W], self.lat[y:y + H], np.arange(T, dtype=np.float64), **self.oi)
        out = np.ascontiguousarray(self.norm.apply(a), np.float32)
        if self.cache_oi:
            self._oi_cache[idx] = out
        return out


def load_arrays(truth_path: str | None, obs_path: str, box=None, period=None, *, with_grid: bool = False):
    """``(truth | None, obs, ocean, times)`` numpy arrays of the OSSE (validated, aligned),
    plus the :class:`~oceanda.data.grid.Grid` of the window when ``with_grid``."""
    from oceanda.data import io
    from oceanda.data import names as N

    from oceanda.data.alongtrack import gridded_dataset, is_alongtrack

    if is_alongtrack(obs_path):  # L3 along-track files, binned daily onto the truth's grid
        if truth_path is None:
            from oceanda.errors import ConfigError

            raise ConfigError(f"obs={obs_path}: along-track files are binned onto the truth's grid: "
                              "give truth_path (or grid them with oceanda infer's reader first)")
        obs_ds = gridded_dataset(obs_path, truth_path, period)
    else:
        obs_ds = io.open_dataset(obs_path, [N.SSH_OBS], optional=[N.OCEAN])
    obs_ds = io.select_window(obs_ds, period=period, box=box, what=str(obs_path))
    truth = None
    if truth_path is not None:
        tr = io.open_dataset(truth_path, [N.SSH], optional=[N.OCEAN])
        tr = io.select_window(tr, period=period, box=box, what=str(truth_path))
        io.check_aligned(tr, obs_ds, names=(f"truth {truth_path}", f"observations {obs_path}"))
        io.check_values(tr[N.SSH], f"truth {truth_path}")
        truth = np.asarray(io.compute(tr[N.SSH], f"truth {truth_path}", f"variable '{N.SSH}'"), np.float32)
    if N.OCEAN in obs_ds:
        ocean = np.asarray(obs_ds[N.OCEAN].values) > 0
    elif truth_path is not None and N.OCEAN in tr:
        ocean = np.asarray(tr[N.OCEAN].values) > 0
    else:
        ocean = np.ones(obs_ds[N.SSH_OBS].shape[1:], bool) if truth is None else np.isfinite(truth).all(0)
    io.check_values(obs_ds[N.SSH_OBS], f"observations {obs_path}")
    obs = np.asarray(io.compute(obs_ds[N.SSH_OBS], f"observations {obs_path}", f"variable '{N.SSH_OBS}'"),
                     np.float32)
    if not np.isfinite(obs[:, ocean]).any():  # nothing to learn from (semi-supervised) or to feed the solver
        raise InputError(f"observations {obs_path}: variable '{N.SSH_OBS}' holds no observation on the ocean "
                         f"(all NaN) in the window (period {period}, box {box})")
    if truth is not None:
        bad = ocean & ~np.isfinite(truth).all(0)
        if bad.any():
            raise InputError(f"truth {truth_path}: variable '{N.SSH}' holds NaN in {int(bad.sum())} ocean cells")
    if with_grid:
        from oceanda.data.grid import Grid

        grid = Grid.from_coords(obs_ds[N.LON].values, obs_ds[N.LAT].values, ocean=ocean)
        return truth, obs, ocean, obs_ds[N.TIME].values, grid
    return truth, obs, ocean, obs_ds[N.TIME].values


def validation_window(times: np.ndarray, val_period, val_fraction: float) -> tuple[int, int]:
    """``(first index, number of days)`` of the validation window: the days of ``val_period``
    (``[start, end]`` dates, or day numbers when ``times`` are not dates) or the last
    ``val_fraction`` of the days."""
    n = len(times)
    if val_period is None:
        k = max(1, int(round(n * float(val_fraction))))
        return n - k, k
    if len(val_period) != 2:
        raise ConfigError(f"val_period must be [start, end], got {val_period}")
    t = times.astype("datetime64[D]") if np.issubdtype(times.dtype, np.datetime64) else times
    lo, hi = (np.datetime64(str(v), "D") if np.issubdtype(times.dtype, np.datetime64) else float(v)
              for v in val_period)
    idx = np.flatnonzero((t >= lo) & (t <= hi))
    if idx.size == 0:
        raise ConfigError(f"val_period {val_period} holds no day of the data ({times[0]}..{times[-1]})")
    return int(idx[0]), int(idx[-1] - idx[0] + 1)


def join_osses(parts: list[tuple[np.ndarray | None, np.ndarray, np.ndarray]], names: list[str]):
    """Several OSSEs on one grid (other seeds / years) as one array, each followed by a NaN day.

    ``parts``: ``(truth | None, obs, ocean)`` of each OSSE (``(nt_k, ny, nx)``; ``names`` their paths,
    for errors). Returns ``(truth | None, obs, ocean, days)``: the arrays concatenated in time with one
    all-NaN separator day after each part, so that no patch window (:func:`patch_starts` keeps windows
    inside runs of consecutive ``days``) spans two OSSEs, and ``days[k]`` the day indices of part ``k``.
    The ocean masks must agree (:class:`InputError` naming the first that differs).
    """
    ocean = parts[0][2]
    if any((p[0] is None) != (parts[0][0] is None) for p in parts):
        raise InputError(f"{names[0]}: every OSSE needs a truth, or none")
    for (_, obs, oc), name in zip(parts, names):
        if oc.shape != ocean.shape or not np.array_equal(oc, ocean):
            raise InputError(f"{name}: its grid / ocean mask {oc.shape} differs from {names[0]}'s {ocean.shape}")
    sep = np.full((1, *ocean.shape), np.nan, np.float32)
    days, t0 = [], 0
    for _, obs, _ in parts:
        days.append(np.arange(t0, t0 + len(obs)))
        t0 += len(obs) + 1
    obs = np.concatenate([a for p in parts for a in (p[1], sep)])
    truth = None if parts[0][0] is None else np.concatenate([a for p in parts for a in (p[0], sep)])
    return truth, obs, ocean, days
