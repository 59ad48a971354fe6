"""Causal checks of a tuned model against its base ("oracle interventions", method.md section 2).

What it does, exactly:

`mixed_decode` runs the BASE and the TUNED model side by side, greedily, over the same prefix.
At every step both models produce next-token logits for the prefix decoded so far, and a *rule*
(a pure function of those logits) picks the token that is emitted and appended for BOTH models:

  base_greedy          argmax base
  tuned_greedy         argmax tuned
  oracle               argmax base, except where argmax tuned != argmax base: emit argmax tuned
  random_control(s)    as oracle, but at those positions emit a uniformly random token from base's
                       top-20 other than the base argmax (ranks 2..20)
  entropy_gated(tau)   argmax tuned where the base entropy (nats, full vocabulary) > tau, else base
  cross_forward(eps)   argmax tuned where JS(base, tuned) > eps (nats), else argmax base
  cross_reverse(eps)   argmax tuned (the tuned model decodes), but argmax base where JS > eps

"touched" has ONE meaning for every rule: the emitted token differs from the base argmax at
that step (the generation departed from what the base would have said there). For the oracle
and the random control that is exactly "the tuned argmax differs"; for cross_reverse it counts
the positions where the tuned model's own token survived and differs from the base's.

`run_intervene` runs every condition on a problem set, grades the greedy completions strictly
(`verify.grade_many(workers=0)`) and writes intervene.json / intervene.md and two plots:
tau_sweep.png (touched % vs pass@1 over tau) and intervene_bars.png (pass@1 per condition, the
random control as mean ± std over seeds, each bar annotated with the % of positions touched);
the table and the plots are drawn by `intervene_report`.

Limitations, honestly:
- All decoding is greedy. Under greedy decoding the oracle emits argmax tuned at EVERY step
  (where the two agree, argmax base IS argmax tuned), so its trajectory is the tuned greedy
  trajectory by construction; likewise entropy_gated(tau < 0) and cross_forward(eps < 0). The
  informative numbers are therefore the touched fractions and the random / entropy-gated rows,
  not oracle == tuned (the paper's claim is checked trivially here).
- Ties follow ``torch.argmax`` (first index wins), in fp32 on the logits each model returns.
- The random control draws from per-row ``torch.Generator``s seeded with
  ``seed * 1_000_003 + row`` (row = index of the prompt in ``prompts_ids``), so a condition is
  reproducible and independent of batch size; a draw is made only at touched positions.
- Rows stop at EOS (kept as the last token) or at max_new_tokens, or earlier where the model's
  ``max_position_embeddings`` would be exceeded (finish_reason "length" in both cases).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.entropy import token_entropy
from ..core.padding import pad_left
from ..errors import ReasonMaxxerError
from ..models import cache_kwarg, model_device
from .intervene_report import plot_intervention_bars, plot_tau_sweep, render_markdown
from .shared import jsonable, load_pair

RANDOM_TOP_K = 20


PAPER = {
    "oracle": "= tuned pass@1 on every pair",
    "random_control": "<= base (often worse)",
    "entropy_gated": "tau = 1.2 nats: matches or approaches tuned, touching 1.2-8.3% of tokens",
}


# -- rules: pure functions of (step, base_logits [b, V], tuned_logits [b, V], rng) ---------------
def _js(base_logits: Tensor, tuned_logits: Tensor) -> Tensor:
    """Jensen-Shannon divergence [b] (nats, <= ln 2) between softmax rows of two [b, V] logits."""
    lp = torch.log_softmax(base_logits.float(), -1)  # [b, V]
    lq = torch.log_softmax(tuned_logits.float(), -1)  # [b, V]
    lm = torch.logaddexp(lp, lq) - math.log(2.0)  # [b, V] log m
    p, q = lp.exp(), lq.exp()
    kl_pm = torch.where(p > 0, p * (lp - lm), 0.0).sum(-1)  # [b]
    kl_qm = torch.where(q > 0, q * (lq - lm), 0.0).sum(-1)  # [b]
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0)


@dataclass(frozen=True)
class Rule:
    """A named per-step decision rule; ``param`` is tau / eps / None, ``seed`` seeds random rows."""

    name: str
    param: float | None = None
    seed: int = 0

    @property
    def label(self) -> str:
        if self.name == "random_control":
            return f"random_control(seed={self.seed})"
        return self.name if self.param is None else f"{self.name}({self.param:g})"

    def __call__(
        self, step: int, base_logits: Tensor, tuned_logits: Tensor, rng: list[torch.Generator] | None = None
    ) -> tuple[Tensor, Tensor]:
        """base_logits, tuned_logits: [b, V]. rng: one generator per row (random_control only).
        Returns (token ids [b] long, touched [b] bool = emitted != base argmax)."""
        ba = base_logits.argmax(-1)  # [b]
        ta = tuned_logits.to(ba.device).argmax(-1)  # [b]
        n = self.name
        if n == "base_greedy":
            tok = ba
        elif n in ("tuned_greedy", "oracle"):
            tok = torch.where(ta != ba, ta, ba)  # == ta; kept explicit for oracle
        elif n == "random_control":
            tok = ba.clone()
            diff = (ta != ba).nonzero().flatten().tolist()
            if diff:
                if rng is None or len(rng) != len(ba):
                    raise ReasonMaxxerError("random_control needs one torch.Generator per row")
                k = min(RANDOM_TOP_K, base_logits.shape[-1])
                if k < 2:
                    raise ReasonMaxxerError("random_control needs a vocabulary of at least 2 tokens")
                top = torch.topk(base_logits[diff].float(), k, dim=-1).indices.cpu()  # [d, k]
                for j, r in enumerate(diff):
                    pick = 1 + int(torch.randint(k - 1, (1,), generator=rng[r]))  # rank 2..k
                    cand = top[j, pick]
                    if cand == ba[r].item():  # tie reordering: never the argmax
                        cand = top[j, 0]
                    tok[r] = cand
        elif n == "entropy_gated":
            gate = token_entropy(base_logits).to(ba.device) > self.param  # [b]
            tok = torch.where(gate, ta, ba)
        elif n == "cross_forward":
            tok = torch.where(_js(base_logits, tuned_logits.to(base_logits.device)).to(ba.device) > self.param, ta, ba)
        elif n == "cross_reverse":
            tok = torch.where(_js(base_logits, tuned_logits.to(base_logits.device)).to(ba.device) > self.param, ba, ta)
        else:
            raise ReasonMaxxerError(f"intervene: unknown rule {n!r}; valid: {', '.join(RULES)}")
        return tok, tok != ba


RULES = ("base_greedy", "tuned_greedy", "oracle", "random_control", "entropy_gated", "cross_forward", "cross_reverse")


def base_greedy() -> Rule:
    return Rule("base_greedy")


def tuned_greedy() -> Rule:
    return Rule("tuned_greedy")


def oracle() -> Rule:
    return Rule("oracle")


def random_control(seed: int = 0) -> Rule:
    return Rule("random_control", seed=int(seed))


def entropy_gated(tau: float) -> Rule:
    return Rule("entropy_gated", float(tau))


def cross_forward(eps: float) -> Rule:
    return Rule("cross_forward", float(eps))


def cross_reverse(eps: float) -> Rule:
    return Rule("cross_reverse", float(eps))


# -- the two-model decoder ------------------------------------------------------------------------
def _row_generator(seed: int, row: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(row))


@dataclass(frozen=True)
class _Stream:
    """One model of the pair with its device and KV-cache keyword (looked up once per decode)."""

    model: Any
    dev: torch.device
    kw: str

    @classmethod
    def of(cls, model) -> _Stream:
        return cls(model, model_device(model), cache_kwarg(model))

    def logits(self, cache, ids: Tensor, att: Tensor, pos: Tensor) -> Tensor:
        """One cached forward over ids/att/pos [b, L]; fp32 next-token logits [b, V] of the last column."""
        out = self.model(
            input_ids=ids.to(self.dev),
            attention_mask=att.to(self.dev),
            position_ids=pos.to(self.dev),
            use_cache=True,
            logits_to_keep=1,
            **{self.kw: cache},
        )
        return out.logits[:, -1, :].float()  # [b, V]


@torch.no_grad()
def mixed_decode(
    base,
    tuned,
    prompts_ids: list[list[int]],
    rule: Callable,
    *,
    max_new_tokens: int = 256,
    eos_ids: set[int],
    batch_size: int = 8,
    tokenizer=None,
    pad_id: int = 0,
) -> list[dict]:
    """Greedy two-model decode; ``rule(step, base_logits [b, V], tuned_logits [b, V], rng)`` ->
    (tokens [b], touched [b] bool) picks each emitted token, fed to both models.

    Batches are left-padded with an attention mask and explicit position ids; each model keeps
    its own HF DynamicCache. ``rng`` is a list of per-row generators seeded from
    (``rule.seed``, prompt index) (see module docstring). Returns one record per prompt, in order:
    {"token_ids", "text" (decoded, special tokens skipped; None without a tokenizer),
    "touched" [bool per token], "finish_reason" ("eos" | "length"), "prompt_len"}.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ReasonMaxxerError(
            f"intervene: max_new_tokens and batch_size must be >= 1 (got {max_new_tokens}, {batch_size})"
        )
    if not prompts_ids or any(len(p) == 0 for p in prompts_ids):
        raise ReasonMaxxerError("intervene: need at least one prompt, and no empty prompts")
    limits = _new_token_limits(base, tuned, prompts_ids, max_new_tokens)
    pair = (_Stream.of(base), _Stream.of(tuned))
    seed = getattr(rule, "seed", 0)
    records: list[dict] = [None] * len(prompts_ids)  # type: ignore[list-item]
    for s in range(0, len(prompts_ids), batch_size):
        rows = list(range(s, min(s + batch_size, len(prompts_ids))))
        rng = [_row_generator(seed, r) for r in rows]
        prompts = [prompts_ids[r] for r in rows]
        toks, touched, done = _decode_batch(*pair, prompts, rule, rng, [limits[r] for r in rows], eos_ids, pad_id)
        for j, r in enumerate(rows):
            text = tokenizer.decode(toks[j], skip_special_tokens=True) if tokenizer is not None else None
            records[r] = {
                "token_ids": toks[j],
                "text": text,
                "touched": touched[j],
                "finish_reason": done[j] or "length",
                "prompt_len": len(prompts_ids[r]),
            }
    return records


