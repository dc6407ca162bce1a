"""DAW patch geometry and blend weights.

A *patch* is a space-time window of ``size = (T, H, W)`` cells (days, rows = latitudes,
columns = longitudes) of a global grid of ``shape = (nt, ny, nx)``. Index ranges are
half-open ``[start, stop)`` in global grid indices; a patch may extend past the domain
(padding: no observation, no ocean there).

Patches are laid out regularly:

* time: one window per *anchor day* ``a = 0, st, 2 st, ...`` (plus ``nt - 1`` when the
  stride skips it); the window is ``[a - T//2, a - T//2 + T)`` when ``anchor="centre"``
  (mapping: the reconstructed day is the centre) and ``[a - T + 1, a + 1)`` when
  ``anchor="end"`` (near-real-time: only past observations);
* forecast (``lead = L > 0``, needs ``anchor="end"``): the window still ends on the anchor
  (target) day ``a``, but its last ``L`` days carry no observation: the runtime drops every
  observation of a day later than ``a - L`` before the method sees the patch
  (:attr:`PatchGeometry.obs_days`), so the target day is a forecast ``L`` days after the
  last observation used;
* space: starts ``-c + k s`` (``c`` the crop, ``s`` the stride) for ``k = 0 .. K-1`` with the
  smallest ``K`` such that the last patch's weighted interior reaches the domain's end.

Blend weights are separable, ``w(t, i, j) = wt(t) wy(i) wx(j)`` (:class:`BlendWeights`):

* time ``"triangle"`` (the 4DVarNet anchor): ``wt(t) = 1 - |t - T//2| / (T//2 + 1)``, peak at
  the window centre, positive on every day; ``"anchor"``: 1 on the anchor day only (the
  centre, or the end day for near-real-time);
* space ``"crop"``: 1 on ``[c, H - c)``, 0 on a border of ``c`` cells; ``"taper"``: 0 on the
  border, then a ``sin^2`` ramp of ``r`` cells to 1 (smooth, still zero on the border).

Modes (:attr:`PatchGeometry.mode`, recorded in 4DVarNet checkpoints so that inference can
refuse a model trained for another one, :func:`check_trained_mode`):

==========  ==================  ============================================================
mode        geometry            reconstructed day, observations used
==========  ==================  ============================================================
mapping     anchor=centre       the window's centre day; observations before and after it
nrt         anchor=end          the window's last day; observations up to that day
forecast    anchor=end, lead L  the window's last day; observations up to ``L`` days before
==========  ==================  ============================================================

The blended analysis is ``sum_p w_p out_p / sum_p w_p`` (cell-wise over the patches ``p``
covering the cell). Patches whose weighted support holds no ocean cell are skipped.
Patches are numbered in one canonical order (time, then row, then column of their start),
which the runtime uses for every summation, so results do not depend on the rank count.
"""

from __future__ import annotations

import dataclasses

import math
from dataclasses import dataclass, field

import numpy as np

from oceanda.errors import ConfigError, InputError

Range = tuple[int, int]
Box = tuple[Range, Range, Range]


def _positive_range(w: np.ndarray) -> Range:
    nz = np.flatnonzero(w > 0)
    return int(nz[0]), int(nz[-1]) + 1


@dataclass(frozen=True)
class BlendWeights:
    """Separable blend weights of one patch: ``wt`` (T,), ``wy`` (H,), ``wx`` (W,), float64.

    ``support`` gives, per axis, the half-open range of patch-local indices where the
    weight is positive (the part of a patch that contributes to the blend).
    """

    wt: np.ndarray
    wy: np.ndarray
    wx: np.ndarray

    def __post_init__(self) -> None:
        for w in (self.wt, self.wy, self.wx):
            w.setflags(write=False)

    @property
    def support(self) -> tuple[Range, Range, Range]:
        """Patch-local ``[(t0, t1), (y0, y1), (x0, x1)]`` of positive weight."""
        return (_positive_range(self.wt), _positive_range(self.wy), _positive_range(self.wx))

    def full(self) -> np.ndarray:
        """The (T, H, W) weight array ``wt ⊗ wy ⊗ wx``."""
        return self.wt[:, None, None] * self.wy[None, :, None] * self.wx[None, None, :]


