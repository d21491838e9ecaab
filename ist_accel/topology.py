"""Who trains what: the world is S subnet groups x G ranks (IST Alg. 1 with a group of
GPUs per subnet). Rank ``r`` trains subnet ``r // G`` as replica ``r % G``.

Every process group the engine uses is created here, once, at set-up (all ranks create
all groups in the same order, as torch.distributed requires): the ranks of each subnet
group (fast links: gradients and, under DeepSpeed, ZeRO partitions) and, per replica
index, that replica across the groups (slow links: the round's exchange). The same object
is DeepSpeed's ``mpu`` for ZeRO inside a group (:meth:`for_deepspeed`).
"""

from __future__ import annotations

import datetime
from typing import Any

import torch.distributed as dist


class Topology:
    """S groups x G ranks over the initialized default process group."""

    def __init__(self, num_subnets: int, group_size: int, timeout: float) -> None:
        self.S, self.G = num_subnets, group_size
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.group_index, self.replica = divmod(self.rank, group_size)
        self.is_leader = self.replica == 0
        self.timeout = datetime.timedelta(seconds=timeout)
        S, G = num_subnets, group_size
        groups = [dist.new_group(list(range(s * G, (s + 1) * G)), timeout=self.timeout) for s in range(S)] if G > 1 else []
        stripes = [dist.new_group([s * G + g for s in range(S)], timeout=self.timeout) for g in range(G)] if G > 1 else []
        self.intra = groups[self.group_index] if G > 1 else None  # None: a group of one rank
        self.stripe = stripes[self.replica] if G > 1 else None  # None: the default group (G = 1)
        self.group_ranks = list(range(self.group_index * G, (self.group_index + 1) * G))
        self._single: Any = None

    def peer(self, group: int) -> int:
        """The global rank of this rank's counterpart (same replica index) in ``group``."""
        return group * self.G + self.replica

    # ---- DeepSpeed's mpu: data parallel inside the group, no model parallelism ----------

    def for_deepspeed(self) -> Topology:
        """Create the model-parallel groups of one rank each that DeepSpeed asks for (a
        collective: every rank calls it, in the same order) and return the mpu."""
        if self._single is None:
            singles = [dist.new_group([r], timeout=self.timeout) for r in range(self.world)]
            self._single = singles[self.rank]
        return self

    def get_data_parallel_group(self) -> Any:
        return self.intra if self.intra is not None else self._single

    def get_data_parallel_rank(self) -> int:
        return self.replica

    def get_data_parallel_world_size(self) -> int:
        return self.G

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.group_ranks)

    def get_model_parallel_group(self) -> Any:
        return self._single

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1


__all__ = ["Topology"]
