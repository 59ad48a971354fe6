"""plan: what a `run` config would do, without running it (``reasonmaxxer run CONFIG --dry-run``).

`plan(cfg, ...)` counts, stage by stage, the problems, rollouts and tokens (upper bounds: every
completion at ``max_new_tokens``, capped at the model's context), the FLOPs, the peak GPU
memory and the GPU-hours and dollars on a named GPU; `render_plan` prints it. Pure functions:
the only inputs are the config, the model's shape (`model_shape`: a local ``config.json`` or
the `KNOWN_SHAPES` table), problem counts (`count_problems`: local data only, never the Hub)
and an optional token counter (`local_token_counter`: a tokenizer already on disk).

Formulas (also printed with the plan):
- FLOPs: 2*N per token through a forward pass, 6*N per token trained (forward + backward),
  N = all parameters (a LoRA backward still runs through the frozen weights); training adds
  2*N per token for the anchor's base forward (lam > 0). Same as `recipes.baselines.flops`.
- sampling memory: weights (2 bytes/param, bf16) + KV cache = rows * seq * 2 * layers *
  kv_heads * head_dim * 2 bytes. vLLM batches what fits in ``gpu_memory_utilization``.
- training memory: frozen weights 2 bytes/param + trainable params * 16 bytes (fp32 weight,
  grad, Adam m and v; LoRA: the adapter only) + activations micro_batch * seq * hidden *
  layers * 34 bytes (Korthikanti et al. 2022, bf16, flash/SDPA attention; gradient
  checkpointing: 2 bytes + one layer's 34) + 3 fp32 logit buffers micro_batch * seq * vocab * 4.
- GPU-hours: FLOPs / (peak bf16 FLOP/s * utilisation) / 3600, utilisation assumed (stated).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from ..errors import ReasonMaxxerError

# peak dense bf16 FLOP/s (vendor data sheets: A100 SXM 312 TFLOP/s, H100 SXM 989 TFLOP/s),
# memory, and an assumed rental price ($/GPU-hour)
GPUS: dict[str, dict] = {
    "A100": {"peak_flops": 312e12, "memory_gb": 80.0, "dollars_per_hour": 2.0},
    "H100": {"peak_flops": 989e12, "memory_gb": 80.0, "dollars_per_hour": 3.0},
}
# assumed model FLOP utilisation per kind of work
UTILISATION = {"sample": 0.30, "score": 0.40, "train": 0.40}
VLLM_MEMORY_FRACTION = 0.9  # vLLM's default gpu_memory_utilization (ours: free memory less 5%, at most 0.9)
ASSUMED_QUESTION_TOKENS = 100  # a question's length when its problems cannot be loaded offline
CHARS_PER_TOKEN = 4  # when no tokenizer is on disk
ACT_BYTES = 34  # activation bytes per token, per hidden unit, per layer (bf16)

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
# row counts of the benchmark splits in ../shared/data (tests/data/test_benchmarks.py COUNTS)
PUBLISHED_SIZES = {
    ("gsm8k", "train"): 7473,
    ("gsm8k", "test"): 1319,
    ("math500", "test"): 500,
    ("aime24", "test"): 30,
    ("aime25", "test"): 30,
    ("amc23", "test"): 40,
    ("olympiadbench", "test"): 675,
    ("minerva", "test"): 272,
}


# -- the model ----------------------------------------------------------------------------
def _dims(c: dict) -> tuple[int, int, int, int, int, int, int]:
    """(vocab, hidden, intermediate, layers, heads, kv_heads, head_dim) of a config dict."""
    h, nh = int(c["hidden_size"]), int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or nh)
    hd = int(c.get("head_dim") or h // nh)
    return int(c["vocab_size"]), h, int(c["intermediate_size"]), int(c["num_hidden_layers"]), nh, kv, hd


def n_params(c: dict) -> int:
    """Parameters of a Llama/Qwen-style decoder from its config.json fields: embeddings (and an
    untied head), per layer q/k/v/o (+ q/k/v biases for qwen2 or ``attention_bias``; q/k
    RMSNorms for qwen3), a gated MLP (3 * hidden * intermediate) and two RMSNorms, a final norm."""
    v, h, i, n_layers, nh, kv, hd = _dims(c)
    bias = c.get("attention_bias", c.get("model_type") == "qwen2")
    attn = h * nh * hd + 2 * h * kv * hd + nh * hd * h
    attn += (nh * hd + 2 * kv * hd) if bias else 0
    attn += 2 * hd if c.get("model_type") == "qwen3" else 0
    layer = attn + 3 * h * i + 2 * h
    head = 0 if c.get("tie_word_embeddings", True) else v * h
    return n_layers * layer + v * h + head + h


def lora_params(c: dict, rank: int, modules: tuple[str, ...]) -> int:
    """Adapter parameters: rank * (in + out) per targeted projection per layer."""
    v, h, i, n_layers, nh, kv, hd = _dims(c)
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
        return KNOWN_SHAPES[spec], "known-shapes table (reasonmaxxer/recipes/plan.py)"
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


# -- problems and prompts -------------------------------------------------------------------
def _data_roots(data_dir: str | None) -> list[Path]:
    from ..data.benchmarks import default_data_dir

    roots = [Path(data_dir).expanduser()] if data_dir else []
    env = default_data_dir()
    roots += [env] if env is not None else []
    shared = Path.cwd().parent / "shared" / "data"
    return roots + ([shared] if shared.is_dir() else [])


def count_problems(spec: str, data_dir: str | None = None) -> tuple[list | None, int | None, str]:
    """(problems or None, count or None, how it was counted) for a problem spec, offline only:
    arith is generated, benchmarks and files are read from local data (`data_dir`,
    $REASONMAXXER_DATA_DIR or ../shared/data); a Hub-only dataset is counted from its spec's
    ``per_level``/``n`` pick, else the split's published size, else "unknown"."""
    from ..data.benchmarks import load_problems, parse_pick

    if not spec:
        return [], 0, "none"
    head, _, rest = spec.strip().partition(":")
    local = head.lower() == "arith" or Path(spec).expanduser().is_file()
    for root in [None] if local else _data_roots(data_dir):
        try:
            ps = load_problems(spec, data_dir=root)
            return ps, len(ps), "generated" if head.lower() == "arith" else f"loaded from {root or spec}"
        except ReasonMaxxerError:
            continue
    split, _, opts = rest.partition(":")
    try:
        pick = parse_pick(opts, spec)
    except ReasonMaxxerError:
        pick = None
    if pick is not None and pick.count() is not None:
        return None, pick.count(), "from the spec's pick (data not on disk)"
    size = PUBLISHED_SIZES.get((head.strip().lower(), split.strip() or "test"))
    if size is not None and pick is None:
        return None, size, "published size (data not on disk)"
    return None, None, "unknown (Hub-only data, not on disk)"