def _space_weight(n: int, crop: int, kind: str, taper: int) -> np.ndarray:
    w = np.zeros(n)
    w[crop:n - crop] = 1.0
    if kind == "taper" and taper > 0:
        ramp = np.sin(0.5 * np.pi * (np.arange(taper) + 0.5) / taper) ** 2
        w[crop:crop + taper] = ramp
        w[n - crop - taper:n - crop] = ramp[::-1]
    return w


@dataclass(frozen=True)
class PatchGeometry:
    """Shape of the DAW patches and of their blend weights.

    Attributes:
        size: ``(T, H, W)`` days, rows, columns of a patch (anchor: 15 x 240 x 240).
        stride: ``(st, sy, sx)`` between patch anchors (anchor: 1 x 200 x 200). Coupled:
            ``H - 2 crop_y >= sy`` (else rows are left uncovered; checked).
        crop: ``(cy, cx)`` spatial border of zero weight (anchor: 20).
        anchor: ``"centre"`` (mapping) or ``"end"`` (near-real-time).
        time_weight: ``"triangle"`` or ``"anchor"`` (anchor day only; forced by ``"end"``).
        space_weight: ``"crop"`` or ``"taper"`` (smooth ``sin^2`` ramp of ``taper`` cells).
        taper: ramp width in cells for ``space_weight="taper"`` (10, as every shipped patch
            config that uses it: ``configs/patch/{nrt,forecast2,forecast4}.yaml``).
        lead: forecast lead in days (``0 <= lead < T``; ``> 0`` needs ``anchor="end"``): the
            last ``lead`` days of every window are stripped of their observations.
    """

    size: tuple[int, int, int] = (15, 240, 240)
    stride: tuple[int, int, int] = (1, 200, 200)
    crop: tuple[int, int] = (20, 20)
    anchor: str = "centre"
    time_weight: str = "triangle"
    space_weight: str = "crop"
    taper: int = 10
    lead: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.lead, bool) or not isinstance(self.lead, (int, np.integer)):
            raise ConfigError(f"patch.lead must be an integer number of days >= 0, got {self.lead!r}")
        object.__setattr__(self, "lead", int(self.lead))
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "stride", tuple(int(v) for v in self.stride))
        object.__setattr__(self, "crop", tuple(int(v) for v in self.crop))
        if len(self.size) != 3 or min(self.size) < 1:
            raise ConfigError(f"patch.size must be 3 positive integers (T, H, W), got {self.size}")
        if len(self.stride) != 3 or min(self.stride) < 1:
            raise ConfigError(f"patch.stride must be 3 positive integers, got {self.stride}")
        if len(self.crop) != 2 or min(self.crop) < 0:
            raise ConfigError(f"patch.crop must be 2 integers >= 0 (rows, cols), got {self.crop}")
        if self.anchor not in ("centre", "end"):
            raise ConfigError(f"patch.anchor must be 'centre' or 'end', got {self.anchor!r}")
        if self.time_weight not in ("triangle", "anchor"):
            raise ConfigError(f"patch.time_weight must be 'triangle' or 'anchor', got {self.time_weight!r}")
        if self.anchor == "end" and self.time_weight != "anchor":
            raise ConfigError("patch.anchor=end (near-real-time) needs patch.time_weight=anchor: "
                              "a triangle would blend in observations after the analysed day")
        if self.lead < 0:
            raise ConfigError(f"patch.lead must be >= 0 days, got {self.lead}")
        if self.lead and self.anchor != "end":
            raise ConfigError(f"patch.lead={self.lead} (forecast) needs patch.anchor=end: the "
                              "forecast day is the last day of the window")
        if self.lead >= self.size[0]:
            raise ConfigError(f"patch.lead={self.lead} leaves no observed day in a window of "
                              f"{self.size[0]} days (patch.size[0]): need lead < size[0]")
        if self.space_weight not in ("crop", "taper"):
            raise ConfigError(f"patch.space_weight must be 'crop' or 'taper', got {self.space_weight!r}")
        _, H, W = self.size
        ramp = self.taper if self.space_weight == "taper" else 0
        for n, c, axis in ((H, self.crop[0], "rows"), (W, self.crop[1], "columns")):
            if n - 2 * (c + ramp) < 1:
                raise ConfigError(f"patch.crop/taper leave no full-weight {axis} in a patch of "
                                  f"{n} {axis} (crop {c}, taper {ramp})")
        for n, c, s, axis in ((H, self.crop[0], self.stride[1], "rows"),
                              (W, self.crop[1], self.stride[2], "columns")):
            if s > n - 2 * c:
                raise ConfigError(f"patch.stride {s} {axis} > patch interior {n - 2 * c} "
                                  f"(size - 2 crop): {axis} would be left uncovered")
        if self.time_weight == "anchor" and self.stride[0] != 1:
            raise ConfigError("patch.time_weight=anchor reconstructs one day per window: "
                              "patch.stride[0] must be 1")
        if self.time_weight == "triangle" and self.stride[0] > self.size[0]:
            raise ConfigError(f"patch.stride[0]={self.stride[0]} > window length "
                              f"{self.size[0]}: days would be left uncovered")

    @property
    def anchor_offset(self) -> int:
        """Index of the anchor day inside the window (``T//2`` or ``T - 1``)."""
        T = self.size[0]
        return T // 2 if self.anchor == "centre" else T - 1

    @property
    def obs_days(self) -> Range:
        """Patch-local half-open range ``[0, T - lead)`` of the days whose observations
        reach the method (all ``T`` days unless forecasting)."""
        return 0, self.size[0] - self.lead

    @property
    def mode(self) -> str:
        """``"mapping"`` (centre day), ``"nrt"`` (last day) or ``"forecast"`` (last day,
        ``lead`` days after the last observation)."""
        if self.lead:
            return "forecast"
        return "mapping" if self.anchor == "centre" else "nrt"

    def mode_record(self) -> dict[str, object]:
        """What a model trained on these patches depends on: ``{"mode", "anchor", "lead",
        "n_time", "time_weight"}`` (stored in checkpoints, compared by
        :func:`check_trained_mode`)."""
        return {"mode": self.mode, "anchor": self.anchor, "lead": self.lead,
                "n_time": self.size[0], "time_weight": self.time_weight}

    def as_config(self) -> dict[str, object]:
        """The patch config mapping of this geometry (lists for the tuples: YAML / JSON form)."""
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    def mask_obs(self, obs):
        """``obs (..., T, H, W)`` with the last ``lead`` days set to NaN (a copy when
        ``lead > 0``; numpy arrays and torch tensors)."""
        if not self.lead:
            return obs
        out = obs.clone() if hasattr(obs, "clone") else np.array(obs, copy=True)
        out[..., self.obs_days[1]:, :, :] = float("nan")
        return out

    def weights(self) -> BlendWeights:
        """The blend weights of every patch (all patches share them)."""
        T, H, W = self.size
        if self.time_weight == "triangle":
            c = T // 2
            wt = 1.0 - np.abs(np.arange(T) - c) / (c + 1.0)
        else:
            wt = np.zeros(T)
            wt[self.anchor_offset] = 1.0
        return BlendWeights(
            wt=wt,
            wy=_space_weight(H, self.crop[0], self.space_weight, self.taper),
            wx=_space_weight(W, self.crop[1], self.space_weight, self.taper),
        )

    def starts_1d(self, axis: int, n: int) -> np.ndarray:
        """Patch starts along ``axis`` (0 time, 1 rows, 2 columns) of a length-``n`` axis."""
        size, stride = self.size[axis], self.stride[axis]
        if axis == 0:
            anchors = list(range(0, n, stride))
            if anchors[-1] != n - 1 and anchors[-1] + (size - 1 - self.anchor_offset) < n - 1:
                anchors.append(n - 1)
            return np.asarray(anchors, np.int64) - self.anchor_offset
        c = self.crop[axis - 1]
        k = max(0, math.ceil((n + 2 * c - size) / stride)) + 1
        return -c + stride * np.arange(k, dtype=np.int64)


