"""Token-level analysis of a base model against a tuned model (method.md section 2).

What it does, exactly:

1. Decode each prompt greedily (T=0) with the BASE model (`HFSampler`); with ``source="tuned"``
   along the TUNED model's own greedy trajectories instead (`run_analyze(trajectories="both")`
   does both and reports each source separately).
2. Teacher-force BOTH models over prompt + completion, in right-padded batches; the prompt
   prefix shared by a batch (few-shot examples) is encoded once (`split_prefix`). Memory is
   bounded: the logits come `chunk` completion positions at a time from the final hidden states
   (`positions.position_logits`, `completion_stats`), and only the per-position numbers below
   are kept, never the [B, T, V] logits of a batch.
3. At every generated position t (the logits that predicted completion token t, i.e. under the
   same prefix for both models) compare the two next-token distributions
   (`compare_distributions`) and classify the position [paper Eq. 3]:
   0 unshifted (same argmax), 1 reranked (tuned argmax in base top-k, k=5),
   2 shifted (tuned argmax outside base top-k).
4. Aggregate (`summarize`): % reranked / shifted, base-rank histogram of the tuned token,
   base entropy at reranked vs unshifted positions and their ratio, AUROC of base entropy as a
   predictor of "reranked", Jensen-Shannon quantiles, where in the completion changes sit.

Units: entropies and divergences in nats (1 nat = 1.4427 bits), over the FULL vocabulary, from
raw (untempered) logits. Ranks are 1-based: rank 1 is the base argmax.

Limitations, honestly:
- Ranks under exact logit ties follow ``torch.argmax`` (first index wins): a tuned argmax tied
  with the base argmax but at a later index counts as rank 2 / reranked.
- The greedy completion comes from the sampler's KV-cached decode; the teacher-forced logits of
  the decoding model can, rarely, have a different argmax (float rounding at near ties). The
  summary reports that rate (``teacher_forced_argmax_mismatch``); it should be ~0.
- Along tuned trajectories the prefixes are the tuned model's, so the two sources' statistics
  are not over the same positions; each is reported on its own, never pooled.
- Only the oracle-free measurements are here; the causal interventions of section 2
  (oracle / random / entropy-gated / cross-sampling) are in `intervene`.

Per position the records also keep both models' top-5 (ids and probabilities, for the explorer)
and each record the last `PROMPT_TAIL` prompt tokens (fork contexts at the start of a completion).

Where things are: the per-position tensor functions and `summarize` in `compare`, loading the
model pair and `jsonable` in `shared` (both re-exported here); decoding, records, the Markdown
table and `run_analyze` here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ReasonMaxxerError
from .compare import (
    CLS_NAMES,
    PER_POSITION_KEYS,
    TOP_N,
    argmax_change,
    compare_distributions,
    completion_stats,
    summarize,
    top_probs,
)
from .shared import check_same_tokenizer, jsonable, load_pair

__all__ = [
    "CLS_NAMES",
    "PAPER",
    "PER_POSITION_KEYS",
    "PROMPT_TAIL",
    "SOURCES",
    "TOP_N",
    "TRAJECTORIES",
    "analyze",
    "argmax_change",
    "check_same_tokenizer",
    "compare_distributions",
    "completion_stats",
    "jsonable",
    "load_pair",
    "render_markdown",
    "run_analyze",
    "summarize",
    "token_text",
    "top_probs",
]

PAPER = {"reranked_pct": "1.0-4.1%", "shifted_pct": "0%", "entropy_ratio": "5-12x"}


SOURCES = ("base", "tuned")  # which model's greedy trajectories are analysed


TRAJECTORIES = {"base": ("base",), "tuned": ("tuned",), "both": ("base", "tuned")}


PROMPT_TAIL = 8  # prompt tokens stored per record (fork-atlas context)


def analyze(
    base_model,
    tuned_model,
    tokenizer,
    prompts_ids: list[list[int]],
    *,
    source: str = "base",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    k: int = 5,
    js_threshold: float = 0.1,
    top_n: int = TOP_N,
    chunk: int = 256,
) -> tuple[list[dict], dict]:
    """Greedy-decode each prompt with the `source` model ("base" or "tuned"), teacher-force both
    models over the same prefixes (prompt + that completion), compare per position.

    Returns (records, summary). One record per prompt: index, source, prompt_len, prompt_tail_ids
    (the last `PROMPT_TAIL` prompt ids), token_ids (completion), tokens (decoded text piece per
    token), text, finish_reason, the `compare_distributions` arrays as lists (length = completion
    length; entry t is about completion token t) and base_top_ids / base_top_p / tuned_top_ids /
    tuned_top_p (top_n per position, probabilities rounded to 5 decimals). The summary is
    `summarize` over all positions, plus source, counts and the rate at which the decoding model's
    teacher-forced argmax differs from the token it emitted (``teacher_forced_argmax_mismatch``).
    """
    _check_analyze_args(source, prompts_ids)
    decoder = base_model if source == "base" else tuned_model
    todo = _greedy_completions(decoder, tokenizer, prompts_ids, max_new_tokens, batch_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    records: list[dict] = []
    kept: list[tuple[tuple[int, ...], dict[str, Tensor]]] = []  # (completion, its per-position arrays)
    for s in range(0, len(todo), batch_size):
        part = todo[s : s + batch_size]
        stats = _batch_stats(base_model, tuned_model, part, pad, k=k, top_n=top_n, chunk=chunk)
        for (r, c), d in zip(part, stats):
            if len(c.token_ids):
                kept.append((tuple(c.token_ids), {name: d[name] for name in PER_POSITION_KEYS}))
            records.append(_record(r, c, d, source, tokenizer))
    return records, _source_summary(records, kept, source, js_threshold=js_threshold, k=k)


def _check_analyze_args(source: str, prompts_ids: list[list[int]]) -> None:
    """A known trajectory source and at least one prompt, none empty (ReasonMaxxerError otherwise)."""
    if source not in SOURCES:
        raise ReasonMaxxerError(f"analysis: unknown trajectory source {source!r}; valid: {', '.join(SOURCES)}")
    if not prompts_ids:
        raise ReasonMaxxerError("analysis: no prompts")
    for i, p in enumerate(prompts_ids):
        if not p:
            raise ReasonMaxxerError(f"analysis: prompt {i} is empty")


def _greedy_completions(model, tokenizer, prompts_ids: list[list[int]], max_new_tokens: int, batch_size: int) -> list:
    """(request, completion) per prompt, in order: `model`'s greedy (T=0) decode (`HFSampler`);
    a request's key is (str(prompt index), 0)."""
    from ..backends.hf import HFSampler, Request, SamplingConfig

    cfg = SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    reqs = [Request((str(i), 0), tuple(int(t) for t in p)) for i, p in enumerate(prompts_ids)]
    comps = HFSampler(model, tokenizer).generate(reqs, cfg)
    return list(zip(reqs, comps))


