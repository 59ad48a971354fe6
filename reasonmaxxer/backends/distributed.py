"""Multi-process training through `accelerate` (DDP; FSDP and DeepSpeed ZeRO-3 via config files).

`train.train` asks `Dist.from_env()` for its process context. Not launched (one process):
`Dist(None)`, whose methods are the plain single-process operations, so a single-process run
is unchanged, bit for bit. Launched with more than one process (`accelerate launch`,
`torchrun`: WORLD_SIZE > 1) or with an FSDP/DeepSpeed config: an `accelerate.Accelerator`.

How a step is split (the effective batch is micro_batch * grad_accum whatever the number of
processes N): the step's micro-batches are the single-process ones; rank r takes micro-batches
r, r + N, r + 2N, ... The loss denominators (gated and anchor token counts) are those of the
whole step, computed by every rank from the step's full example list, so each rank's loss is
its share of the single-process step loss. DDP (and FSDP, DeepSpeed) average gradients over
ranks; the loss is multiplied by N first, so the update is the sum: the single-process
gradient up to float summation order (N = 2: the factor is exact). Micro-batches before a
rank's last one run under `no_sync` (one all-reduce per step). A rank with no micro-batch in
a step (a short last step, or grad_accum < N) runs one with weight 0 so that every rank does
the same collectives; under FSDP/ZeRO-3, where every forward is collective, every rank runs
the same number of passes (padded with weight-0 passes) and the shared-prefix encoding is off.

Scoring and validation (`sharded_map`): the single-process batches dealt round-robin to the
ranks, the results gathered to every rank, so no rank waits in a collective while another does
a long job alone. The process-group timeout (`set_timeout_minutes`, the CLI's
--dist-timeout-minutes) goes to init_process_group through the first `partial_state()`.

Tested: DDP on CPU (gloo, 2 processes): same adapter as one process within 1e-5 (see
tests/backends/test_distributed.py). Not exercised here: GPUs, FSDP and DeepSpeed (the code goes
through accelerate's APIs for them: `prepare`, `backward`, `no_sync`, `clip_grad_norm_`,
`get_state_dict`; checkpoints hold the gathered adapter weights but not the sharded optimizer
state, so a resumed FSDP/ZeRO-3 run restarts the Adam moments).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch

from ..errors import ReasonMaxxerError

# How long a collective waits for the other processes before the job is killed. torch's NCCL
# default is 10 min, which rank 0 alone loading or converting a real model exceeds. The first
# `partial_state()` call initialises the process group (accelerate's PartialState is a singleton:
# accelerate/state.py passes its kwargs to torch.distributed.init_process_group once), so the
# CLI sets this before anything else (`--dist-timeout-minutes`).
DEFAULT_TIMEOUT_MINUTES = 60.0
_TIMEOUT = {"minutes": DEFAULT_TIMEOUT_MINUTES}


def set_timeout_minutes(minutes: float) -> None:
    """The process-group timeout for this process (call before the first collective)."""
    if not minutes > 0:
        raise ReasonMaxxerError(f"--dist-timeout-minutes must be > 0 (got {minutes})")
    _TIMEOUT["minutes"] = float(minutes)


def _init_kwargs():
    """accelerate's InitProcessGroupKwargs with our timeout (accelerate/utils/dataclasses.py)."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(minutes=_TIMEOUT["minutes"]))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def launched() -> bool:
    """True in a process started by `accelerate launch`/`torchrun` with N > 1, or with FSDP/DeepSpeed."""
    return (
        int(os.environ.get("WORLD_SIZE", "1")) > 1 or _flag("ACCELERATE_USE_FSDP") or _flag("ACCELERATE_USE_DEEPSPEED")
    )


def partial_state():
    """accelerate's process state (sets this rank's GPU as the current device). CPU-only machines
    get gloo: accelerate would otherwise fall back to one process when no GPU is visible."""
    from accelerate import PartialState

    # the timeout as such (InitProcessGroupKwargs.to_kwargs() would drop a value equal to its default)
    return PartialState(cpu=not torch.cuda.is_available(), timeout=_init_kwargs().timeout)


@contextlib.contextmanager
def main_process_first():
    """Run the block in the main process first, then in the others (who then find the files or
    caches it wrote); a plain block when not launched."""
    if not launched():
        yield
        return
    with partial_state().main_process_first():
        yield


def is_main_process() -> bool:
    return not launched() or partial_state().is_main_process


def rank_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) when not launched."""
    if not launched():
        return 0, 1
    st = partial_state()
    return st.process_index, st.num_processes


def gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank (picklable objects); [obj] when not launched."""
    if not launched():
        return [obj]
    from accelerate.utils import gather_object

    partial_state()
    return gather_object([obj])  # accelerate/utils/operations.py: all_gather_object, lists concatenated