@dataclass(frozen=True)
class PatchSet:
    """All patches of a geometry on a grid, land-only patches removed, canonical order.

    Attributes:
        geometry: the :class:`PatchGeometry`.
        shape: global grid ``(nt, ny, nx)``.
        starts: ``(N, 3)`` int64 global ``(t, y, x)`` start of each patch (may be negative
            or run past the grid: padding), sorted lexicographically: patch ``i`` is the
            ``i``-th in the canonical summation order.
    """

    geometry: PatchGeometry
    shape: tuple[int, int, int]
    starts: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    @property
    def weights(self) -> BlendWeights:
        return self.geometry.weights()

    def footprint(self, i: int) -> Box:
        """Global ``[start, stop)`` per axis of patch ``i`` (unclipped: may pass the edges)."""
        s = self.starts[i]
        return tuple((int(s[a]), int(s[a]) + self.geometry.size[a]) for a in range(3))  # type: ignore[return-value]

    def supports(self) -> np.ndarray:
        """``(N, 3, 2)`` global ``[lo, hi)`` of each patch's positive-weight region,
        clipped to the grid."""
        sup = np.asarray(self.weights.support, np.int64)  # (3, 2)
        lo = np.clip(self.starts + sup[:, 0], 0, self.shape)
        hi = np.clip(self.starts + sup[:, 1], 0, self.shape)
        return np.stack([lo, hi], axis=-1)

    def centres(self) -> np.ndarray:
        """``(N, 3)`` global cell that decides which tile runs each patch: the anchor day
        and the middle of the positive-weight support (clipped to the grid)."""
        sup = self.supports()
        c = np.empty_like(self.starts)
        c[:, 0] = self.starts[:, 0] + self.geometry.anchor_offset
        c[:, 1:] = (sup[:, 1:, 0] + sup[:, 1:, 1] - 1) // 2
        return np.clip(c, 0, np.asarray(self.shape) - 1)