def prompt_lengths(problems, template: str, tokenizer=None, count_tokens=None) -> tuple[float, int, str]:
    """(mean, max, how) prompt tokens of `problems` rendered with `template`: measured with
    the tokenizer (or `count_tokens`), else characters / 4; with no problems, the template
    plus `ASSUMED_QUESTION_TOKENS` (all estimates say so)."""
    from ..data.prompts import get_template, render_prompt

    tmpl = get_template(template)
    if count_tokens is None and tokenizer is not None:

        def count_tokens(text):
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    if count_tokens is not None:
        how = "measured on the rendered prompts"
    else:
        how = f"estimate: rendered prompt characters / {CHARS_PER_TOKEN}"

        def count_tokens(text):
            return math.ceil(len(text) / CHARS_PER_TOKEN)

    if not problems:
        n = count_tokens(render_prompt(tmpl, "", tokenizer)) + ASSUMED_QUESTION_TOKENS
        return float(n), n, f"estimate: template + {ASSUMED_QUESTION_TOKENS} tokens per question (problems not loaded)"
    lens = [count_tokens(render_prompt(tmpl, p.question, tokenizer)) for p in problems]
    return sum(lens) / len(lens), max(lens), how


# -- memory ----------------------------------------------------------------------------------
GB = 1e9


