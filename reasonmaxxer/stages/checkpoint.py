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


def export_model(model, tokenizer, out: Path, base_spec: str, full: bool, *, trained_state: dict | None = None) -> dict:
    """Write adapter/ (PEFT) and merged/ (plain HF checkpoint), each atomically.

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
        import copy

        merged = copy.deepcopy(model).merge_and_unload()
    else:
        merged = model

    def save_merged(d):
        merged.save_pretrained(d, **({} if trained_state is None else {"state_dict": trained_state}))
        tokenizer.save_pretrained(d)

    write("merged", save_merged)
    return {"adapter": paths.get("adapter"), "merged": paths["merged"]}