def coverage_1d(starts: np.ndarray, w: np.ndarray, n: int) -> np.ndarray:
    """Sum of the 1-D weights ``w`` of windows starting at ``starts`` on ``[0, n)``."""
    acc = np.zeros(n)
    for s in starts:
        lo, hi = max(0, s), min(n, s + len(w))
        if hi > lo:
            acc[lo:hi] += w[lo - s:hi - s]
    return acc


def make_patches(geometry: PatchGeometry, shape: tuple[int, int, int],
                 ocean: np.ndarray) -> PatchSet:
    """The patches of ``geometry`` on a grid of ``shape = (nt, ny, nx)`` with land mask
    ``ocean`` (ny, nx) bool; patches whose positive-weight support holds no ocean cell are
    skipped.

    Raises:
        InputError: a patch is larger than the domain, or the domain has no ocean cell.
        ConfigError: the geometry leaves cells of the domain uncovered.
    """
    nt, ny, nx = (int(v) for v in shape)
    ocean = np.asarray(ocean, bool)
    if ocean.shape != (ny, nx):
        raise InputError(f"ocean mask has shape {ocean.shape}, expected {(ny, nx)}")
    T, H, W = geometry.size
    if T > nt or H > ny or W > nx:
        raise InputError(f"patch size {geometry.size} (T, H, W) is larger than the domain "
                         f"{(nt, ny, nx)} (days, lat, lon): use a smaller patch.size or a larger "
                         "period/domain")
    if not ocean.any():
        raise InputError("the domain holds no ocean cell (ocean mask all land)")
    bw = geometry.weights()
    st = [geometry.starts_1d(a, n) for a, n in enumerate((nt, ny, nx))]
    for a, (n, w, name) in enumerate(zip((nt, ny, nx), (bw.wt, bw.wy, bw.wx),
                                         ("days", "rows", "columns"))):
        cov = coverage_1d(st[a], w, n)
        if not (cov > 0).all():
            bad = np.flatnonzero(cov <= 0)
            raise ConfigError(f"patch geometry leaves {name} {bad[:5].tolist()} uncovered")
    # ocean test on each spatial support with a summed-area table
    (ay, by), (ax, bx) = bw.support[1], bw.support[2]
    sat = np.zeros((ny + 1, nx + 1), np.int64)
    sat[1:, 1:] = ocean.cumsum(0).cumsum(1)
    y0 = np.clip(st[1] + ay, 0, ny)[:, None]
    y1 = np.clip(st[1] + by, 0, ny)[:, None]
    x0 = np.clip(st[2] + ax, 0, nx)[None, :]
    x1 = np.clip(st[2] + bx, 0, nx)[None, :]
    n_ocean = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]  # (Ky, Kx)
    iy, ix = np.nonzero(n_ocean > 0)
    space = np.stack([st[1][iy], st[2][ix]], axis=1)  # row-major: lexicographic
    starts = np.empty((len(st[0]) * len(space), 3), np.int64)
    starts[:, 0] = np.repeat(st[0], len(space))
    starts[:, 1:] = np.tile(space, (len(st[0]), 1))
    starts.setflags(write=False)
    return PatchSet(geometry=geometry, shape=(nt, ny, nx), starts=starts)