def kv_cache_bytes(c: dict, rows: int, seq: int) -> float:
    """KV cache of `rows` sequences of `seq` tokens: rows * seq * 2 (K, V) * layers * kv_heads *
    head_dim * 2 bytes (bf16)."""
    _, _, _, n_layers, _, kv, hd = _dims(c)
    return rows * seq * 2 * n_layers * kv * hd * 2.0


def train_memory_bytes(c: dict, tcfg, seq: int) -> tuple[float, str]:
    """Peak training memory and its formula (see the module docstring)."""
    v, h, _, n_layers, _, _, _ = _dims(c)
    n = n_params(c)
    trainable = n if tcfg.full_finetune else lora_params(c, tcfg.lora_rank, tcfg.target_modules)
    weights = 2.0 * n if not tcfg.full_finetune else 0.0
    states = 16.0 * trainable
    per_layer = 2 if tcfg.gradient_checkpointing else ACT_BYTES
    acts = tcfg.micro_batch * seq * h * (n_layers * per_layer + (ACT_BYTES if tcfg.gradient_checkpointing else 0))
    logits = 3 * tcfg.micro_batch * seq * v * 4.0
    formula = (
        f"weights 2 B x {n:,} + states 16 B x {trainable:,} trainable + activations "
        f"{tcfg.micro_batch} x {seq} tok x {h} x {n_layers} layers x {per_layer} B + logits 3 x {tcfg.micro_batch} "
        f"x {seq} x {v} x 4 B"
    )
    return weights + states + acts + logits, formula


# -- the stages --------------------------------------------------------------------------------
def _sample_stage(cfg, shape, n, tr, ctx, g, warnings) -> dict:
    sc = cfg.sampling
    gen = _gen_cap(sc.max_new_tokens, tr["mean_prompt"], ctx)
    if ctx is not None and gen < sc.max_new_tokens:
        warnings.append(
            f"NOTE: [sampling] max_new_tokens: {sc.max_new_tokens} + ~{math.ceil(tr['mean_prompt'])} prompt tokens exceed "
            f"the model's context of {ctx} (max_position_embeddings); completions stop at ~{gen} tokens"
        )
    rows = _mul(tr["count"], sc.n)
    prompt, generated = _mul(rows, tr["mean_prompt"]), _mul(rows, gen)
    tokens = {"prompt": prompt, "generated": generated}
    flops = _mul(2, n, None if prompt is None else prompt + generated)
    seq = math.ceil(tr["max_prompt"]) + gen
    if cfg.backend == "vllm":
        mem = 2.0 * n + kv_cache_bytes(shape, 1, seq) if n else None
        how = (
            f"vLLM: weights + one {seq}-token sequence's KV cache must fit in gpu_memory_utilization; "
            f"it batches what fits (a full batch of {sc.batch_size}: "
            f"{(2.0 * n + kv_cache_bytes(shape, sc.batch_size, seq)) / GB if n else float('nan'):.1f} GB)"
        )
    else:
        mem = 2.0 * n + kv_cache_bytes(shape, sc.batch_size, seq) if n else None
        how = f"weights 2 B x params + KV cache {sc.batch_size} rows x {seq} tok"
    return _stage("sample", rows, tokens, flops, mem, how, UTILISATION["sample"], g)