def _new_token_limits(base, tuned, prompts_ids: list[list[int]], max_new_tokens: int) -> list[int]:
    """Per prompt: max_new_tokens, capped so that neither model's ``max_position_embeddings`` is
    exceeded; a prompt that already fills a model's positions is a ReasonMaxxerError."""
    limits = [max_new_tokens] * len(prompts_ids)
    for name, m in (("base", base), ("tuned", tuned)):
        maxpos = getattr(m.config, "max_position_embeddings", None)
        if maxpos:
            for i, p in enumerate(prompts_ids):
                if len(p) >= maxpos:
                    raise ReasonMaxxerError(
                        f"intervene: prompt {i} has {len(p)} tokens; the {name} model has only {maxpos} positions"
                    )
                limits[i] = min(limits[i], maxpos - len(p))
    return limits


def _decode_batch(
    base: _Stream,
    tuned: _Stream,
    prompts: list[list[int]],
    rule: Callable,
    rng: list[torch.Generator],
    limits: list[int],
    eos_ids: set[int],
    pad_id: int,
) -> tuple[list[list[int]], list[list[bool]], list[str | None]]:
    """Decode one batch of prompts (left-padded) step by step under `rule` until every row is done.

    Returns per row: the emitted token ids, whether each was touched, and the finish reason
    ("eos", "length", or None if the step loop ran out first)."""
    from transformers import DynamicCache

    ids, att = pad_left(prompts, pad_id)  # [b, P] left-padded
    pos = (att.cumsum(-1) - 1).clamp_min(0)  # [b, P]
    next_pos = pos[:, -1] + 1  # [b]
    caches = (DynamicCache(), DynamicCache())
    toks: list[list[int]] = [[] for _ in prompts]
    touched: list[list[bool]] = [[] for _ in prompts]
    done: list[str | None] = [None] * len(prompts)
    lb = base.logits(caches[0], ids, att, pos)
    lt = tuned.logits(caches[1], ids, att, pos)
    for step in range(max(limits)):
        tok, hit = rule(step, lb, lt.to(lb.device), rng)
        tok, hit = tok.cpu(), hit.cpu()
        _append_step(tok, hit, toks, touched, done, limits, eos_ids)
        if all(done):
            break
        feed = torch.where(torch.tensor([d is None for d in done]), tok, pad_id)[:, None]  # [b, 1]
        att = torch.cat([att, torch.ones((len(prompts), 1), dtype=torch.long)], 1)  # [b, P+step+1]
        p1 = next_pos[:, None].clone()  # [b, 1]
        next_pos = next_pos + 1
        lb = base.logits(caches[0], feed, att, p1)
        lt = tuned.logits(caches[1], feed, att, p1)
    return toks, touched, done


