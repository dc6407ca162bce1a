"""Rank layout: pure arithmetic checked against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oceanda.data.patches import PatchGeometry, make_patches
from oceanda.errors import ConfigError
from oceanda.parallel.layout import balanced_partition, box_size, build_layout, tile_grid


def _setup(world=3, tile=(4, 16, 16), shape=(9, 40, 50)):
    ocean = np.ones(shape[1:], bool)
    ocean[:12, :15] = False
    g = PatchGeometry(size=(5, 12, 12), stride=(1, 8, 8), crop=(2, 2))
    ps = make_patches(g, shape, ocean)
    return ps, build_layout(ps, tile, world, ocean), ocean


def test_tiles_partition_the_grid():
    shape = (9, 40, 50)
    tiles = tile_grid(shape, (4, 16, None))
    count = np.zeros(shape, int)
    for t in tiles:
        count[tuple(slice(lo, hi) for lo, hi in t.box)] += 1
    assert (count == 1).all()
    assert tiles[0].shape == (4, 16, 50) and len(tiles) == 3 * 3


def test_patches_assigned_by_centre_and_contributions_cover_supports():
    ps, lay, _ = _setup()
    seen = np.concatenate(lay.tile_patches)
    assert sorted(seen.tolist()) == list(range(len(ps)))
    cen = ps.centres()
    sups = ps.supports()
    for t, pl in enumerate(lay.tile_patches):
        assert np.all(np.diff(pl) > 0)  # canonical order kept within the tile
        for p in pl:
            assert all(lo <= c < hi for c, (lo, hi) in zip(cen[p], lay.tiles[t].box))
            assert all(s0 >= b0 and s1 <= b1 for (s0, s1), (b0, b1) in zip(sups[p], lay.support[t]))
        if lay.support[t] is not None:
            # the contribution boxes partition the support box
            assert sum(box_size(b) for _, b in lay.contributions[t]) == box_size(lay.support[t])
            halo = lay.halo(t)
            assert all(h >= 0 for pair in halo for h in pair)


def test_messages_are_consistent_between_ranks():
    ps, lay, _ = _setup(world=4)
    total = sum(box_size(b) for c in lay.contributions for _, b in c)
    local = sum(box_size(b) for a, c in enumerate(lay.contributions) for bb, b in c
                if lay.owner[a] == lay.owner[bb])
    sent = sum(lay.message_size(r, s) for r in range(4) for s in range(4) if r != s)
    assert sent == 2 * (total - local)
    for r in range(4):
        for s in lay.neighbours(r):
            assert r in lay.neighbours(s)
            assert lay.message_size(r, s) + lay.message_size(s, r) > 0
    assert lay.incoming(5) == sorted(lay.incoming(5))
    assert "rank 3" in lay.describe()


@settings(max_examples=50, deadline=None)
@given(work=st.lists(st.floats(0, 100), min_size=1, max_size=30), world=st.integers(1, 8))
def test_balanced_partition_contiguous_nonempty(work, world):
    if world > len(work):
        return
    owner = balanced_partition(np.array(work), world)
    assert owner[0] == 0 and owner[-1] == world - 1
    assert (np.diff(owner) >= 0).all() and (np.diff(owner) <= 1).all()
    assert set(owner.tolist()) == set(range(world))


def test_balance_on_uniform_work():
    owner = balanced_partition(np.ones(100), 7)
    counts = np.bincount(owner)
    assert counts.max() - counts.min() <= 1


def test_too_many_ranks_is_a_clear_error():
    with pytest.raises(ConfigError, match="5 ranks but only 4 tiles"):
        _setup(world=5, tile=(9, 20, 25))


def test_layout_sum_order_does_not_depend_on_world_size():
    ps, l1, _ = _setup(world=1)
    for w in (2, 3, 4):
        _, lw, _ = _setup(world=w)
        assert all(np.array_equal(a, b) for a, b in zip(l1.tile_patches, lw.tile_patches))
        assert l1.contributions == lw.contributions