def sharded_map(items: Sequence, batch: int, fn: Callable[[list], list]) -> list:
    """`fn` over `items` in consecutive batches of `batch`, the batches dealt to the processes
    (rank r: batches r, r + N, ...), results gathered to every process, in item order.

    Each batch is the one a single process forms, so a batch-dependent `fn` (padding) gives
    the single-process results. Collective when launched: every process must call it with
    the same items. `fn(batch_items)` returns one result per item.
    """
    rank, world = rank_world()
    starts = range(0, len(items), batch)
    mine = {a: fn(list(items[a : a + batch])) for i, a in enumerate(starts) if i % world == rank}
    if world == 1:
        return [r for a in starts for r in mine[a]]
    done: dict = {}
    for part in gather_objects(mine):
        done.update(part)
    return [r for a in starts for r in done[a]]


class Dist:
    """The process context of a training run: single-process (acc None) or an Accelerator."""

    def __init__(self, acc=None):
        self.acc = acc
        self.world = acc.num_processes if acc is not None else 1
        self.rank = acc.process_index if acc is not None else 0
        self.is_main = self.rank == 0
        kind = str(acc.distributed_type) if acc is not None else ""
        self.sharded = "FSDP" in kind or "DEEPSPEED" in kind  # every forward is a collective
        self.deepspeed = "DEEPSPEED" in kind

    @classmethod
    def from_env(cls) -> Dist:
        if not launched():
            return cls(None)
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        partial_state()
        # buffers (rotary frequencies) are constants: no broadcast, so forwards are not collectives
        return cls(
            Accelerator(
                cpu=not torch.cuda.is_available(),
                kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False), _init_kwargs()],
            )
        )

    # -- set-up --------------------------------------------------------------------------
    def prepare(self, model, opt, micro_batch: int):
        """(model, optimizer) wrapped for the backend (DDP, FSDP, DeepSpeed); unchanged in one process."""
        if self.acc is None:
            return model, opt
        if self.deepspeed:  # DeepSpeed wants a batch size; there is no DataLoader to read it from
            ds = self.acc.state.deepspeed_plugin
            if ds.is_auto("train_micro_batch_size_per_gpu"):
                ds.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
        if self.sharded and not self.deepspeed and hasattr(model, "peft_config"):
            # FSDP: the LoRA layers become their own units (fp32, trainable) apart from the frozen bf16 base
            from peft.utils.other import fsdp_auto_wrap_policy

            self.acc.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        return self.acc.prepare(model, opt)

    def unwrap(self, model):
        return model if self.acc is None else self.acc.unwrap_model(model)

    @property
    def device(self):
        return None if self.acc is None else self.acc.device

    # -- a step --------------------------------------------------------------------------
    def passes(self, n_micro: int) -> list[tuple[int, float]]:
        """This rank's (micro-batch index, weight) pairs for a step of `n_micro` micro-batches.

        Weight 0 marks a pass that only keeps the ranks' collectives in step (its gradient is 0).
        """
        if self.acc is None:
            return [(i, 1.0) for i in range(n_micro)]
        mine = [(i, 1.0) for i in range(self.rank, n_micro, self.world)]
        need = -(-n_micro // self.world) if self.sharded else 1
        return mine + [(mine[0][0] if mine else 0, 0.0)] * (need - len(mine))

    @contextlib.contextmanager
    def micro_pass(self, model, last: bool):
        """Forward and backward of one pass: gradients are reduced only at the rank's last pass."""
        if self.acc is None:
            yield
            return
        if self.deepspeed:  # DeepSpeed steps its engine inside backward, at the boundary only
            self.acc.gradient_state._set_sync_gradients(last)
        with contextlib.nullcontext() if last else self.acc.no_sync(model):
            yield

    def backward(self, loss: torch.Tensor, weight: float) -> None:
        if self.acc is None:
            loss.backward()
        else:  # the backends average over ranks; x N makes it the sum, i.e. the single-process gradient
            self.acc.backward(loss * (weight * self.world))

    def clip_grad_norm(self, model, params, max_norm: float) -> torch.Tensor:
        if self.acc is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        gn = self.acc.clip_grad_norm_(model.parameters() if self.sharded else params, max_norm)
        if gn is None and self.deepspeed:  # DeepSpeed clipped (its gradient_clipping) and stepped already
            return torch.zeros((), dtype=torch.float32)
        return torch.as_tensor(float("nan") if gn is None else gn, dtype=torch.float32)

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64)."""
        if self.acc is None:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return self.acc.reduce(t, reduction="sum").tolist()

    def barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()

    # -- state ---------------------------------------------------------------------------
    def trainable_state(self, model, full: bool) -> dict:
        """The trainable weights (LoRA: the PEFT adapter state), full tensors, cloned.

        Collective under FSDP/DeepSpeed (the shards are gathered to the main process; the
        others get an empty dict): every rank must call it.
        """
        inner = self.unwrap(model)
        if self.sharded:
            sd = self.acc.get_state_dict(model)
            if not self.is_main:
                return {}
        else:
            sd = None
        if full:
            sd = inner.state_dict() if sd is None else sd
            return {k: v.detach().clone() for k, v in sd.items()}
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(inner, state_dict=sd).items()}