def _append_step(tok: Tensor, hit: Tensor, toks: list, touched: list, done: list, limits: list[int], eos_ids) -> None:
    """Append one step's token and touched flag to every row not yet done; mark a row "eos" when
    it emitted an EOS id, "length" when it reached its limit (in place)."""
    for j in range(len(done)):
        if done[j]:
            continue
        t = int(tok[j])
        toks[j].append(t)
        touched[j].append(bool(hit[j]))
        if t in eos_ids:
            done[j] = "eos"
        elif len(toks[j]) >= limits[j]:
            done[j] = "length"


# -- the experiment --------------------------------------------------------------------------------
def _touched_pct(records: list[dict]) -> float:
    n = sum(len(r["touched"]) for r in records)
    return 100.0 * sum(sum(r["touched"]) for r in records) / n if n else float("nan")


def _spread(xs: list[float]) -> dict:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd, "min": min(xs), "max": max(xs), "values": xs}


def _eos_ids(model, tokenizer) -> set[int]:
    eos = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        e = getattr(src, "eos_token_id", None)
        if e is not None:
            eos.update(e if isinstance(e, (list, tuple)) else [e])
    return eos


def run_intervene(
    base_spec: str,
    tuned_spec: str,
    problems_spec: str,
    out_dir,
    *,
    template: str = "fewshot",
    limit: int | None = None,
    max_new_tokens: int = 256,
    taus=(0.5, 1.0, 1.5, 2.0, 2.5),
    random_seeds=(0, 1, 2),
    js_eps: float = 0.1,
    data_dir=None,
    batch_size: int = 8,
) -> dict:
    """Run every condition, grade strictly, write out_dir/intervene.json, intervene.md,
    tau_sweep.png and intervene_bars.png (atomically). Returns {"config", "rows", "tau_sweep", "paths"}."""
    if not random_seeds:
        raise ReasonMaxxerError("intervene: random_seeds must name at least one seed")
    problems, tmpl, base, tuned, btok, prompts = load_pair(
        base_spec, tuned_spec, problems_spec, template=template, limit=limit, data_dir=data_dir, what="intervene"
    )
    run = _condition_runner(base, tuned, btok, prompts, [p.answer for p in problems], max_new_tokens, batch_size)
    res = {"base": run(base_greedy()), "tuned": run(tuned_greedy()), "oracle": run(oracle())}
    rnd = [run(random_control(s)) for s in random_seeds]
    sweep = [{"tau": float(t), **run(entropy_gated(t))} for t in taus]
    fwd, rev = run(cross_forward(js_eps)), run(cross_reverse(js_eps))
    rows = _result_rows(res, rnd, random_seeds, sweep, fwd, rev, js_eps)
    config = {
        "base": base_spec,
        "tuned": tuned_spec,
        "problems": problems_spec,
        "limit": limit,
        "n_problems": len(problems),
        "template": tmpl.name,
        "max_new_tokens": max_new_tokens,
        "taus": [float(t) for t in taus],
        "random_seeds": [int(s) for s in random_seeds],
        "random_top_k": RANDOM_TOP_K,
        "js_eps": js_eps,
        "batch_size": batch_size,
        "decoding": "greedy, two models, rule per step",
        "grading": "strict",
        "touched": "emitted token != base argmax",
        "problem_ids": [p.id for p in problems],
    }
    paths = _write_outputs(Path(out_dir), config, rows, sweep, res["base"]["pass_at_1"], res["tuned"]["pass_at_1"])
    return {"config": config, "rows": rows, "tau_sweep": sweep, "paths": {k: str(v) for k, v in paths.items()}}


