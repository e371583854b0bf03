"""Several evaluation processes: who is which rank, how they agree, and which docs each one runs.

The process group comes from explicit ``rank`` / ``world_size``, else ``accelerate launch`` (``PartialState``),
else torchrun's ``RANK`` / ``WORLD_SIZE`` (a gloo group is initialised when ``MASTER_ADDR`` is set). Docs are
sharded by ``doc_id % world_size``. Without ``torch.distributed`` the ranks share nothing but the output folder
(rank 0 then waits for the other ranks' sample files; see ``tracking._merge_task``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable


@dataclasses.dataclass
class _Dist:
    rank: int
    world: int
    device: str | None = None
    owns_group: bool = False  # we initialised torch.distributed (gloo) and tear it down at the end

    @property
    def initialized(self) -> bool:
        try:
            import torch.distributed as dist

            return self.world > 1 and dist.is_available() and dist.is_initialized()
        except ImportError:  # pragma: no cover
            return False

    def barrier(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        if not self.initialized:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group and self.initialized:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False

    def owns(self, doc_id: int) -> bool:
        """Whether this rank runs the doc (``doc_id % world == rank``)."""
        return doc_id % self.world == self.rank


def _shard(docs: Iterable[dict[str, Any]], dist: _Dist, skip: Iterable[int] = ()) -> list[dict[str, Any]]:
    """The docs this rank runs, in order: its share (``doc_id % world == rank``) minus the ``skip`` doc ids."""
    skip = set(skip)
    return [d for d in docs if dist.owns(d["doc_id"]) and d["doc_id"] not in skip]


def _dist_info(rank: int | None, world_size: int | None) -> _Dist:
    """Rank and world size: explicit arguments, else accelerate's ``PartialState`` (``accelerate launch``),
    else ``RANK`` / ``WORLD_SIZE`` (torchrun), initialising a gloo group when ``MASTER_ADDR`` is set
    (accelerate runs CPU processes as independent single processes)."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"rank and world_size go together with 0 <= rank < world_size, got {rank}, {world_size}")
        return _Dist(rank, world_size)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(0, 1)
    try:
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes == world:
            return _Dist(state.process_index, state.num_processes, str(state.device))
    except ImportError:
        pass
    import torch
    import torch.distributed as dist

    env_rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", env_rank))
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    owns = False
    if dist.is_available() and not dist.is_initialized() and "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo", rank=env_rank, world_size=world)
        owns = True
    return _Dist(env_rank, world, device, owns)
