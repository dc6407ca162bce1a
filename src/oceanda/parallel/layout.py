"""Rank layout of distributed inference: pure arithmetic, no communication.

The global grid ``(nt, ny, nx)`` (days, rows, columns) is cut into regular *tiles* of
``tile_shape`` cells (the last tile of an axis may be shorter); tiles are numbered in C
order (time, then row, then column). Every patch belongs to the tile holding its *centre*
(:meth:`oceanda.data.patches.PatchSet.centres`); a tile's *work* is the ocean volume of its
patches. Ranks own contiguous runs of tiles with balanced work.

Halo. A tile's patches write (with positive weight) into the tile's *support box*, the
bounding box of their supports, which sticks out of the tile by the *halo* widths. The part
of tile A's support box that falls inside tile B is A's *contribution* to B: the partial
sums ``S_{A->B} = sum_{p in A} w_p out_p`` and ``sum_{p in A} w_p`` over that box, each
summed in the canonical patch order. The owner of B adds ``S_{A->B}`` over ``A`` in
increasing tile order. Tiles do not depend on the number of ranks, so neither does any
floating-point sum: the output is bitwise the same on any rank count.

Index ranges are half-open ``[lo, hi)``, global, per axis ``(t, y, x)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from oceanda.data.patches import Box, PatchSet
from oceanda.errors import ConfigError


@dataclass(frozen=True)
class Tile:
    """Tile ``index`` covering the global ``box`` ``((t0, t1), (y0, y1), (x0, x1))``."""

    index: int
    box: Box

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(hi - lo for lo, hi in self.box)  # type: ignore[return-value]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def intersect(a: Box, b: Box) -> Box | None:
    """Intersection of two boxes, ``None`` when empty."""
    out = tuple((max(a[k][0], b[k][0]), min(a[k][1], b[k][1])) for k in range(3))
    return None if any(hi <= lo for lo, hi in out) else out  # type: ignore[return-value]


def box_size(b: Box) -> int:
    return int(np.prod([hi - lo for lo, hi in b]))


@dataclass(frozen=True)
class Layout:
    """Tiles, their owners, patches, supports and halo contributions (see module doc).

    Attributes:
        shape: global grid ``(nt, ny, nx)``.
        tile_shape: nominal tile shape.
        world_size: number of ranks.
        tiles: all tiles, C order.
        owner: rank owning each tile.
        tile_patches: per tile, the indices of its patches (canonical order).
        work: per tile, ocean cells x days of its patches (the balancing measure).
        support: per tile, the bounding box of its patches' positive-weight supports
            (``None`` for a tile without patches).
        contributions: per tile A, ``((B, box), ...)`` sorted by B: the box of A's support
            inside tile B (B = A included).
    """

    shape: tuple[int, int, int]
    tile_shape: tuple[int, int, int]
    world_size: int
    tiles: tuple[Tile, ...]
    owner: tuple[int, ...]
    tile_patches: tuple[np.ndarray, ...] = field(repr=False)
    work: np.ndarray = field(repr=False)
    support: tuple[Box | None, ...] = field(repr=False)
    contributions: tuple[tuple[tuple[int, Box], ...], ...] = field(repr=False)

    def tiles_of(self, rank: int) -> list[int]:
        """Tiles owned by ``rank``, increasing."""
        return [t for t, r in enumerate(self.owner) if r == rank]

    def incoming(self, b: int) -> list[tuple[int, Box]]:
        """``[(A, box), ...]`` sorted by A: every tile contributing to tile ``b``."""
        return [(a, box) for a in range(len(self.tiles))
                for bb, box in self.contributions[a] if bb == b]

    def halo(self, a: int) -> tuple[tuple[int, int], ...]:
        """Widths ``((before, after), ...)`` per axis by which tile ``a``'s support box
        sticks out of the tile (0 where it does not)."""
        sup = self.support[a]
        if sup is None:
            return ((0, 0),) * 3
        return tuple((max(0, lo - s0), max(0, s1 - hi))
                     for (lo, hi), (s0, s1) in zip(self.tiles[a].box, sup))

    def neighbours(self, rank: int) -> list[int]:
        """Ranks that ``rank`` exchanges halo contributions with (sends to or receives from)."""
        out = set()
        for a, r in enumerate(self.owner):
            for b, _ in self.contributions[a]:
                s = self.owner[b]
                if r != s and rank in (r, s):
                    out.add(s if r == rank else r)
        return sorted(out)

    def messages(self, src: int, dst: int) -> list[tuple[int, int, Box]]:
        """The contributions ``(A, B, box)`` that rank ``src`` sends to rank ``dst``
        (``owner[A] = src``, ``owner[B] = dst``), sorted by (B, A): both sides know the
        order and the sizes, so one float64 buffer per rank pair carries them all."""
        items = [(a, b, box) for a in range(len(self.tiles)) if self.owner[a] == src
                 for b, box in self.contributions[a] if self.owner[b] == dst]
        return sorted(items, key=lambda it: (it[1], it[0]))

    def message_size(self, src: int, dst: int) -> int:
        """Float64 count of the ``src -> dst`` buffer (numerator and weight per cell)."""
        return 2 * sum(box_size(box) for _, _, box in self.messages(src, dst))

    def describe(self) -> str:
        """Human-readable rank / tile / patch map (the dry run prints it)."""
        lines = [f"grid (time, lat, lon) = {self.shape}, tiles of {self.tile_shape}: "
                 f"{len(self.tiles)} tiles, {sum(len(p) for p in self.tile_patches)} patches, "
                 f"{self.world_size} ranks"]
        total = float(self.work.sum()) or 1.0
        for r in range(self.world_size):
            own = self.tiles_of(r)
            w = float(self.work[own].sum())
            npatch = sum(len(self.tile_patches[t]) for t in own)
            lines.append(f"rank {r}: {len(own)} tiles, {npatch} patches, work {100 * w / total:.1f}%, "
                         f"neighbours {self.neighbours(r)}")
            for t in own:
                box = " x ".join(f"[{lo}:{hi})" for lo, hi in self.tiles[t].box)
                halo = " ".join(f"{lo}/{hi}" for lo, hi in self.halo(t))
                lines.append(f"  tile {t:4d} {box}  patches {len(self.tile_patches[t]):5d}  "
                             f"halo (t y x, before/after) {halo}")
        return "\n".join(lines)


def tile_grid(shape: tuple[int, int, int], tile_shape: tuple[int | None, ...]) -> tuple[Tile, ...]:
    """Regular tiles of ``tile_shape`` (``None`` or 0: the whole axis) in C order."""
    ts = tuple(int(n if not t else min(int(t), n)) for t, n in zip(tile_shape, shape))
    if len(ts) != 3 or min(ts) < 1:
        raise ConfigError(f"tile must give 3 positive sizes (time, lat, lon), got {tile_shape}")
    edges = [list(range(0, n, t)) for n, t in zip(shape, ts)]
    tiles = []
    for t0 in edges[0]:
        for y0 in edges[1]:
            for x0 in edges[2]:
                box = tuple((s, min(s + t, n)) for s, t, n in zip((t0, y0, x0), ts, shape))
                tiles.append(Tile(len(tiles), box))  # type: ignore[arg-type]
    return tuple(tiles)


def balanced_partition(work: np.ndarray, world_size: int) -> np.ndarray:
    """Owner of each item for contiguous runs of items with balanced total ``work``;
    every rank gets at least one item (``len(work) >= world_size``)."""
    n = len(work)
    cum = np.concatenate([[0.0], np.cumsum(np.asarray(work, float))])
    total = cum[-1]
    bounds = [0]
    for r in range(1, world_size):
        b = int(np.argmin(np.abs(cum - r * total / world_size)))
        b = min(max(b, bounds[-1] + 1), n - (world_size - r))
        bounds.append(b)
    bounds.append(n)
    owner = np.empty(n, np.int64)
    for r in range(world_size):
        owner[bounds[r]:bounds[r + 1]] = r
    return owner


def build_layout(patches: PatchSet, tile_shape: tuple[int | None, ...], world_size: int,
                 ocean: np.ndarray) -> Layout:
    """The layout of ``patches`` over tiles of ``tile_shape`` and ``world_size`` ranks.

    Raises:
        ConfigError: more ranks than tiles (names both numbers and the fix).
    """
    shape = patches.shape
    tiles = tile_grid(shape, tile_shape)
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if world_size > len(tiles):
        raise ConfigError(f"{world_size} ranks but only {len(tiles)} tiles of {tile_shape} on a "
                          f"grid of {shape}: use a smaller `tile` or at most {len(tiles)} ranks")
    ts = tuple(tiles[0].shape)
    centres = patches.centres()
    coords = centres // np.asarray(ts)
    ntile = [len(range(0, n, t)) for n, t in zip(shape, ts)]
    patch_tile = np.ravel_multi_index(tuple(coords.T), ntile) if len(patches) else np.zeros(0, int)
    order = np.argsort(patch_tile, kind="stable")  # keeps canonical order within a tile
    counts = np.bincount(patch_tile, minlength=len(tiles))
    tile_patches = tuple(np.split(order, np.cumsum(counts)[:-1]))
    # ocean work of each patch: ocean cells of its (clipped) footprint x days
    ny, nx = shape[1:]
    sat = np.zeros((ny + 1, nx + 1), np.int64)
    sat[1:, 1:] = np.asarray(ocean, bool).cumsum(0).cumsum(1)
    T, H, W = patches.geometry.size
    y0 = np.clip(patches.starts[:, 1], 0, ny)
    y1 = np.clip(patches.starts[:, 1] + H, 0, ny)
    x0 = np.clip(patches.starts[:, 2], 0, nx)
    x1 = np.clip(patches.starts[:, 2] + W, 0, nx)
    pwork = (sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]) * T + 1
    work = np.array([pwork[p].sum() for p in tile_patches], float)
    owner = balanced_partition(work, world_size)
    sups = patches.supports()
    support: list[Box | None] = []
    contributions = []
    for t, ps in enumerate(tile_patches):
        if len(ps) == 0:
            support.append(None)
            contributions.append(())
            continue
        s = sups[ps]
        box = tuple((int(s[:, k, 0].min()), int(s[:, k, 1].max())) for k in range(3))
        support.append(box)  # type: ignore[arg-type]
        lo = [b[0] // w for b, w in zip(box, ts)]
        hi = [(b[1] - 1) // w for b, w in zip(box, ts)]
        out = []
        for it in range(lo[0], hi[0] + 1):
            for iy in range(lo[1], hi[1] + 1):
                for ix in range(lo[2], hi[2] + 1):
                    b = int(np.ravel_multi_index((it, iy, ix), ntile))
                    inter = intersect(box, tiles[b].box)  # type: ignore[arg-type]
                    if inter is not None:
                        out.append((b, inter))
        contributions.append(tuple(out))
    return Layout(shape=tuple(shape), tile_shape=ts, world_size=world_size, tiles=tiles,
                  owner=tuple(int(o) for o in owner), tile_patches=tile_patches, work=work,
                  support=tuple(support), contributions=tuple(contributions))