def _batch_stats(base_model, tuned_model, part: list, pad: int, *, k: int, top_n: int, chunk: int) -> list[dict]:
    """`completion_stats` of one batch of (request, completion) pairs, one dict per pair in order;
    an empty completion (nothing to compare) gets empty `PER_POSITION_KEYS` arrays and no top lists."""
    from ..stages.batch_loss import shared_prefix_len
    from ..stages.train import TrainExample, batch_tensors

    ex = [TrainExample(r.prompt_ids, tuple(c.token_ids), (0.0,) * len(c.token_ids), 0.0, False) for r, c in part]
    live = [e for e in ex if e.completion_ids]  # nothing to compare for empty completions
    cmp: list[dict] = []
    if live:
        ids, att, comp, _, _, _ = batch_tensors(live, pad)  # [b, T]
        P = shared_prefix_len(ids, att, comp)
        spans = [(len(e.prompt_ids), len(e.completion_ids)) for e in live]
        cmp = completion_stats(base_model, tuned_model, ids, att, P, spans, k=k, top_n=top_n, chunk=chunk)
    it = iter(cmp)
    return [next(it) if len(c.token_ids) else {name: torch.zeros(0) for name in PER_POSITION_KEYS} for _, c in part]


def _record(r, c, d: dict, source: str, tokenizer) -> dict:
    """The trajectories.jsonl record of one (request, completion) and its per-position arrays `d`."""
    n = len(c.token_ids)
    rec = {
        "index": int(r.key[0]),
        "source": source,
        "prompt_len": len(r.prompt_ids),
        "prompt_tail_ids": list(r.prompt_ids[-PROMPT_TAIL:]),
        "token_ids": list(c.token_ids),
        "tokens": [tokenizer.decode([t]) for t in c.token_ids],
        "text": c.text,
        "finish_reason": c.finish_reason,
    }
    rec.update({name: d[name].tolist() for name in PER_POSITION_KEYS})
    for who in ("base", "tuned"):
        rec[f"{who}_top_ids"] = d[f"{who}_top_ids"].tolist() if n else []
        rec[f"{who}_top_p"] = [[round(float(v), 5) for v in row] for row in d[f"{who}_top_p"]] if n else []
    return rec


