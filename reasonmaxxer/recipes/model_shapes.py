"""model_shapes: a model's size without loading it, for `recipes.plan` (``--dry-run``).

The shape is a ``config.json`` dict: from a local checkpoint directory, the converted embedded
model, the Hugging Face cache (never downloaded), else `KNOWN_SHAPES` (the paper's models).
`n_params` / `lora_params` / `kv_cache_bytes` count from it (Llama/Qwen-style decoders).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ReasonMaxxerError

# config.json fields of models the paper uses (from their Hub config.json files), for when no
# local copy exists. Parameter counts follow from them (`n_params`).
KNOWN_SHAPES: dict[str, dict] = {
    "Qwen/Qwen2.5-Math-1.5B": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen2.5-1.5B": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen2.5-Math-7B": {
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "Qwen/Qwen3-0.6B": {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": True,
    },
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
}
KNOWN_SHAPES["smollm2-135m"] = KNOWN_SHAPES["HuggingFaceTB/SmolLM2-135M-Instruct"]


# -- the model ----------------------------------------------------------------------------
def dims(c: dict) -> tuple[int, int, int, int, int, int, int]:
    """(vocab, hidden, intermediate, layers, heads, kv_heads, head_dim) of a config dict."""
    h, nh = int(c["hidden_size"]), int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or nh)
    hd = int(c.get("head_dim") or h // nh)
    return int(c["vocab_size"]), h, int(c["intermediate_size"]), int(c["num_hidden_layers"]), nh, kv, hd


def n_params(c: dict) -> int:
    """Parameters of a Llama/Qwen-style decoder from its config.json fields: embeddings (and an
    untied head), per layer q/k/v/o (+ q/k/v biases for qwen2 or ``attention_bias``; q/k
    RMSNorms for qwen3), a gated MLP (3 * hidden * intermediate) and two RMSNorms, a final norm."""
    v, h, i, n_layers, nh, kv, hd = dims(c)
    bias = c.get("attention_bias", c.get("model_type") == "qwen2")
    attn = h * nh * hd + 2 * h * kv * hd + nh * hd * h
    attn += (nh * hd + 2 * kv * hd) if bias else 0
    attn += 2 * hd if c.get("model_type") == "qwen3" else 0
    layer = attn + 3 * h * i + 2 * h
    head = 0 if c.get("tie_word_embeddings", True) else v * h
    return n_layers * layer + v * h + head + h


def lora_params(c: dict, rank: int, modules: tuple[str, ...]) -> int:
    """Adapter parameters: rank * (in + out) per targeted projection per layer."""
    v, h, i, n_layers, nh, kv, hd = dims(c)
    shapes = {
        "q_proj": (h, nh * hd),
        "k_proj": (h, kv * hd),
        "v_proj": (h, kv * hd),
        "o_proj": (nh * hd, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    return n_layers * sum(rank * sum(shapes[m]) for m in modules if m in shapes)


def _local_model_dir(spec: str) -> Path | None:
    """A directory on disk holding `spec`'s config.json (and tokenizer), or None. Never downloads."""
    from ..models import ALIASES, adapter_base, list_models, resolve_spec

    if spec.lower() in ALIASES:
        row = next((r for r in list_models() if r["alias"] == spec.lower()), {})
        return Path(row["cache"]) if row.get("converted") else None
    try:
        rs = resolve_spec(spec)
    except ReasonMaxxerError:
        return None
    if rs.kind == "hf_dir":
        return Path(rs.path)
    if rs.kind == "adapter":
        return _local_model_dir(adapter_base(rs.path))
    if rs.kind == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(spec, "config.json")
        except ImportError:
            return None
        return Path(hit).parent if isinstance(hit, str) else None
    return None


def model_shape(spec: str) -> tuple[dict | None, str]:
    """(config dict, where it came from): a local config.json, else `KNOWN_SHAPES`, else None."""
    d = _local_model_dir(spec)
    if d is not None and (d / "config.json").is_file():
        return json.loads((d / "config.json").read_text()), f"{d / 'config.json'}"
    if spec in KNOWN_SHAPES:
        return KNOWN_SHAPES[spec], "known-shapes table (reasonmaxxer/recipes/model_shapes.py)"
    from ..models import ALIASES

    hub = ALIASES.get(spec.lower(), {}).get("hub_id")
    if hub in KNOWN_SHAPES:
        return KNOWN_SHAPES[hub], f"known-shapes table ({hub})"
    return None, "unknown (no local config.json, not in the known-shapes table)"


def local_tokenizer(spec: str):
    """(tokenizer, where) for a tokenizer already on disk; (None, "") when there is none."""
    d = _local_model_dir(spec)
    if d is None:
        return None, ""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(d), local_files_only=True), f"tokenizer in {d}"
    except Exception:  # a missing/odd tokenizer: the plan falls back to an estimate
        return None, ""


GB = 1e9


def kv_cache_bytes(c: dict, rows: int, seq: int) -> float:
    """KV cache of `rows` sequences of `seq` tokens: rows * seq * 2 (K, V) * layers * kv_heads *
    head_dim * 2 bytes (bf16)."""
    _, _, _, n_layers, _, kv, hd = dims(c)
    return rows * seq * 2 * n_layers * kv * hd * 2.0