def _condition_runner(
    base, tuned, tokenizer, prompts: list[list[int]], golds: list, max_new_tokens: int, batch_size: int
) -> Callable[[Rule], dict]:
    """run(rule) -> one condition's result: `mixed_decode` of every prompt under `rule`, graded
    strictly: {"pass_at_1", "touched_pct", "n_tokens", "truncated", "correct" (per problem)}."""
    from ..verify import grade_many

    eos = _eos_ids(base, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)

    def run(rule: Rule) -> dict:
        recs = mixed_decode(
            base,
            tuned,
            prompts,
            rule,
            max_new_tokens=max_new_tokens,
            eos_ids=eos,
            batch_size=batch_size,
            tokenizer=tokenizer,
            pad_id=pad,
        )
        grades = grade_many(golds, [r["text"] for r in recs], workers=0)
        correct = [bool(g.strict.correct) for g in grades]
        return {
            "pass_at_1": sum(correct) / len(correct),
            "touched_pct": _touched_pct(recs),
            "n_tokens": sum(len(r["token_ids"]) for r in recs),
            "truncated": sum(r["finish_reason"] == "length" for r in recs),
            "correct": correct,
        }

    return run


def _result_rows(
    res: dict, rnd: list[dict], random_seeds, sweep: list[dict], fwd: dict, rev: dict, js_eps: float
) -> list[dict]:
    """The results table, one row per condition in report order: base, tuned, oracle, the random
    control (mean / std over seeds, each seed kept), the tau sweep, cross forward / reverse."""
    rows = [
        {"condition": "base (greedy)", **res["base"]},
        {"condition": "tuned (greedy)", **res["tuned"]},
        {"condition": "oracle", **res["oracle"], "paper": "= tuned"},
        {
            "condition": f"random control ({len(rnd)} seeds)",
            "pass_at_1": _spread([r["pass_at_1"] for r in rnd]),
            "touched_pct": _spread([r["touched_pct"] for r in rnd]),
            "paper": "<= base",
            "per_seed": [{"seed": int(s), **r} for s, r in zip(random_seeds, rnd)],
        },
    ]
    rows += [
        {
            "condition": f"entropy-gated tau={r['tau']:g}",
            **r,
            "paper": "tau = 1.2: ~ tuned, 1.2-8.3% touched" if i == 0 else "",
        }
        for i, r in enumerate(sweep)
    ]
    rows += [
        {"condition": f"cross forward (JS > {js_eps:g})", **fwd},
        {"condition": f"cross reverse (JS > {js_eps:g})", **rev},
    ]
    return rows


def _write_outputs(
    out: Path, config: dict, rows: list[dict], sweep: list[dict], base_pass: float, tuned_pass: float
) -> dict[str, Path]:
    """Write intervene.json, intervene.md, tau_sweep.png and intervene_bars.png under `out`
    (atomically); returns their paths by kind ("json", "md", "plot", "bars")."""
    from ..io import atomic_write_bytes, atomic_write_json

    paths = {
        "json": out / "intervene.json",
        "md": out / "intervene.md",
        "plot": out / "tau_sweep.png",
        "bars": out / "intervene_bars.png",
    }
    atomic_write_json(paths["json"], jsonable({"config": config, "rows": rows, "tau_sweep": sweep, "paper": PAPER}))
    atomic_write_bytes(paths["md"], render_markdown(rows, config).encode())
    plot_tau_sweep(sweep, base_pass, tuned_pass, paths["plot"])
    plot_intervention_bars(rows, paths["bars"])
    return paths
