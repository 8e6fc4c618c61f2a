"""How the phases of ``embed`` are shared by the ranks of a torchrun job (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest

from rela_pipeline.stages.embed.plan import batch_row_ranges, missing_batches, rank_row_range, rank_rows_to_embed, rank_share


@pytest.mark.parametrize("count,world", [(0, 3), (7, 1), (7, 3), (8, 8), (5, 8), (1000, 7)])
def test_rank_shares_are_consecutive_balanced_and_cover_every_unit_once(count, world):
    shares = [rank_share(count, rank, world) for rank in range(world)]
    assert [u for share in shares for u in share] == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        rank_share(count, world, world)


def test_missing_batches_are_those_no_finished_range_covers_whole():
    # 10 rows in batches of 3: [0,3) [3,6) [6,9) [9,10). Finished: [0,3) and [6,10) (two ranks' records).
    assert missing_batches(10, 3, [(6, 10), (0, 3)]).tolist() == [1]
    assert missing_batches(10, 3, []).tolist() == [0, 1, 2, 3]
    assert missing_batches(10, 3, [(0, 10)]).tolist() == []
    assert missing_batches(10, 3, [(0, 4)]).tolist() == [1, 2, 3]  # batch 1 is only partly covered
    with pytest.raises(ValueError):
        missing_batches(10, 3, [(8, 11)])


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_ranks_embed_the_missing_rows_once_in_whole_batches(world):
    rng = np.random.default_rng(world)
    num_rows, batch = 1003, 16
    finished = [(j * batch, min((j + 1) * batch, num_rows)) for j in sorted(rng.choice(63, size=20, replace=False).tolist())]
    covered = np.zeros(num_rows, dtype=int)
    for rank in range(world):
        for start, stop in rank_rows_to_embed(num_rows, batch, finished, rank, world):
            assert start % batch == 0 and (stop % batch == 0 or stop == num_rows)  # the one-process batch grid
            covered[start:stop] += 1
    done = np.zeros(num_rows, dtype=bool)
    for start, stop in finished:
        done[start:stop] = True
    assert (covered[~done] == 1).all() and (covered[done] == 0).all()


def test_batch_row_ranges_merge_consecutive_batches():
    assert batch_row_ranges(np.array([0, 1, 3, 4, 6]), 20, 3) == [(0, 6), (9, 15), (18, 20)]


@pytest.mark.parametrize("world", [1, 2, 4, 9])
def test_row_ranges_follow_the_unit_grid_and_cover_the_rows(world):
    num_rows, unit = 1000, 64
    ranges = [rank_row_range(num_rows, unit, rank, world) for rank in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(start % unit == 0 or start == num_rows for start, _ in ranges)
