"""plan: what a `run` config would do, without running it (``reasonmaxxer run CONFIG --dry-run``).

`plan(cfg, ...)` counts, stage by stage, the problems, rollouts and tokens (upper bounds: every
completion at ``max_new_tokens``, capped at the model's context), the FLOPs, the peak GPU
memory and the GPU-hours and dollars on a named GPU; `render_plan` prints it. Pure functions:
the only inputs are the config, the model's shape (`model_shape`: a local ``config.json`` or
the `KNOWN_SHAPES` table), problem counts (`count_problems`: local data only, never the Hub)
and an optional tokenizer (`local_tokenizer`: one already on disk).

Formulas (also printed with the plan):
- FLOPs: 2*N per token through a forward pass, 6*N per token trained (forward + backward),
  N = all parameters (a LoRA backward still runs through the frozen weights); training adds
  2*N per token for the anchor's base forward (lam > 0). Same as `recipes.baselines.flops`.
- sampling memory: weights (2 bytes/param, bf16) + KV cache = rows * seq * 2 * layers *
  kv_heads * head_dim * 2 bytes. vLLM batches what fits in ``gpu_memory_utilization``.
- training memory: frozen weights 2 bytes/param + trainable params * 16 bytes (fp32 weight,
  grad, Adam m and v; LoRA: the adapter only) + activations micro_batch * seq * hidden *
  layers * 34 bytes (Korthikanti et al. 2022, bf16, flash/SDPA attention; gradient
  checkpointing: 2 bytes + one layer's 34) + 3 fp32 logit buffers micro_batch * seq * vocab * 4,
  or, with the chunked loss (`loss_impl`, auto above 1 GiB of logits), 4 fp32 [1024, V] blocks
  and an fp32 head; a full fine-tune adds its frozen bf16 copy (2 bytes/param).
- GPU-hours: FLOPs / (peak bf16 FLOP/s * utilisation) / 3600, utilisation assumed (stated).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from ..errors import ReasonMaxxerError
from .model_shapes import GB, dims, kv_cache_bytes, local_tokenizer, lora_params, model_shape, n_params

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


def train_memory_bytes(c: dict, tcfg, seq: int) -> tuple[float, str]:
    """Peak training memory and its formula (see the module docstring)."""
    v, h, _, n_layers, _, _, _ = dims(c)
    n = n_params(c)
    trainable = n if tcfg.full_finetune else lora_params(c, tcfg.lora_rank, tcfg.target_modules)
    weights = 2.0 * n if not tcfg.full_finetune else 0.0
    states = 16.0 * trainable
    per_layer = 2 if tcfg.gradient_checkpointing else ACT_BYTES
    acts = tcfg.micro_batch * seq * h * (n_layers * per_layer + (ACT_BYTES if tcfg.gradient_checkpointing else 0))
    from ..stages.train import CHUNKED_ABOVE_BYTES

    naive = tcfg.micro_batch * seq * v * 4.0
    chunked = tcfg.loss_impl == "chunked" or (tcfg.loss_impl == "auto" and naive > CHUNKED_ABOVE_BYTES)
    if chunked:  # core/chunked.py: ~4 fp32 [chunk, V] buffers + an fp32 copy of the head
        logits, what = 4 * 1024 * v * 4.0 + v * h * 4.0, f"chunked loss 4 x 1024 x {v} x 4 B + head {v} x {h} x 4 B"
    else:
        logits, what = 3 * naive, f"logits 3 x {tcfg.micro_batch} x {seq} x {v} x 4 B"
    frozen = 2.0 * n if tcfg.full_finetune else 0.0  # the full fine-tune's frozen bf16 copy (anchor)
    formula = (
        f"weights 2 B x {n:,} + states 16 B x {trainable:,} trainable"
        + (f" + frozen copy 2 B x {n:,}" if frozen else "")
        + f" + activations {tcfg.micro_batch} x {seq} tok x {h} x {n_layers} layers x {per_layer} B + {what}"
    )
    return weights + states + frozen + acts + logits, formula


def _decode_memory(backend, shape, n, rows, max_prompt, gen) -> tuple[float | None, str]:
    """Peak memory of decoding `rows` sequences together, and how it is counted."""
    if not n:
        return None, ""
    seq = math.ceil(max_prompt) + gen
    full = 2.0 * n + kv_cache_bytes(shape, rows, seq)
    if backend == "vllm":
        return 2.0 * n + kv_cache_bytes(shape, 1, seq), (
            f"vLLM: weights + the KV cache of one {seq}-token sequence must fit in gpu_memory_utilization; "
            f"it batches what fits ({rows} rows at once: {full / GB:.1f} GB)"
        )
    return full, f"weights 2 B x params + KV cache {rows} rows x {seq} tok x 2 x layers x kv_heads x head_dim x 2 B"


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
    mem, how = _decode_memory(cfg.backend, shape, n, min(sc.batch_size, rows or 1), tr["max_prompt"], gen)
    return _stage("sample", rows, tokens, flops, mem, how, UTILISATION["sample"], g)


def _train_stages(cfg, shape, n, tr, va, ctx, g, warnings) -> list[dict]:
    sc, sel, tc, ec = cfg.sampling, cfg.selection, cfg.train, cfg.eval
    gen = _gen_cap(sc.max_new_tokens, tr["mean_prompt"], ctx)
    seq_mean, seq_max = tr["mean_prompt"] + gen, math.ceil(tr["max_prompt"]) + gen
    kept = None if tr["count"] is None else min(tr["count"], sel.max_problems or tr["count"])
    rows = None if kept is None else math.floor(kept * sc.n * sel.keep_shortest + 0.5)  # round half up
    rescored = cfg.backend == "vllm" or cfg.rescore
    scored = _mul(rows, seq_mean) if rescored else 0
    v, h = dims(shape)[0], dims(shape)[1]
    # stages/score.py streams the head over 256 positions at a time: 2 fp32 [256, V] blocks, an
    # fp32 copy of a bf16 head, and the batch's (4 rows) hidden states
    smem = (2.0 * n + 2 * 256 * v * 4.0 + v * h * 4.0 + 4 * seq_max * h * 4.0) if n else None
    out = [
        _stage(
            "select + score",
            rows,
            {"scored": scored},
            _mul(2, n, scored),
            smem,
            "weights + 2 fp32 [256, V] logit blocks + fp32 head + hidden states of 4 rows (the head is streamed)"
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
        # HF decoding in the training process (stages/evaluate.py validation_accuracy_fn), even with vLLM
        vmem, vhow = _decode_memory("hf", shape, n, min(ec.batch_size, va["count"]), va["max_prompt"], vgen)
        vs = _stage(
            "validate (one completion a problem, per checkpoint)",
            vrows,
            {"prompt+generated": vtok},
            _mul(2, n, vtok),
            vmem,
            vhow,
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
    "validate (one completion a problem, per checkpoint)": "lower [eval] batch_size or max_new_tokens",
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
        mem, how = _decode_memory(cfg.backend, shape, n, min(ec.batch_size, rows_e or 1), te["max_prompt"], gen_e)
        stages.append(
            _stage(name, rows_e, {"prompt+generated": tok_e}, _mul(2, n, tok_e), mem, how, UTILISATION["sample"], g)
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