def _train_stages(cfg, shape, n, tr, va, ctx, g, warnings) -> list[dict]:
    sc, sel, tc, ec = cfg.sampling, cfg.selection, cfg.train, cfg.eval
    gen = _gen_cap(sc.max_new_tokens, tr["mean_prompt"], ctx)
    seq_mean, seq_max = tr["mean_prompt"] + gen, math.ceil(tr["max_prompt"]) + gen
    kept = None if tr["count"] is None else min(tr["count"], sel.max_problems or tr["count"])
    rows = None if kept is None else math.floor(kept * sc.n * sel.keep_shortest + 0.5)  # round half up
    rescored = cfg.backend == "vllm" or cfg.rescore
    scored = _mul(rows, seq_mean) if rescored else 0
    smem = (2.0 * n + 2 * seq_max * _dims(shape)[0] * 4.0) if n else None
    out = [
        _stage(
            "select + score",
            rows,
            {"scored": scored},
            _mul(2, n, scored),
            smem,
            "weights + 2 fp32 logit buffers, one sequence per forward"
            + ("" if rescored else " (entropies from the HF sampler: nothing re-scored)"),
            UTILISATION["score"],
            g,
        )
    ]
    per_step = tc.micro_batch * tc.grad_accum
    seqs = None if rows is None else max(1, math.ceil(tc.epochs * rows))
    steps = None if seqs is None else math.ceil(seqs / per_step)
    if steps is not None and tc.max_steps:
        steps = min(steps, tc.max_steps)
    seqs = None if steps is None else min(seqs, steps * per_step)
    trained = _mul(seqs, seq_mean)
    anchor = trained if tc.lam and tc.variant not in ("no_anchor", "rft") else 0
    flops = None if trained is None or n is None else 6.0 * n * trained + 2.0 * n * anchor
    mem, formula = train_memory_bytes(shape, tc, seq_max) if n else (None, "")
    st = _stage(
        "train", seqs, {"trained": trained, "anchor forward": anchor}, flops, mem, formula, UTILISATION["train"], g
    )
    st["steps"] = steps
    out.append(st)
    if va["count"]:
        n_val = None if steps is None else steps // tc.checkpoint_every + (1 if steps % tc.checkpoint_every else 0)
        vgen = _gen_cap(ec.max_new_tokens, va["mean_prompt"], ctx)
        vrows = _mul(n_val, va["count"])
        vtok = _mul(vrows, va["mean_prompt"] + vgen)
        vmem = 2.0 * n + kv_cache_bytes(shape, ec.batch_size, math.ceil(va["max_prompt"]) + vgen) if n else None
        vs = _stage(
            "validate (greedy, per checkpoint)",
            vrows,
            {"prompt+generated": vtok},
            _mul(2, n, vtok),
            vmem,
            "weights + KV cache",
            UTILISATION["sample"],
            g,
        )
        vs["checkpoints"] = n_val
        out.append(vs)
    return out


_KNOBS = {
    "sample": 'lower [sampling] batch_size or max_new_tokens (or backend = "vllm")',
    "select + score": "lower [sampling] max_new_tokens",
    "train": "lower [train] micro_batch (raise grad_accum), set [train] gradient_checkpointing = true, "
    "or lower [sampling] max_new_tokens",
    "validate (greedy, per checkpoint)": "lower [eval] batch_size or max_new_tokens",
    "eval base": "lower [eval] batch_size or max_new_tokens",
    "eval trained": "lower [eval] batch_size or max_new_tokens",
}


def _fit(stages, g, warnings) -> None:
    """A one-line warning per stage whose peak memory exceeds the GPU's, naming the knob."""
    cap = g["memory_gb"] * GB
    for s in stages:
        m = s["memory_bytes"]
        if m is not None and m > cap:
            warnings.append(
                f"DOES NOT FIT: {s['name']}: ~{m / GB:.1f} GB > {g['memory_gb']:g} GB on {g['name']}; {_KNOBS[s['name']]}"
            )


# -- the plan ----------------------------------------------------------------------------------
def _gen_cap(max_new: int, mean_prompt: float, ctx: int | None) -> int:
    """Tokens a completion can reach: max_new_tokens, cut at the model's context."""
    return max_new if ctx is None else max(0, min(max_new, ctx - math.ceil(mean_prompt)))


