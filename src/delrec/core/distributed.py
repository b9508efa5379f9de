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
  forward returns the loss (a `StageModule`), and `prepare` wraps that module for the launch:
  - plain `accelerate launch --multi_gpu`: accelerate's `prepare_model`, i.e.
    DistributedDataParallel. One wrapper forward per backward is what DDP expects, however many
    times the verbalizer calls the backbone inside it.
  - `accelerate launch --use_fsdp --fsdp_version 2`: PyTorch's FSDP2 (`fully_shard`) shards the
    frozen weights, each transformer block its own unit and the rest (embeddings, head, norms) in
    the root. The trainable tensors (soft prompt, adapters; a few MB) stay whole on every process,
    as under DDP, and `reduce_gradients` averages their gradients after each backward: optimizers,
    checkpoints, AdaLoRA's rank allocator and gradient clipping then work on ordinary tensors.
    Evaluation during training runs inside the root's forward (`through`), because FSDP gathers
    the root's weights only there, and every process runs the same number of scoring batches
    (`map_sharded` pads), because each batch all-gathers every block. Teachers are small and stay
    under DistributedDataParallel. DeepSpeed is refused with a clear error.
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
import math
import os
import weakref
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

_CURRENT: Distributed | None = None


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _strategy_of_launch() -> str:
    """"fsdp" under `accelerate launch --use_fsdp --fsdp_version 2`, else "ddp"."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise NotImplementedError("delrec does not run under DeepSpeed; to shard a large backbone launch with "
                                  "`accelerate launch --use_fsdp --fsdp_version 2` (docs/distributed.md)")
    if not _flag("ACCELERATE_USE_FSDP"):
        return "ddp"
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError("delrec shards with FSDP2 (PyTorch's fully_shard): add `--fsdp_version 2` to the "
                         "`accelerate launch --use_fsdp` command line (or fsdp_version: 2 to its config file)")
    return "fsdp"


class StageModule(nn.Module):
    """Base of the modules a stage hands to `Distributed.prepare`: `forward(*args)` is
    `self.loss(*args)`; `forward(call=fn)` runs fn() instead, inside the forward (see
    `Distributed.through`)."""

    def loss(self, *args):
        raise NotImplementedError

    def kept_whole(self) -> set[nn.Parameter]:
        """Parameters FSDP leaves unsharded: what the stage trains (and saves)."""
        return {p for p in self.parameters() if p.requires_grad}

    def forward(self, *args, call: Callable | None = None):
        return call() if call is not None else self.loss(*args)


class Distributed:
    """Who this process is among those a launcher started, and the few collectives stages need."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = self.local_rank = 0
        self._accelerator = None
        self._sharded_modules: weakref.WeakSet = weakref.WeakSet()
        self.sharding: dict | None = None  # what the last FSDP `prepare` sharded
        self.strategy = "ddp"
        if self.world > 1:
            self.strategy = _strategy_of_launch()
            from accelerate import PartialState

            # initialises the process group: NCCL on GPUs, gloo on CPUs (accelerate wants cpu=True
            # to take a CPU-only launch as multi-process rather than fall back to one process)
            state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.local_rank, self.world = state.process_index, state.local_process_index, state.num_processes

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        """Whether stage modules are sharded (FSDP) rather than replicated (DDP)."""
        return self.enabled and self.strategy == "fsdp"

    def describe(self) -> dict:
        """How this launch trains, for a stage's metrics."""
        out = {"processes": self.world, "engine": self.strategy if self.enabled else "single process"}
        return {**out, "sharding": self.sharding} if self.sharded and self.sharding else out

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

    def prepare(self, module: nn.Module, shard: bool = True) -> nn.Module:
        """`module` made ready for this launch: as is on one process; sharded with FSDP2 under an FSDP
        launch (unless `shard` is False: teachers); else wrapped in DistributedDataParallel by
        accelerate."""
        if not self.enabled:
            return module
        if self.strategy == "fsdp":
            return self._fully_shard(module) if shard else self._ddp(module)
        if self._accelerator is None:
            from accelerate import Accelerator
            from accelerate.utils import DistributedType

            self._accelerator = Accelerator(cpu=not torch.cuda.is_available())
            kind = self._accelerator.distributed_type
            if kind not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
                raise NotImplementedError(f"delrec runs under DDP or FSDP2; the launch asks for {kind.value} "
                                          "(see docs/distributed.md)")
        wrapped = self._accelerator.prepare_model(module, device_placement=False)
        # accelerate would keep every wrapper it prepared (each with a backbone inside) for the
        # life of the process, across the steps of `delrec run`; the stage holds its own reference
        self._accelerator.free_memory()
        return wrapped

    def _ddp(self, module: nn.Module) -> nn.Module:
        # under an FSDP launch accelerate would shard whatever it prepares: plain DDP for teachers
        device = next(module.parameters()).device
        return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def _fully_shard(self, module: StageModule) -> nn.Module:
        from torch.distributed.fsdp import fully_shard
        from transformers.modeling_layers import GradientCheckpointingLayer

        whole = module.kept_whole()  # see the module docstring
        blocks = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
        for block in blocks:
            fully_shard(block, ignored_params=whole & set(block.parameters()) or None)
        fully_shard(module, ignored_params=whole or None)
        self._sharded_modules.add(module)
        params = list(module.parameters())
        self.sharding = {"units": len(blocks) + 1, "tensors_sharded": sum(type(p).__name__ == "DTensor" for p in params),
                         "tensors_whole": sum(type(p).__name__ != "DTensor" for p in params)}
        return module

    def _reshard(self) -> None:
        """Every FSDP unit back to its shards, on every process at the same point. FSDP leaves the
        root gathered after a forward, and `state_dict()` (which only the main process calls, to
        save) reshards it: without this the processes would disagree on whether the next forward
        must all-gather the root, and their collectives would no longer match."""
        from torch.distributed.fsdp import FSDPModule

        for root in list(self._sharded_modules):
            for m in root.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    def reduce_gradients(self, params) -> None:
        """Average the gradients of `params` over the processes under FSDP (where they are kept
        whole, outside FSDP); a no-op under DDP, which averaged them during backward, and on one
        process. Call it after the backward passes of a step, before reading the gradients."""
        if not self.sharded:
            return
        self._reshard()  # a synchronised point: backward leaves the root (nothing in it trains) gathered
        grads = [p.grad for p in params if p.grad is not None]
        for dtype in {g.dtype for g in grads}:
            same = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in same])  # one collective per dtype
            torch.distributed.all_reduce(flat)
            flat /= self.world
            for g, part in zip(same, flat.split([g.numel() for g in same])):
                g.copy_(part.view_as(g))

    def through(self, module: nn.Module, fn: Callable):
        """fn() (an evaluation) run inside the forward of `module`, a prepared StageModule, when it
        is sharded: FSDP gathers the root's weights (embeddings, head) only during its forward.
        Otherwise simply fn(). Every process must call it."""
        if not self.sharded:
            return fn()
        with torch.no_grad():
            out = module(call=fn)
        self._reshard()
        return out

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
        order of `rows` on every process. fn must return one entry per row.

        Sharded (FSDP): fn is called once per block, and a process with fewer blocks than another
        scores the first block again (discarded), so that every process runs the same number of
        forward passes, each of which all-gathers the weights with the others."""
        rows = np.asarray(rows)
        if not self.enabled:
            return fn(rows)
        starts = list(range(0, len(rows), block))
        mine = starts[self.rank :: self.world]
        if self.sharded:
            local = [np.asarray(fn(rows[s : s + block])) for s in mine]
            for _ in range(math.ceil(len(starts) / self.world) - len(mine)):
                fn(rows[:block])  # only to keep in step with the other processes' collectives
            results = self.gather(np.concatenate(local) if local else None)
        else:
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
