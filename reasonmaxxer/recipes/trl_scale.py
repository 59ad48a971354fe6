"""What a TRL baseline needs to run at scale (see `recipes.baselines`): the batch split over
gradient accumulation and processes, vLLM generation, counters and the stop agreed across
processes, fp32 master weights. Read against trl 1.16 / transformers 5.24 / peft 0.21."""

from __future__ import annotations

import importlib.util
import os

from ..errors import ReasonMaxxerError


def world_size() -> int:
    """Processes of this run: ``WORLD_SIZE`` as set by ``accelerate launch`` / torchrun, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def per_device_batch(cfg, processes: int) -> int:
    """Completions per device per micro-step: one optimizer step trains on ``prompts_per_step x
    num_generations`` completions (whatever the hardware), split over ``grad_accum`` micro-steps on
    each of `processes` processes. TRL then generates them all at once: its GRPOConfig/RLOOConfig set
    ``steps_per_generation = gradient_accumulation_steps`` and ``generation_batch_size =
    per_device_train_batch_size x processes x steps_per_generation``, which must be divisible by
    ``num_generations`` (trl/trainer/grpo_config.py, ``__post_init__``); here it is
    ``prompts_per_step x num_generations``, so that always holds."""
    total, split = cfg.prompts_per_step * cfg.num_generations, cfg.grad_accum * processes
    if total % split:
        raise ReasonMaxxerError(
            f"baseline grad_accum: prompts_per_step x num_generations ({total}) must be divisible by "
            f"grad_accum x processes ({cfg.grad_accum} x {processes}); change grad_accum or prompts_per_step"
        )
    return total // split


def require_vllm(cfg) -> None:
    """One clear line instead of TRL's ImportError deep inside the trainer (raised by
    trl/generation/vllm_generation.py ``_init_vllm`` after the model is loaded)."""
    if cfg.vllm != "off" and importlib.util.find_spec("vllm") is None:
        raise ReasonMaxxerError(
            f"baseline vllm = {cfg.vllm!r}: vllm is not installed; pip install 'trl[vllm]' or set vllm = \"off\""
        )


def vllm_args(cfg) -> dict:
    """GRPOConfig/RLOOConfig fields (trl 1.16, trl/trainer/grpo_config.py): ``use_vllm``; ``vllm_mode``
    "colocate" (vLLM in each training process, sharing its GPU: ``vllm_gpu_memory_utilization``,
    default 0.3) or "server" (a separate ``trl vllm-serve``; ``vllm_server_base_url``, the memory
    share is then the server's own flag)."""
    if cfg.vllm == "off":
        return {}
    kw = {"use_vllm": True, "vllm_mode": cfg.vllm}
    if cfg.vllm == "colocate":
        kw["vllm_gpu_memory_utilization"] = cfg.vllm_gpu_memory_utilization
    elif cfg.vllm_server_url:
        kw["vllm_server_base_url"] = cfg.vllm_server_url
    return kw


COUNTED = ("generated_tokens", "prompt_tokens", "completions", "correct")  # summed over processes


def agree_across_processes(delta: dict, stop: bool) -> tuple[dict, bool]:
    """(`delta` summed over all processes, the main process's `stop`); unchanged with one process.

    Under ``accelerate launch`` each process grades only its own completions (TRL calls the
    reward on each process's share), so the counters are summed; and every process must stop
    at the same step (``TrainerControl.should_training_stop`` is per process, and a process
    that stops early would leave the others waiting in a collective), so the main's clock
    decides. One ``torch.distributed.all_gather_object`` per step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return delta, stop
    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, (delta, stop))
    return {k: sum(d[k] for d, _ in got) for k in delta}, bool(got[0][1])


def fp32_trainable(model) -> int:
    """Cast the trainable parameters of `model` that are bf16/fp16 to fp32, in place; returns
    how many were cast. Master weights must be fp32: a bf16 weight cannot take an update smaller
    than ~1/256 of itself. Compute stays bf16 on CUDA through autocast (``bf16=True``, i.e.
    accelerate's mixed precision). PEFT already upcasts LoRA adapters (``autocast_adapter_dtype``,
    peft/tuners/tuners_utils.py ``_cast_adapter_dtype``) except under DeepSpeed ZeRO-3, where
    TRL keeps them bf16 (trl/trainer/grpo_trainer.py): `run_baseline` does not call this under
    DeepSpeed, whose optimizer keeps its own fp32 master copy."""
    import torch

    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            n += 1
    return n