def _stage(name, rows, tokens, flops, mem, mem_formula, util, g) -> dict:
    hours = flops / (g["peak_flops"] * util) / 3600 if flops is not None else None
    return {
        "name": name,
        "rows": rows,
        "tokens": tokens,
        "flops": flops,
        "memory_bytes": mem,
        "memory_formula": mem_formula,
        "utilisation": util,
        "gpu_hours": hours,
        "dollars": hours * g["dollars_per_hour"] if hours is not None else None,
    }


def _mul(*xs):
    """Product, None when any factor is unknown."""
    out = 1
    for x in xs:
        if x is None:
            return None
        out *= x
    return out


def _sets(cfg, tokenizer, count_tokens, problems) -> dict:
    """{train|validation|test: {count, count_source, mean_prompt, max_prompt, prompt_source}}."""
    out = {}
    for key, spec in (
        ("train", cfg.train_problems),
        ("validation", cfg.validation_problems),
        ("test", cfg.test_problems),
    ):
        ps, n, how = problems[key] if problems and key in problems else count_problems(spec, cfg.data_dir)
        mean, mx, phow = prompt_lengths(ps, cfg.template, tokenizer, count_tokens) if n else (0.0, 0, "-")
        out[key] = {"spec": spec, "count": n, "count_source": how, "mean_prompt": mean, "max_prompt": mx}
        out[key]["prompt_source"] = phow
    return out


def plan(
    cfg,
    *,
    gpu: str = "A100",
    gpu_memory_gb: float | None = None,
    dollars_per_hour: float | None = None,
    shape: dict | None = None,
    shape_source: str = "given",
    tokenizer=None,
    count_tokens: Callable[[str], int] | None = None,
    problems: dict | None = None,
) -> dict:
    """The dry-run plan of a `RunConfig` as a dict (see the module docstring for every formula).
    `shape` (a config.json dict) defaults to `model_shape(cfg.model)`; `problems` ({"train":
    (problems | None, count | None, how), ...}) to `count_problems` of each spec."""
    if gpu not in GPUS:
        raise ReasonMaxxerError(f"--gpu {gpu}: unknown GPU; valid: {', '.join(GPUS)}")
    g = dict(GPUS[gpu], name=gpu)
    g["memory_gb"] = gpu_memory_gb if gpu_memory_gb is not None else g["memory_gb"]
    g["dollars_per_hour"] = dollars_per_hour if dollars_per_hour is not None else g["dollars_per_hour"]
    if shape is None:
        shape, shape_source = model_shape(cfg.model)
    n = n_params(shape) if shape else None
    ctx = shape.get("max_position_embeddings") if shape else None
    sets = _sets(cfg, tokenizer, count_tokens, problems)
    ec = cfg.eval
    tr, va, te = sets["train"], sets["validation"], sets["test"]
    warnings: list[str] = []
    stages = [_sample_stage(cfg, shape, n, tr, ctx, g, warnings)]
    stages += _train_stages(cfg, shape, n, tr, va, ctx, g, warnings)
    gen_e = _gen_cap(ec.max_new_tokens, te["mean_prompt"], ctx)
    rows_e = _mul(te["count"], ec.n + (1 if ec.greedy else 0))
    tok_e = _mul(rows_e, te["mean_prompt"] + gen_e)
    for name in ("eval base", "eval trained"):
        mem = 2.0 * n + kv_cache_bytes(shape, ec.batch_size, math.ceil(te["max_prompt"]) + gen_e) if n else None
        stages.append(
            _stage(
                name,
                rows_e,
                {"prompt+generated": tok_e},
                _mul(2, n, tok_e),
                mem,
                "weights + KV cache",
                UTILISATION["sample"],
                g,
            )
        )
    _fit(stages, g, warnings)
    known = [s for s in stages if s["flops"] is not None]
    total = {
        "flops": sum(s["flops"] for s in known) if len(known) == len(stages) else None,
        "gpu_hours": sum(s["gpu_hours"] for s in known) if len(known) == len(stages) else None,
    }
    total["dollars"] = total["gpu_hours"] * g["dollars_per_hour"] if total["gpu_hours"] is not None else None
    return {
        "model": cfg.model,
        "params": n,
        "params_source": shape_source,
        "context": ctx,
        "backend": cfg.backend,
        "gpu": g,
        "utilisation": dict(UTILISATION),
        "sets": sets,
        "stages": stages,
        "total": total,
        "warnings": warnings,
    }


