"""ShardedBatchSampler: single-process batches dealt to ranks."""
import pytest

from datasets.samplers import ShardedBatchSampler


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_every_image_once_in_its_single_process_batch(world_size):
    single = list(ShardedBatchSampler(11, 2))
    shards = [list(ShardedBatchSampler(11, 2, rank, world_size)) for rank in range(world_size)]
    assert sorted(b for shard in shards for b in map(tuple, shard)) == sorted(map(tuple, single))
    assert single == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10]]


def test_more_ranks_than_batches_leaves_some_empty():
    shards = [ShardedBatchSampler(3, 2, rank, 4) for rank in range(4)]
    assert [len(s) for s in shards] == [1, 1, 0, 0]


def test_bad_batch_size_is_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        ShardedBatchSampler(4, 0)