def _source_summary(records: list[dict], kept: list, source: str, *, js_threshold: float, k: int) -> dict:
    """`summarize` over every compared position of one source (`kept`: (completion ids, arrays)
    per non-empty completion, in order), plus source, counts and the rate at which the decoding
    model's teacher-forced argmax differs from the token it emitted."""
    own_argmax = f"{source}_argmax"  # what the decoding model's teacher-forced argmax is called
    mismatch = sum(int((d[own_argmax] != torch.tensor(ids, dtype=torch.long)).sum()) for ids, d in kept)
    cat = {name: torch.cat([d[name] for _, d in kept]) if kept else torch.zeros(0) for name in PER_POSITION_KEYS}
    fracs = [torch.arange(len(ids), dtype=torch.float64) / len(ids) for ids, _ in kept]
    summary = summarize(cat, torch.cat(fracs) if fracs else torch.zeros(0), js_threshold=js_threshold, k=k)
    n_pos = summary["n_positions"]
    summary.update(
        source=source,
        n_trajectories=len(records),
        n_truncated=sum(r["finish_reason"] == "length" for r in records),
        teacher_forced_argmax_mismatch=mismatch / n_pos if n_pos else float("nan"),
    )
    return summary


def token_text(tokenizer, records: list[dict]) -> dict[str, str]:
    """{str(id): decoded text} for every token id the records refer to (completion tokens, both
    argmaxes, both top-n lists, the prompt tails): the explorer's vocabulary (it loads no tokenizer)."""
    ids: set[int] = set()
    for r in records:
        ids.update(r["token_ids"], r.get("prompt_tail_ids", ()), r["base_argmax"], r["tuned_argmax"])
        for key in ("base_top_ids", "tuned_top_ids"):
            for row in r.get(key, ()):
                ids.update(row)
    return {str(i): tokenizer.decode([i]) for i in sorted(int(i) for i in ids)}


# -- report and entry point -------------------------------------------------------------------
def _fmt(x, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3g}{unit}"
    return f"{x}{unit}"


def _summary_rows(s: dict) -> list[tuple[str, str, str]]:
    """(metric, our value, paper's figure) rows of one summary."""
    k = s.get("k", 5)
    nats_bits = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:.3g} nats ({v * 1.4427:.3g} bits)"
    rows = [
        ("positions compared", _fmt(s["n_positions"]), ""),
        ("trajectories (truncated)", f"{s.get('n_trajectories', 'n/a')} ({s.get('n_truncated', 'n/a')})", ""),
        ("reranked", _fmt(s["reranked_pct"], "%"), PAPER["reranked_pct"]),
        ("shifted", _fmt(s["shifted_pct"], "%"), PAPER["shifted_pct"]),
        (f"base rank of tuned token (1..{k}, >{k})", " / ".join(f"{r}: {c}" for r, c in s["rank_hist"].items()), ""),
        ("mean base rank at changed positions", _fmt(s["mean_tuned_rank_changed"]), ""),
        ("base entropy, reranked", nats_bits(s["entropy_reranked"]), ""),
        ("base entropy, unshifted", nats_bits(s["entropy_unshifted"]), ""),
        ("entropy ratio (reranked / unshifted)", _fmt(s["entropy_ratio"], "x"), PAPER["entropy_ratio"]),
        ("AUROC of base entropy for reranked", _fmt(s["auroc_entropy_reranked"]), ""),
        (
            "JS p50 / p90 / p99 / max (nats)",
            " / ".join(_fmt(s["js_quantiles"][q]) for q in ("p50", "p90", "p99", "max")),
            "",
        ),
        (f"fraction with JS > {s['js_threshold']}", _fmt(s["js_frac_above"]), ""),
        (
            "mean KL(base||tuned) / KL(tuned||base) (nats)",
            f"{_fmt(s['kl_base_tuned_mean'])} / {_fmt(s['kl_tuned_base_mean'])}",
            "",
        ),
        ("greedy vs teacher-forced argmax mismatch", _fmt(s.get("teacher_forced_argmax_mismatch")), ""),
    ]
    if "change_position_hist" in s:
        rows.append(("changes by relative position (10 bins)", " ".join(str(c) for c in s["change_position_hist"]), ""))
    return rows