def mode_record_from_patch(patch: dict | None) -> dict[str, object] | None:
    """The :meth:`PatchGeometry.mode_record` of a patch config dict (as stored by older
    checkpoints in ``extra["patch"]``); ``None`` when ``patch`` is not a mapping."""
    if not isinstance(patch, dict) or "size" not in patch:
        return None
    lead = int(patch.get("lead", 0) or 0)
    anchor = str(patch.get("anchor", "centre"))
    return {"mode": "forecast" if lead else ("mapping" if anchor == "centre" else "nrt"),
            "anchor": anchor, "lead": lead, "n_time": int(list(patch["size"])[0]),
            "time_weight": str(patch.get("time_weight", "triangle"))}


def _describe(rec: dict) -> str:
    lead = int(rec.get("lead", 0) or 0)
    return f"{rec.get('mode')} (anchor={rec.get('anchor')}, lead={lead} days, {rec.get('n_time')}-day windows)"


def check_trained_mode(trained: dict | None, geometry: PatchGeometry, source: str = "the model",
                       allow_mismatch: bool = False) -> list[str]:
    """Compare the patch mode a model was trained for (``trained``, a
    :meth:`PatchGeometry.mode_record`; ``None``: unknown, nothing to check) with the
    inference ``geometry``.

    The window length must always match. A different mode (mapping / nrt / forecast, the
    anchor day or the lead) raises unless ``allow_mismatch``, in which case the differences
    are returned (for a warning). Returns ``[]`` when everything matches.

    Raises:
        ConfigError: naming ``source``, both modes and the setting to change.
    """
    if not trained:
        return []
    want = geometry.mode_record()
    n_time = trained.get("n_time")
    if n_time is not None and int(n_time) != want["n_time"]:
        raise ConfigError(f"{source} was trained on {int(n_time)}-day windows but patch.size[0]="
                          f"{want['n_time']}: set patch.size[0]={int(n_time)}")
    diffs = [k for k in ("anchor", "lead") if k in trained and trained[k] != want[k]]
    if not diffs:
        return []
    msg = (f"{source} was trained for {_describe(trained)} but the patches are "
           f"{_describe(want)}")
    if not allow_mismatch:
        lead = int(trained.get("lead", 0) or 0)
        hint = {"mapping": "patch=anchor (or a patch with anchor=centre)",
                "nrt": "patch=nrt (or a patch with anchor=end, lead=0)"}.get(
            str(trained.get("mode")), f"patch=forecast{lead} (or a patch with anchor=end, lead={lead})")
        raise ConfigError(f"{msg}: use {hint}, or allow_mode_mismatch=true to apply it anyway")
    return [msg]