# -- rendering ---------------------------------------------------------------------------------
def _num(x, fmt="{:,.0f}") -> str:
    return "unknown" if x is None else fmt.format(x)


def _tokens(t: dict) -> str:
    return ", ".join(f"{k} {_num(v)}" for k, v in t.items())


def render_plan(p: dict) -> str:
    """The plan as text: model and GPU assumptions, problems, one row per stage, totals, the
    formulas, and one line per problem found (a stage that does not fit names its knob)."""
    g = p["gpu"]
    lines = [
        f"model: {p['model']}: {_num(p['params'])} parameters (shape from {p['params_source']}); "
        f"context {_num(p['context'])} tokens; backend {p['backend']}",
        f"GPU: {g['name']}, {g['memory_gb']:g} GB, peak bf16 {g['peak_flops'] / 1e12:g} TFLOP/s; assumed utilisation: "
        + ", ".join(f"{k} {v:.0%}" for k, v in p["utilisation"].items())
        + f" (eval/validation count as sample); ${g['dollars_per_hour']:.2f}/GPU-hour (assumed)",
        "",
        "problems:",
    ]
    for key, s in p["sets"].items():
        lines.append(
            f"  {key:<10} {_num(s['count']):>7}  ({s['spec'] or '-'}: {s['count_source']}); prompt tokens mean "
            f"{s['mean_prompt']:.0f}, max {s['max_prompt']} ({s['prompt_source']})"
        )
    lines += [
        "",
        "| stage | rows | tokens (upper bounds) | FLOPs | peak memory (GB) | GPU-hours | $ |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for s in p["stages"]:
        extra = f" ({s['steps']} steps)" if "steps" in s else ""
        extra += f" ({s['checkpoints']} checkpoints)" if "checkpoints" in s else ""
        mem = _num(None if s["memory_bytes"] is None else s["memory_bytes"] / GB, "{:.1f}")
        lines.append(
            f"| {s['name']}{extra} | {_num(s['rows'])} | {_tokens(s['tokens'])} | {_num(s['flops'], '{:.3g}')} | "
            f"{mem} | {_num(s['gpu_hours'], '{:.3g}')} | {_num(s['dollars'], '{:.3g}')} |"
        )
    t = p["total"]
    lines.append(
        f"| total | | | {_num(t['flops'], '{:.3g}')} | | {_num(t['gpu_hours'], '{:.3g}')} | "
        f"{_num(t['dollars'], '{:.3g}')} |"
    )
    lines += ["", "memory per stage:"]
    lines += [f"  {s['name']}: {s['memory_formula']}" for s in p["stages"]]
    lines += [
        "",
        "FLOPs: 2 x params per token forward (sample, score, eval, anchor), 6 x params per token trained;",
        "GPU-hours: FLOPs / (peak x utilisation) / 3600; tokens: every completion at max_new_tokens (cut at",
        "the context), every problem kept by selection (only mixed-success ones are, after sampling).",
    ]
    if p["warnings"]:
        lines += [""] + p["warnings"]
    return "\n".join(lines)


def dry_run(cfg, *, gpu: str = "A100", gpu_memory_gb=None, dollars_per_hour=None) -> str:
    """`render_plan` of `plan` with the model's shape and tokenizer from disk when they are there."""
    tokenizer, where = local_tokenizer(cfg.model)
    p = plan(cfg, gpu=gpu, gpu_memory_gb=gpu_memory_gb, dollars_per_hour=dollars_per_hour, tokenizer=tokenizer)
    head = f"dry run: nothing is loaded, sampled or trained. Prompt lengths: {where or 'no tokenizer on disk'}.\n"
    return head + render_plan(p)
