"""Held-out evaluation of a model: decode the problems (`ecfg.n` samples and/or one greedy
completion each, through `stages.sample.sample_stage`), grade them, and report.

`evaluate_model` writes the rollout stores and eval.json / eval.md, `evaluate_stores` evaluates
existing stores, `validation_accuracy_fn` is the strict accuracy (greedy, or one sample) used
to pick a checkpoint, and `weights_record` says which weights a report is of. The metrics themselves (pass@1 as avg@n,
unbiased pass@k, maj@k, intervals, `EvalReport`, `to_markdown`, `save_report`) are in
`stages.eval_metrics` and re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..backends.distributed import rank_world, sharded_map
from ..backends.hf import HFSampler, Request, SamplingConfig
from ..data.problems import Problem, problems_hash
from ..data.prompts import render_prompt
from ..schema import check_fields
from ..store import RolloutStore
from .eval_metrics import (
    BREAKDOWN_KEYS,
    MISSING_GROUP,
    MODES,
    ROW_FIELDS,
    Estimate,
    EvalReport,
    GroupMetrics,
    ModeMetrics,
    evaluate,
    maj_at_k,
    normalize_answer,
    save_report,
    to_markdown,
)

__all__ = [
    "BREAKDOWN_KEYS",
    "MISSING_GROUP",
    "MODES",
    "ROW_FIELDS",
    "EvalConfig",
    "Estimate",
    "EvalReport",
    "GroupMetrics",
    "HFSampler",
    "ModeMetrics",
    "evaluate",
    "evaluate_model",
    "evaluate_stores",
    "validation_accuracy_fn",
    "maj_at_k",
    "normalize_answer",
    "save_report",
    "to_markdown",
    "weights_record",
]


@dataclass(frozen=True)
class EvalConfig:
    n: int = field(default=4, metadata={"help": "samples per test problem for avg@n (0 = greedy only)", "ge": 0})
    temperature: float = field(default=0.7, metadata={"help": "temperature of the avg@n samples", "ge": 0})
    top_p: float = field(
        default=1.0, metadata={"help": "nucleus sampling mass of the avg@n samples (1 = off)", "gt": 0, "le": 1}
    )
    greedy: bool = field(default=True, metadata={"help": "also decode greedily"})
    max_new_tokens: int = field(default=256, metadata={"help": "completion length cap, tokens", "ge": 1})
    batch_size: int = field(default=32, metadata={"help": "rows decoded together", "ge": 1})
    seed: int = field(default=1234, metadata={"help": "sampling seed"})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "stop strings (default: the template's; '' = none)"})

    def __post_init__(self):
        check_fields(self, "eval")


def evaluate_stores(
    sampled: RolloutStore | None,
    greedy: RolloutStore | None,
    problems: Sequence[Problem],
    *,
    ks=(1, 4, 8, 16),
    label: str = "",
):
    """An `EvalReport` over a sampled store and/or a greedy store."""
    cols, lengths = list(ROW_FIELDS), ["token_ids"]  # token_ids: the samples' mean completion length
    meta = {p.id: p.metadata for p in problems}
    rows = sampled.read_rows(cols + lengths) if sampled else None
    grows = greedy.read_rows(cols + ([] if sampled else lengths)) if greedy else None
    if rows is None:
        rows = grows  # greedy-only evaluation: the greedy completions are the samples
    return evaluate(rows, meta, ks=ks, greedy_rows=grows, label=label)


def validation_accuracy_fn(
    problems,
    template,
    tokenizer,
    max_new_tokens: int,
    batch_size: int,
    stop=(),
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
):
    """validate(model) -> strict accuracy of one completion per problem of `problems` (used to
    pick the checkpoint): greedy (temperature 0, the default), or sampled at `temperature` /
    `top_p` (the official recipe: 0.6 / 0.95). A sample's random numbers depend only on
    (seed, problem), so every checkpoint is validated with the same ones.

    `stop`: stop strings, default the template's (as in `stages.sample.resolve_stop`). Under
    `accelerate launch` every process calls it (the problems are split, the accuracy gathered)."""
    from ..verify import grade_many
    from .sample import resolve_stop

    enc = [
        tuple(tokenizer(render_prompt(template, p.question, tokenizer), add_special_tokens=False)["input_ids"])
        for p in problems
    ]
    cfg = SamplingConfig(
        n=1,
        temperature=temperature,
        top_p=top_p,  # ignored (reset) when greedy
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        stop=resolve_stop(stop, template),
    )

    def validate(model) -> float:
        def correct(batch: list) -> list[bool]:
            comps = HFSampler(model, tokenizer).generate([Request((p.id, -1), e) for p, e in batch], cfg)
            grades = grade_many([p.answer for p, _ in batch], [c.text for c in comps], workers=0)
            return [bool(g.strict.correct) for g in grades]

        items = list(zip(problems, enc))
        # one process: one call over all problems, as before; under `accelerate launch` every
        # process calls validate and decodes every N-th batch of `batch_size` problems (collective)
        ok = correct(items) if rank_world()[1] == 1 else sharded_map(items, batch_size, correct)
        return sum(ok) / len(ok)

    # what the accuracy depends on (train records it: a run resumed with another validation would
    # mix accuracies, and a finished one would keep a checkpoint chosen by the old one)
    validate.key = {
        "problems": problems_hash(problems),
        "n": len(problems),
        "template": template.name,
        **{k: getattr(cfg, k) for k in ("temperature", "top_p", "max_new_tokens")},
        "seed": cfg.seed if cfg.temperature > 0 else None,  # greedy draws no random numbers
        "stop": list(cfg.stop),
    }
    return validate


def evaluate_model(
    model,
    tokenizer,
    spec: str,
    problems,
    template,
    ecfg: EvalConfig,
    out_dir: str | Path,
    *,
    label: str = "",
    overwrite: bool = False,
    progress: bool = True,
    engine=None,
    sampler=None,
    reuse: str | Path | None = None,
):
    """Held-out evaluation of one model: `ecfg.n` samples and/or one greedy completion per problem.

    Writes ``out_dir/samples``, ``out_dir/greedy`` (rollout stores; a re-run with the same
    weights is a no-op) and ``eval.json``/``eval.md``. `spec` names the weights for the
    stores' manifests. `engine` (Ray) or `sampler` (another backend serving `spec`, e.g. a
    `vllm_backend.VLLMSampler`; then `model` may be None): see `stages.sample_stage`. `reuse`:
    another evaluation's dir whose stores are copied when made with the same inputs (`sample_stage`).
    Returns (EvalReport, (sampled store | None, greedy store | None)).
    """
    from .sample import sample_stage

    d = Path(out_dir)
    scfg = SamplingConfig(
        n=max(ecfg.n, 1),
        temperature=ecfg.temperature,
        top_p=ecfg.top_p,
        max_new_tokens=ecfg.max_new_tokens,
        batch_size=ecfg.batch_size,
        seed=ecfg.seed,
        stop=ecfg.stop,  # () -> the template's (sample_stage resolves it)
    )
    kw = dict(model=model, tokenizer=tokenizer, overwrite=overwrite, progress=progress, engine=engine, sampler=sampler)
    r = Path(reuse) if reuse is not None else None
    s_store = (
        sample_stage(d / "samples", spec, problems, template, scfg, reuse=r and r / "samples", **kw)
        if ecfg.n > 0
        else None
    )
    g_store = (
        sample_stage(d / "greedy", spec, problems, template, scfg, greedy=True, reuse=r and r / "greedy", **kw)
        if ecfg.greedy
        else None
    )
    rep = evaluate_stores(
        s_store, g_store, problems, ks=tuple(k for k in (1, 2, 4, 8) if k <= max(ecfg.n, 1)), label=label or spec
    )
    rep = replace(rep, weights=weights_record(model, spec, sampler))
    save_report(rep, d / "eval.json", d / "eval.md")
    return rep, (s_store, g_store)


def weights_record(model, spec: str, sampler=None) -> dict:
    """What an evaluation ran: the spec, its kind (a PEFT adapter served on its base, a merged
    or plain checkpoint, ...), the weights' dtype and the backend that served them. bf16 moves
    ~1% of a tuned model's argmax either way, so eval.json says which the figures are of."""
    from ..models import resolve_spec

    try:
        kind = resolve_spec(spec).kind
    except Exception:  # noqa: BLE001 - a record, not a check: the stores already loaded it
        kind = "unknown"
    if kind == "hf_dir" and Path(spec).name == "merged":
        kind = "merged checkpoint"
    elif kind == "adapter" or hasattr(model, "peft_config"):
        kind = "adapter (unmerged, on its base)"
    if sampler is not None:
        opts = getattr(sampler, "options", None)
        return {
            "spec": spec,
            "kind": kind,
            "dtype": getattr(opts, "dtype", "unknown"),
            "served_by": type(sampler).__name__,
        }
    dtype = str(next(model.parameters()).dtype).replace("torch.", "") if model is not None else "unknown"
    return {"spec": spec, "kind": kind, "dtype": dtype, "served_by": "HFSampler"}
