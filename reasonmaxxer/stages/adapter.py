"""What a model becomes for training and back: `attach_adapter` wraps it in a LoRA adapter
(or readies a full fine-tune, with a frozen copy for the anchor) with fp32 weights wherever
they are trained (`Trainable` records the precision set-up); `detach_adapter` hands the
model back; `set_checkpointing` toggles activation checkpointing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import ReasonMaxxerError
from .train_data import TrainConfig

HALF = (torch.bfloat16, torch.float16)


class Trainable(NamedTuple):
    """What `attach_adapter` makes of a model for training."""

    model: object  # the PeftModel (LoRA) or the model itself (full fine-tune), in train mode
    frozen: object | None  # full fine-tune: a frozen copy of the base, for the anchor; LoRA: None
    autocast: torch.dtype | None  # full fine-tune of a bf16/fp16 model: forward under autocast to it
    export_dtype: torch.dtype  # the dtype the model came in: the merged checkpoint is saved in it


def attach_adapter(model, cfg: TrainConfig) -> Trainable:
    """LoRA (default) or full fine-tune, with fp32 weights wherever they are trained.

    LoRA: the adapter's weights are fp32 whatever the base's dtype (PEFT's
    ``autocast_adapter_dtype``, peft/tuners/tuners_utils.py ``cast_adapter_dtype``, checked
    here); the base stays in its dtype, frozen. Full fine-tune of a bf16/fp16 model: the
    model is cast to fp32 (master weights, AdamW state in fp32) and the forward runs under
    autocast to the original dtype. A bf16 weight under AdamW at lr 1e-5 would otherwise
    mostly not move: updates below half its 2^-8 relative spacing round away. The frozen
    copy for the anchor keeps the original dtype. `detach_adapter` undoes the LoRA wrapping.
    """
    torch.manual_seed(cfg.seed)
    dtype = next(model.parameters()).dtype
    if cfg.gradient_checkpointing:
        # non-reentrant: gradients reach LoRA weights inside checkpointed layers even though the
        # frozen embeddings' outputs need no grad (transformers' enable_input_require_grads is
        # the reentrant variant's workaround; added too, it is harmless)
        set_checkpointing(model, True)
        if not cfg.full_finetune:
            model.enable_input_require_grads()
    if cfg.full_finetune:
        import copy

        frozen = copy.deepcopy(model).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        autocast = dtype if dtype in HALF else None
        if autocast is not None:
            model.float()
        model.train()
        return Trainable(model, frozen, autocast, dtype)
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise ReasonMaxxerError(
            f"train: LoRA target modules {missing} not found in the model (it has e.g. "
            f"{sorted(n for n in names if n.endswith('proj'))[:8]})"
        )
    lc = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    pm = get_peft_model(model, lc, autocast_adapter_dtype=True)
    for p in pm.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    pm.train()
    return Trainable(pm, None, None, dtype)


def detach_adapter(trainable: Trainable) -> None:
    """Give the caller its model back: a LoRA model loses its adapter layers (PEFT's ``unload``,
    no merge: the base weights were never changed) and returns to eval mode. A full
    fine-tune's model keeps its trained (fp32) weights: the caller passed it to be trained."""
    if trainable.frozen is None and hasattr(trainable.model, "unload"):
        model = trainable.model.unload()
    else:
        model = trainable.model
    if set_checkpointing(model, False) and hasattr(model, "_require_grads_hook"):  # enable_input_require_grads
        model.disable_input_require_grads()
    model.eval()


def set_checkpointing(model, on: bool) -> bool:
    """Turn transformers' activation checkpointing on (non-reentrant) or off. Returns whether it
    was on before. transformers >= 5.2x names it activation_checkpointing_*, earlier 5.x
    gradient_checkpointing_* (kept as a deprecated alias)."""
    new = hasattr(model, "activation_checkpointing_enable")
    was = bool(getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False))
    if on and new:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif was:
        model.activation_checkpointing_disable() if new else model.gradient_checkpointing_disable()
    return was
