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
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from ..core.entropy import token_entropy
from ..core.stats import auroc
from ..errors import ReasonMaxxerError, first_line
from ..models import model_device

CLS_NAMES = ("unshifted", "reranked", "shifted")


PER_POSITION_KEYS = (
    "base_entropy",
    "base_argmax",
    "tuned_argmax",
    "tuned_rank_in_base",
    "kl_base_tuned",
    "kl_tuned_base",
    "js",
    "cls",
)


PAPER = {"reranked_pct": "1.0-4.1%", "shifted_pct": "0%", "entropy_ratio": "5-12x"}


SOURCES = ("base", "tuned")  # which model's greedy trajectories are analysed


TRAJECTORIES = {"base": ("base",), "tuned": ("tuned",), "both": ("base", "tuned")}


TOP_N = 5  # top tokens (with probabilities) stored per position


PROMPT_TAIL = 8  # prompt tokens stored per record (fork-atlas context)


_LN2 = math.log(2.0)


# -- pure tensor functions --------------------------------------------------------------------
@torch.no_grad()
def argmax_change(b: Tensor, t: Tensor, k: int = 5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Argmax change between base and tuned logits at the same positions: b, t [c, V] fp32 ->
    (base_argmax, tuned_argmax, tuned_rank_in_base, cls), [c] each.

    tuned_rank_in_base: 1 = base argmax; position of the tuned argmax in the base logits'
    stable descending order (ties by token id). cls: 0 unshifted (same argmax) / 1 reranked
    (tuned argmax in the base top-k) / 2 shifted. The one classification used by
    `compare_distributions` and `analysis.forks.fork_changes`.
    """
    ba, ta = b.argmax(-1), t.argmax(-1)  # [c]
    bt = b.gather(1, ta[:, None])  # [c, 1] base logit of tuned argmax
    idx = torch.arange(b.shape[1], device=b.device)[None]  # [1, V]
    rank = 1 + (b > bt).sum(-1) + ((b == bt) & (idx < ta[:, None])).sum(-1)  # [c]
    cls = torch.where(ba == ta, 0, torch.where(rank <= k, 1, 2))  # [c]
    return ba, ta, rank, cls


def compare_distributions(
    base_logits: Tensor, tuned_logits: Tensor, k: int = 5, chunk_size: int = 64
) -> dict[str, Tensor]:
    """Per-position comparison of two next-token distributions at the same positions.

    base_logits, tuned_logits: [N, V] raw logits (teacher-forced, same prefixes). Returns [N] each:
    base_entropy (nats, fp32), base_argmax / tuned_argmax (long), tuned_rank_in_base (long, 1 = base
    argmax; position of the tuned argmax in base's stable descending order), kl_base_tuned =
    KL(base || tuned), kl_tuned_base = KL(tuned || base), js = Jensen-Shannon (nats, <= ln 2), and
    cls (long: 0 unshifted / 1 reranked: tuned argmax in base top-k / 2 shifted).
    Identical rows give exactly 0 for KL and JS. Computed in fp32, ``chunk_size`` rows at a time.
    """
    if base_logits.shape != tuned_logits.shape or base_logits.dim() != 2:
        raise ReasonMaxxerError(
            f"analysis: logits must both be [N, V] of the same shape "
            f"(got {tuple(base_logits.shape)} and {tuple(tuned_logits.shape)})"
        )
    if k < 1:
        raise ReasonMaxxerError(f"analysis: k must be >= 1 (got {k})")
    N = base_logits.shape[0]
    out = {name: [] for name in PER_POSITION_KEYS if name != "base_entropy"}
    for s in range(0, N, chunk_size):
        b = base_logits[s : s + chunk_size].float()  # [c, V]
        t = tuned_logits[s : s + chunk_size].to(b.device).float()  # [c, V]
        lp = torch.log_softmax(b, -1)  # [c, V] log p (base)
        lq = torch.log_softmax(t, -1)  # [c, V] log q (tuned)
        p, q = lp.exp(), lq.exp()
        ba, ta, rank, cls = argmax_change(b, t, k)  # [c] each
        d = lq - lp  # [c, V] log q/p
        kl_pq = torch.where(p > 0, p * -d, 0.0).sum(-1)  # [c] KL(p||q)
        kl_qp = torch.where(q > 0, q * d, 0.0).sum(-1)  # [c] KL(q||p)
        # m = (p + q) / 2: log p/m = ln2 - softplus(log q/p), exactly 0 where p == q
        lpm = torch.where(d == 0, 0.0, _LN2 - torch.nn.functional.softplus(d))  # [c, V]
        lqm = torch.where(d == 0, 0.0, _LN2 - torch.nn.functional.softplus(-d))  # [c, V]
        js = 0.5 * (torch.where(p > 0, p * lpm, 0.0).sum(-1) + torch.where(q > 0, q * lqm, 0.0).sum(-1))
        for name, v in (
            ("base_argmax", ba),
            ("tuned_argmax", ta),
            ("tuned_rank_in_base", rank),
            ("kl_base_tuned", kl_pq.clamp_min(0)),
            ("kl_tuned_base", kl_qp.clamp_min(0)),
            ("js", js.clamp_min(0)),
            ("cls", cls),
        ):
            out[name].append(v)
    res = {name: torch.cat(v) if v else torch.zeros(0) for name, v in out.items()}
    res["base_entropy"] = token_entropy(base_logits) if N else torch.zeros(0)
    for name in ("base_argmax", "tuned_argmax", "tuned_rank_in_base", "cls"):
        res[name] = res[name].long()
    return {name: res[name] for name in PER_POSITION_KEYS}


@torch.no_grad()
def top_probs(logits: Tensor, n: int = TOP_N, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """The n most probable tokens of each row of raw logits [N, V]: (ids [N, n] long, probs [N, n] fp32),
    descending (softmax over the full vocabulary, no temperature)."""
    n = min(n, logits.shape[-1])
    ids, probs = [], []
    for s in range(0, logits.shape[0], chunk_size):
        p = torch.softmax(logits[s : s + chunk_size].float(), -1)  # [c, V]
        v, i = torch.topk(p, n, dim=-1)  # [c, n]
        ids.append(i)
        probs.append(v)
    if not ids:
        return torch.zeros(0, n, dtype=torch.long), torch.zeros(0, n)
    return torch.cat(ids), torch.cat(probs)


def _mean(x: Tensor) -> float:
    return float(x.double().mean()) if x.numel() else float("nan")


def summarize(per_pos: dict, position_frac: Tensor | None = None, js_threshold: float = 0.1, k: int = 5) -> dict:
    """Aggregate per-position comparisons (the `compare_distributions` keys, [N] each, all
    trajectories concatenated) into the section-2 report. Percentages are 0-100; entropies nats.

    position_frac [N]: relative position of each token in its completion, in [0, 1)
    (j / length); gives where changes (cls != 0) sit, in 10 bins. The AUROC treats
    "reranked" (cls 1) as positive and every other position (unshifted and shifted) as negative.
    nan where a quantity is undefined (no positions of that class).
    """
    cls = torch.as_tensor(per_pos["cls"]).long()
    n = cls.numel()
    ent = torch.as_tensor(per_pos["base_entropy"], dtype=torch.float64)
    rank = torch.as_tensor(per_pos["tuned_rank_in_base"]).long()
    js = torch.as_tensor(per_pos["js"], dtype=torch.float64)
    changed = cls != 0
    pct = (lambda m: 100.0 * float(m.sum()) / n) if n else (lambda m: float("nan"))
    hist = {str(r): int((rank == r).sum()) for r in range(1, k + 1)}
    hist[f">{k}"] = int((rank > k).sum())
    e_rr, e_un = _mean(ent[cls == 1]), _mean(ent[cls == 0])
    qs = (0.5, 0.9, 0.99)
    js_q = {f"p{round(q * 100)}": float(torch.quantile(js, q)) if n else float("nan") for q in qs}
    js_q["max"] = float(js.max()) if n else float("nan")
    js_q["mean"] = _mean(js)
    out = {
        "k": k,
        "n_positions": n,
        "n_unshifted": int((cls == 0).sum()),
        "n_reranked": int((cls == 1).sum()),
        "n_shifted": int((cls == 2).sum()),
        "reranked_pct": pct(cls == 1),
        "shifted_pct": pct(cls == 2),
        "changed_pct": pct(changed),
        "rank_hist": hist,
        "mean_tuned_rank_changed": _mean(rank[changed].double()),
        "entropy_reranked": e_rr,
        "entropy_unshifted": e_un,
        "entropy_shifted": _mean(ent[cls == 2]),
        "entropy_ratio": e_rr / e_un if e_un > 0 else float("nan"),
        "auroc_entropy_reranked": auroc(ent, cls == 1),
        "js_quantiles": js_q,
        "js_threshold": js_threshold,
        "js_frac_above": float((js > js_threshold).double().mean()) if n else float("nan"),
        "kl_base_tuned_mean": _mean(torch.as_tensor(per_pos["kl_base_tuned"])),
        "kl_tuned_base_mean": _mean(torch.as_tensor(per_pos["kl_tuned_base"])),
    }
    if position_frac is not None:
        f = torch.as_tensor(position_frac, dtype=torch.float64)
        b = (f * 10).floor().long().clamp(0, 9)  # [N] bin of each position
        all_h = torch.bincount(b, minlength=10)
        ch_h = torch.bincount(b[changed], minlength=10)
        out["change_position_hist"] = ch_h.tolist()
        out["position_hist"] = all_h.tolist()
        out["change_rate_by_position"] = [
            float(c) / float(a) if a else float("nan") for c, a in zip(ch_h.tolist(), all_h.tolist())
        ]
    return out


# -- tokenizers ---------------------------------------------------------------------------------
def check_same_tokenizer(tok_a, tok_b) -> None:
    """Raise ReasonMaxxerError unless both tokenizers map the same ids to the same tokens."""
    na, nb = len(tok_a), len(tok_b)
    if na != nb:
        raise ReasonMaxxerError(
            f"analysis: the base and tuned tokenizers differ in size ({na} vs {nb} tokens); "
            "token-level comparison needs the same vocabulary"
        )
    ia = {i: t for t, i in tok_a.get_vocab().items()}
    ib = {i: t for t, i in tok_b.get_vocab().items()}
    for i in sorted(set(ia) | set(ib)):
        if ia.get(i) != ib.get(i):
            raise ReasonMaxxerError(
                f"analysis: the base and tuned tokenizers differ at token id {i} "
                f"({ia.get(i)!r} vs {ib.get(i)!r}); token-level comparison needs the same vocabulary"
            )


@torch.no_grad()
def completion_stats(
    base_model, tuned_model, ids: Tensor, att: Tensor, prefix_len: int, spans, *, k: int, top_n: int, chunk: int = 256
) -> list[dict[str, Tensor]]:
    """Per completion token of each row, both models teacher-forced: the `compare_distributions`
    arrays and each model's top_n (ids, probs), [c_i] / [c_i, top_n] per row, on the CPU.

    ids/att [B, T] right-padded; spans: (prompt length p_i, completion length c_i) per row; the
    logits predicting completion token j sit at column p_i - 1 + j. Both models' logits come
    `chunk` positions at a time (`positions.position_logits`): memory is two [chunk, V] fp32
    blocks besides the hidden states, never the [B, T, V] logits of the batch.
    """
    from .positions import position_logits

    rows = [(i, p - 1 + j) for i, (p, c) in enumerate(spans) for j in range(c)]
    streams = [
        position_logits(m, ids.to(model_device(m)), att.to(model_device(m)), rows, chunk, prefix_len=prefix_len)
        for m in (base_model, tuned_model)
    ]
    parts: dict[str, list[Tensor]] = {}
    for b, t in zip(*streams):  # [c, V] fp32 each
        t = t.to(b.device)
        d = compare_distributions(b, t, k=k)
        for who, x in (("base", b), ("tuned", t)):
            d[f"{who}_top_ids"], d[f"{who}_top_p"] = top_probs(x, top_n)  # [c, top_n] each
        for name, v in d.items():
            parts.setdefault(name, []).append(v.cpu())
    lengths = [c for _, c in spans]
    cat = {name: torch.cat(v) for name, v in parts.items()}
    return [dict(zip(cat, vs)) for vs in zip(*(torch.split(v, lengths) for v in cat.values()))]


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
    from ..backends.hf import HFSampler, Request, SamplingConfig
    from ..stages.batch_loss import shared_prefix_len
    from ..stages.train import TrainExample, batch_tensors

    if source not in SOURCES:
        raise ReasonMaxxerError(f"analysis: unknown trajectory source {source!r}; valid: {', '.join(SOURCES)}")
    if not prompts_ids:
        raise ReasonMaxxerError("analysis: no prompts")
    for i, p in enumerate(prompts_ids):
        if not p:
            raise ReasonMaxxerError(f"analysis: prompt {i} is empty")
    cfg = SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    reqs = [Request((str(i), 0), tuple(int(t) for t in p)) for i, p in enumerate(prompts_ids)]
    comps = HFSampler(base_model if source == "base" else tuned_model, tokenizer).generate(reqs, cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    own_argmax = f"{source}_argmax"  # what the decoding model's teacher-forced argmax is called

    records: list[dict] = []
    per_pos: dict[str, list[Tensor]] = {name: [] for name in PER_POSITION_KEYS}
    fracs: list[Tensor] = []
    mismatch = 0
    todo = [(r, c) for r, c in zip(reqs, comps)]
    for s in range(0, len(todo), batch_size):
        part = todo[s : s + batch_size]
        ex = [TrainExample(r.prompt_ids, tuple(c.token_ids), (0.0,) * len(c.token_ids), 0.0, False) for r, c in part]
        live = [e for e in ex if e.completion_ids]  # nothing to compare for empty completions
        cmp: list[dict] = []
        if live:
            ids, att, comp, _, _, _ = batch_tensors(live, pad)  # [b, T]
            P = shared_prefix_len(ids, att, comp)
            spans = [(len(e.prompt_ids), len(e.completion_ids)) for e in live]
            cmp = completion_stats(base_model, tuned_model, ids, att, P, spans, k=k, top_n=top_n, chunk=chunk)
        it = iter(cmp)
        for r, c in part:
            n = len(c.token_ids)
            d = next(it) if n else {name: torch.zeros(0) for name in PER_POSITION_KEYS}
            toks = torch.tensor(c.token_ids, dtype=torch.long)
            if n:
                mismatch += int((d[own_argmax] != toks).sum())
                for name in PER_POSITION_KEYS:
                    per_pos[name].append(d[name])
                fracs.append(torch.arange(n, dtype=torch.float64) / n)
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
            records.append(rec)
    cat = {name: torch.cat(v) if v else torch.zeros(0) for name, v in per_pos.items()}
    summary = summarize(cat, torch.cat(fracs) if fracs else torch.zeros(0), js_threshold=js_threshold, k=k)
    n_pos = summary["n_positions"]
    summary.update(
        source=source,
        n_trajectories=len(records),
        n_truncated=sum(r["finish_reason"] == "length" for r in records),
        teacher_forced_argmax_mismatch=mismatch / n_pos if n_pos else float("nan"),
    )
    return records, summary


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


# -- entry point --------------------------------------------------------------------------------
def jsonable(x):
    """nan/inf -> None (strict JSON), recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


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


def _load(spec: str, role: str, what: str):
    """`load_model(spec)`, any failure as one ReasonMaxxerError line naming the role (base/tuned).

    Every exception counts as "fails to load" (a corrupt config, unknown architecture, truncated
    weights each raise a different type); REASONMAXXER_DEBUG=1 shows the chained traceback."""
    from ..models import load_model

    try:
        return load_model(spec)
    except ReasonMaxxerError as e:
        raise ReasonMaxxerError(f"{what}: {role} model: {e}") from e
    except Exception as e:  # noqa: BLE001 -- transformers, peft and safetensors raise many types for bad files
        first = first_line(e)
        raise ReasonMaxxerError(
            f"{what}: could not load the {role} model {spec!r} ({type(e).__name__}: {first})"
        ) from e


def load_pair(base_spec: str, tuned_spec: str, problems_spec: str, *, template: str, limit, data_dir, what: str):
    """Problems, template, both models (same tokenizer checked) and the rendered prompt ids.

    Returns (problems, template, base, tuned, tokenizer, prompts_ids). Shared by analyze and intervene.
    """
    from ..data.benchmarks import load_problems
    from ..data.prompts import get_template, render_prompt
    from ..models import resolve_spec

    problems = load_problems(problems_spec, data_dir=data_dir, limit=limit)
    if not problems:
        raise ReasonMaxxerError(f"{what}: problem set {problems_spec!r} is empty (limit={limit})")
    tmpl = get_template(template)
    for spec, role in ((base_spec, "base"), (tuned_spec, "tuned")):  # missing files: fail before loading anything
        try:
            resolve_spec(spec)
        except ReasonMaxxerError as e:
            raise ReasonMaxxerError(f"{what}: {role} model: {e}") from e
    base, btok = _load(base_spec, "base", what)
    tuned, ttok = _load(tuned_spec, "tuned", what)
    check_same_tokenizer(btok, ttok)
    vb, vt = base.get_output_embeddings().weight.shape[0], tuned.get_output_embeddings().weight.shape[0]
    if vb != vt:
        raise ReasonMaxxerError(
            f"{what}: the base and tuned models have different output vocabularies "
            f"({vb} vs {vt} logits); token-level comparison needs the same vocabulary"
        )
    prompts = []
    for p in problems:
        ids = list(btok(render_prompt(tmpl, p.question, btok), add_special_tokens=False)["input_ids"])
        if not ids:
            raise ReasonMaxxerError(f"{what}: problem {p.id} renders to an empty prompt")
        prompts.append(ids)
    return problems, tmpl, base, tuned, btok, prompts


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