def render_markdown(summaries: dict[str, dict], config: dict) -> str:
    """The summaries ({trajectory source: summary}) as one Markdown table, a column per source,
    with the paper's figures beside ours."""
    cols = list(summaries)
    tables = [_summary_rows(summaries[c]) for c in cols]
    k = summaries[cols[0]].get("k", 5)
    lines = [
        f"# Token-level analysis: {config.get('tuned', 'tuned')} vs {config.get('base', 'base')}",
        "",
        (
            f"Problems: `{config.get('problems')}`, template `{config.get('template')}`, greedy decoding "
            f"(max {config.get('max_new_tokens')} new tokens) along the {' and the '.join(cols)} model's "
            f"trajectories, both models teacher-forced on the same prefixes, top-k = {k}."
        ),
        "",
        "| metric | " + " | ".join(f"{c} trajectories" for c in cols) + " | paper |",
        "|---|" + "---|" * len(cols) + "---|",
    ]
    for i, (m, _, paper) in enumerate(tables[0]):
        lines.append(f"| {m} | " + " | ".join(t[i][1].replace("|", "/") for t in tables) + f" | {paper} |")
    return "\n".join(lines) + "\n"


def run_analyze(
    base_spec: str,
    tuned_spec: str,
    problems_spec: str,
    out_dir,
    *,
    template: str = "fewshot",
    limit: int | None = None,
    max_new_tokens: int = 256,
    data_dir=None,
    batch_size: int = 8,
    trajectories: str = "base",
) -> dict:
    """Load both models, render prompts, run `analyze` along the `trajectories` source(s)
    ("base", "tuned" or "both"), write analysis.json / analysis.md / trajectories.jsonl under
    out_dir (atomically). Returns {"config", "summaries" {source: summary}, "summary" (the first
    source's), "paths"}.

    analysis.json holds config, summaries, summary (= the first source's, kept for readers of one
    source), paper and token_text (id -> text for the explorer). Each trajectories.jsonl record
    carries its "source". tuned_spec may be a PEFT adapter dir, a merged checkpoint or any HF
    model (`load_model`).
    """
    from ..io import atomic_write_bytes, atomic_write_json

    if trajectories not in TRAJECTORIES:
        raise ReasonMaxxerError(
            f"analysis: --trajectories must be one of {', '.join(TRAJECTORIES)} (got {trajectories!r})"
        )
    problems, tmpl, base, tuned, btok, prompts = load_pair(
        base_spec, tuned_spec, problems_spec, template=template, limit=limit, data_dir=data_dir, what="analysis"
    )
    records, summaries = [], {}
    for source in TRAJECTORIES[trajectories]:
        recs, summaries[source] = analyze(
            base, tuned, btok, prompts, source=source, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        for r, p in zip(recs, problems):
            r["problem_id"] = p.id
        records += recs
    first = summaries[TRAJECTORIES[trajectories][0]]
    config = {
        "base": base_spec,
        "tuned": tuned_spec,
        "problems": problems_spec,
        "limit": limit,
        "template": tmpl.name,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "k": first["k"],
        "js_threshold": first["js_threshold"],
        "trajectories": trajectories,
        "decoding": ", ".join(f"greedy ({s})" for s in summaries),
    }
    out = Path(out_dir)
    paths = {"json": out / "analysis.json", "md": out / "analysis.md", "trajectories": out / "trajectories.jsonl"}
    atomic_write_json(
        paths["json"],
        jsonable(
            {
                "config": config,
                "summaries": summaries,
                "summary": first,
                "paper": PAPER,
                "token_text": token_text(btok, records),
            }
        ),
    )
    atomic_write_bytes(paths["trajectories"], "".join(json.dumps(jsonable(r)) + "\n" for r in records).encode())
    atomic_write_bytes(paths["md"], render_markdown(jsonable(summaries), config).encode())
    return {"config": config, "summaries": summaries, "summary": first, "paths": {k: str(v) for k, v in paths.items()}}
