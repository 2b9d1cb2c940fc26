"""Batch samplers for distributed evaluation."""
from typing import Iterator

from torch.utils.data import Sampler


class ShardedBatchSampler(Sampler[list[int]]):
    """The single-process evaluation batches ``[0..b), [b..2b), ...``, dealt round-robin to ranks.

    Every image lands in exactly the batch it would have in a single process, so outputs (which
    depend on a batch's common padding) and therefore the AP are the same whatever the number of
    processes. Ranks may get one batch more than others; evaluation has no collective inside
    its loop, so that is fine.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batches = [list(range(i, min(i + batch_size, num_samples)))
                        for i in range(0, num_samples, batch_size)][rank::world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
