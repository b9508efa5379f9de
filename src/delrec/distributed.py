"""Data parallelism for every stage: the same command on one process or on several.

Launch a training or evaluation command under accelerate (or torchrun) and it runs data-parallel:

    accelerate launch --multi_gpu --num_processes 2 -m delrec.cli distill --run runs/ml100k --teacher sasrec

(`--multi_gpu` is accelerate's torchrun-based launcher; without GPUs it starts CPU processes that
talk over gloo. `accelerate launch --cpu` starts a single process unless MPI is set up.)

What that means, for teachers, stage 1, stage 2 and evaluation alike:

* A batch size is the *global* batch. Every process draws the same seeded order of examples and
  takes its contiguous share of each global batch; its loss is scaled by its share, so the mean
  that DistributedDataParallel takes over processes is the mean over the global batch. Learning
  rate schedules count optimizer steps, which are the same in number for any process count.
* What a stage trains is wrapped, with the frozen backbone it runs through, in one module whose
  forward returns the loss, and that module goes through accelerate's `prepare_model`, which
  wraps it in DistributedDataParallel. One wrapper forward per backward is what DDP expects,
  however many times the verbalizer calls the backbone inside it. Sharded engines (FSDP,
  DeepSpeed ZeRO-3) are refused with a clear error: the stages keep references to unsharded
  parameters for their optimizers and checkpoints.
* Decisions that end a loop (time budget, early stopping) are taken by the main process and
  broadcast, so no process waits forever on a collective the others skipped.
* Only the main process writes checkpoints, logs, metrics and results; every process reads the
  same checkpoint to resume (the run folder must be on a file system they share).
* Evaluation is sharded by sample, in blocks equal to the scorer's batches, so each block is
  scored exactly as a single process would score it and the gathered ranks are identical.

With one process (no launcher, WORLD_SIZE unset or 1) every method here is a no-op and
accelerate is not even imported.
"""

from __future__ import annotations

import gc
import os
from typing import Callable

import numpy as np
import torch

_CURRENT: "Distributed | None" = None


class Distributed:
    """Who this process is among those a launcher started, and the few collectives stages need."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = self.local_rank = 0
        self._accelerator = None
        if self.world > 1:
            from accelerate import PartialState

            # initialises the process group: NCCL on GPUs, gloo on CPUs (accelerate wants cpu=True
            # to take a CPU-only launch as multi-process rather than fall back to one process)
            state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.local_rank, self.world = state.process_index, state.local_process_index, state.num_processes

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | torch.device = "auto") -> torch.device:
        """`auto` is this process's GPU (cuda:LOCAL_RANK) when there is one, else the CPU."""
        if str(requested) == "auto":
            return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None and self.enabled:
            device = torch.device("cuda", self.local_rank)
        return device

    # -- batches -----------------------------------------------------------------------------

    def check_batch(self, batch_size: int, what: str) -> None:
        if batch_size % self.world:
            raise ValueError(f"{what}: the global batch size {batch_size} must be a multiple of the "
                             f"number of processes ({self.world})")

    def local_share(self, rows):
        """This process's contiguous share of a global batch, an array or a tensor (shares differ
        in size by at most 1, the first ones larger)."""
        if not self.enabled:
            return rows
        if isinstance(rows, torch.Tensor):
            return torch.tensor_split(rows, self.world)[self.rank]  # stays on its device
        return np.array_split(np.asarray(rows), self.world)[self.rank]

    def loss_scale(self, local: int, total: int) -> float:
        """Factor for a local mean loss so that the average over processes is the global mean."""
        return local * self.world / total

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` wrapped in DistributedDataParallel by accelerate under a multi-process launch, or as is."""
        if not self.enabled:
            return module
        if self._accelerator is None:
            from accelerate import Accelerator
            from accelerate.utils import DistributedType

            self._accelerator = Accelerator(cpu=not torch.cuda.is_available())
            kind = self._accelerator.distributed_type
            if kind not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
                # the stages build optimizers and save tensors from unsharded parameters: sharded
                # engines (FSDP, DeepSpeed) would train stale copies, so refuse rather than mislead
                raise NotImplementedError(f"delrec runs data-parallel (DDP) only; the launch asks for {kind.value}. "
                                          "Launch without an FSDP/DeepSpeed config (see docs/distributed.md)")
        wrapped = self._accelerator.prepare_model(module, device_placement=False)
        # accelerate would keep every wrapper it prepared (each with a backbone inside) for the
        # life of the process, across the steps of `delrec run`; the stage holds its own reference
        self._accelerator.free_memory()
        return wrapped

    # -- collectives -------------------------------------------------------------------------

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def own(self, saved):
        """This process's entry of per-process states saved from `gather` (a bare state, from a
        file written before states were gathered, is returned as is; when the number of
        processes changed, every process takes the main process's state)."""
        if not isinstance(saved, list):
            return saved
        return saved[self.rank] if len(saved) == self.world else saved[0]

    def mean(self, value: float) -> float:
        return float(np.mean(self.gather(float(value)))) if self.enabled else float(value)

    def main_decides(self, flag: bool) -> bool:
        """The main process's value of `flag` on every process."""
        if not self.enabled:
            return bool(flag)
        box = [bool(flag)]
        torch.distributed.broadcast_object_list(box, src=0)
        return bool(box[0])

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def map_sharded(self, fn: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, block: int) -> np.ndarray:
        """fn(rows) computed in shards: blocks of `block` rows go round-robin to the processes, each
        calls fn once on the concatenation of its blocks, and the per-row results come back in the
        order of `rows` on every process. fn must return one entry per row."""
        rows = np.asarray(rows)
        if not self.enabled:
            return fn(rows)
        starts = list(range(0, len(rows), block))
        mine = starts[self.rank :: self.world]
        local_rows = np.concatenate([rows[s : s + block] for s in mine]) if mine else rows[:0]
        results = self.gather(np.asarray(fn(local_rows)) if len(local_rows) else None)
        parts, offsets = [], [0] * self.world
        for k, s in enumerate(starts):
            owner, n = k % self.world, len(rows[s : s + block])
            parts.append(results[owner][offsets[owner] : offsets[owner] + n])
            offsets[owner] += n
        return np.concatenate(parts) if parts else fn(rows)


def shutdown() -> None:
    """End a multi-process launch cleanly: wait for every process, then tear the process group
    down (a process that exits with gloo still running can abort at interpreter shutdown)."""
    global _CURRENT
    if _CURRENT is not None and _CURRENT.enabled and torch.distributed.is_initialized():
        gc.collect()  # the stages' DDP reducers go before their process group, not at interpreter exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    _CURRENT = None


def current() -> Distributed:
    """The process's Distributed (created on first use)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = Distributed()
    return _CURRENT
