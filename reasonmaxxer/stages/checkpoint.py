"""stages.checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..io import atomic_dir, atomic_write_json


def load_trainable_state(model, state: dict, full: bool) -> None:
    if full:
        model.load_state_dict(state)
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)


def save_checkpoint(ckdir: Path, step: int, state: dict, optim: dict | None, extra: dict) -> Path:
    def fill(tmp: Path):
        torch.save({"model": state, "optim": optim, "step": step, "extra": extra}, tmp / "state.pt")
        with open(tmp / "state.pt", "rb") as f:
            os.fsync(f.fileno())

    final = atomic_dir(ckdir / f"step-{step:06d}", fill)
    atomic_write_json(ckdir / "latest.json", {"step": step, "path": final.name})
    return final


def latest_checkpoint(ckdir: Path) -> Path | None:
    p = ckdir / "latest.json"
    if not p.is_file():
        return None
    d = ckdir / json.loads(p.read_text())["path"]
    return d if (d / "state.pt").is_file() else None


def save_adapter(model, tokenizer, d: Path, base_spec: str | None, trained_state: dict | None = None) -> None:
    """Save a PEFT model's adapter + tokenizer into dir `d`, recording `base_spec` (our alias,
    a path or a Hub id) as base_model_name_or_path so `models.load_model(d)` finds the base.
    trained_state: the gathered adapter state (PEFT names) of a model sharded by FSDP/ZeRO-3."""
    d = Path(d)
    if trained_state is None:
        model.save_pretrained(d)
    else:
        from safetensors.torch import save_file

        model.peft_config["default"].save_pretrained(d)
        save_file({k: v.contiguous() for k, v in trained_state.items()}, str(d / "adapter_model.safetensors"))
    cfgp = d / "adapter_config.json"
    c = json.loads(cfgp.read_text())
    c["base_model_name_or_path"] = base_spec or c.get("base_model_name_or_path")
    cfgp.write_text(json.dumps(c, indent=2))
    tokenizer.save_pretrained(d)


def merged_state_dict(peft_model, dtype=None) -> dict:
    """The base model's state dict with each LoRA delta merged in: W + (B @ A) * scaling,
    added in fp32 and rounded once to `dtype` (default: the base weight's dtype). Neither the
    model nor its weights are copied: only the merged matrices are new tensors (PEFT's own
    ``merge_and_unload`` changes the model in place, hence a deep copy of the whole model).
    Keys are the plain model's (no ``base_layer``/``lora_`` names)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    merged = {}
    for name, mod in base.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        if getattr(mod, "lora_variant", None):
            raise ValueError(f"{name}: DoRA and other LoRA variants are not merged here; use merge_and_unload()")
        w = mod.get_base_layer().weight.detach()
        delta = sum(mod.get_delta_weight(a).float() for a in mod.active_adapters if a in mod.lora_A)
        merged[f"{name}.weight"] = (w.float() + delta).to(dtype or w.dtype)
    out = {}
    for key, t in base.state_dict().items():
        if any(f".{n}." in key for n in LoraLayer.adapter_layer_names):
            continue
        key = key.replace(".base_layer.", ".")
        if key not in merged and dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = merged.get(key, t)
    return out


def export_model(
    model, tokenizer, out: Path, base_spec: str, full: bool, *, trained_state: dict | None = None, dtype=None
) -> dict:
    """Write adapter/ (PEFT) and merged/ (plain HF checkpoint), each atomically.

    merged/ holds the base + adapter merged in fp32 and rounded once to `dtype` (default: the
    base weights' dtype; training passes the dtype the model was loaded in, so a full
    fine-tune's fp32 master weights are saved as the bf16 checkpoint a user deploys).
    trained_state: the trained weights (the adapter state with PEFT names, or the full state dict),
    gathered, for a model that holds FSDP/ZeRO-3 shards. With LoRA, only adapter/ is written then
    (merge later: `models.load_model(adapter dir)` and `merge_and_unload()`).
    """
    out = Path(out)
    paths = {}

    def write(name, fill):
        paths[name] = str(atomic_dir(out / name, fill))

    model.eval()
    if not full:
        write("adapter", lambda d: save_adapter(model, tokenizer, d, base_spec, trained_state))
        if trained_state is not None:
            return {"adapter": paths["adapter"], "merged": None}
        plain, state = model.get_base_model(), merged_state_dict(model, dtype)
    else:
        plain, state = model, trained_state
        if dtype is not None:
            state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in (state or model.state_dict()).items()}

    def save_merged(d):
        plain.save_pretrained(d, **({} if state is None else {"state_dict": state}))
        if dtype is not None:  # config.json names the dtype of the weights actually saved
            cfgp = Path(d) / "config.json"
            c = json.loads(cfgp.read_text())
            c["dtype"] = str(dtype).replace("torch.", "")
            cfgp.write_text(json.dumps(c, indent=2) + "\n")
        tokenizer.save_pretrained(d)

    write("merged", save_merged)
    return {"adapter": paths.get("adapter"), "merged": paths["merged"]}
