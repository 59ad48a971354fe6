"""Pipeline stages as library functions: sample (+grade) into a store, evaluate a store.

Each stage writes a self-describing artifact and is a no-op when re-run with the same
inputs (see `store.RolloutStore`). The CLI is a thin layer over these functions.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from .data import Problem, problems_hash
from .errors import ReasonMaxxerError
from .prompts import PromptTemplate, render_prompt, template_fingerprint
from .sampling import Completion, HFSampler, Request, SamplingConfig
from .store import RolloutStore


def _grade_rows(rows: list[dict], workers: int | None) -> None:
    from .verify import grade_many

    grades = grade_many([r["gold"] for r in rows], [r["completion"] for r in rows], workers=workers)
    for r, g in zip(rows, grades):
        r.update(reward=1.0 if g.strict.correct else 0.0, strict_correct=g.strict.correct,
                 strict_extracted=g.strict.extracted, lenient_correct=g.lenient.correct,
                 lenient_extracted=g.lenient.extracted, grade_reason=g.strict.reason)


def sample_stage(out: str | Path, model_spec: str, problems: Sequence[Problem], template: PromptTemplate,
                 cfg: SamplingConfig, *, greedy: bool = False, shard_size: int = 64, overwrite: bool = False,
                 model=None, tokenizer=None, grade_workers: int | None = None, progress: bool = True,
                 sampler=None) -> RolloutStore:
    """Sample `cfg.n` completions per problem (or one greedy completion), grade them, store them.

    Resumable: shards already on disk are skipped. `model`/`tokenizer` may be passed to
    reuse a loaded model (they must be what `model_spec` names). `sampler`: another backend
    (e.g. `vllm_backend.VLLMSampler` for `model_spec`; default: an `HFSampler` on `model`);
    its name is part of the config hash and its options are recorded. Returns the store.
    """
    from .models import load_model, model_fingerprint

    if not problems:
        raise ReasonMaxxerError("sample: the problem set is empty")
    if greedy:
        cfg = SamplingConfig(**{**asdict(cfg), "n": 1, "temperature": 0.0})
    store = RolloutStore(out)
    config = {"stage": "sample", "model": model_fingerprint(model_spec),
              "template": {"name": template.name, "fingerprint": template_fingerprint(template)},
              "sampling": asdict(cfg), "greedy": greedy, "data_hash": problems_hash(problems),
              "n_problems": len(problems), "shard_size": shard_size}
    describe = {"model_spec": model_spec, "template_text": template.template}
    backend = getattr(sampler, "name", "hf")
    if backend != "hf":   # the HF backend stays implicit, so existing stores keep their hash
        if sampler.spec != model_spec:
            raise ReasonMaxxerError(f"sample: the {backend} sampler serves {sampler.spec}, not {model_spec}")
        config["backend"] = backend
        describe["backend"] = sampler.describe()
    store.open(config, describe, overwrite=overwrite)
    shards = [list(problems[i:i + shard_size]) for i in range(0, len(problems), shard_size)]
    todo = [i for i in range(len(shards)) if i not in store.done_shards()]
    if not todo:
        store.update_manifest(complete=True, generated_tokens_last_run=0)
        return store
    if sampler is not None:
        tokenizer = tokenizer or sampler.tokenizer
    else:
        if model is None:
            model, tokenizer = load_model(model_spec)
        sampler = HFSampler(model, tokenizer)
    total = sum(len(shards[i]) for i in todo) * cfg.n
    bar = tqdm(total=total, desc=f"sample {Path(out).name}", unit="seq", disable=not progress, dynamic_ncols=True)
    t0 = time.time()
    state = {"ntok": 0}

    def on_tokens(k):
        state["ntok"] += k
        el = time.time() - t0
        if el > 0:
            bar.set_postfix_str(f"{state['ntok'] / el:.0f} tok/s", refresh=False)

    try:
        for i in todo:
            chunk = shards[i]
            prompts = {p.id: render_prompt(template, p.question, tokenizer) for p in chunk}
            enc = {pid: tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for pid, t in prompts.items()}
            for pid, ids in enc.items():
                if not ids:
                    raise ReasonMaxxerError(f"sample: problem {pid} renders to an empty prompt")
            idxs = [-1] if greedy else list(range(cfg.n))
            reqs = [Request((p.id, s), enc[p.id]) for p in chunk for s in idxs]
            comps = sampler.generate(reqs, cfg, on_done=lambda c: bar.update(1), progress=on_tokens)
            gold = {p.id: p.answer for p in chunk}
            rows = [_row(c, prompts[c.key[0]], enc[c.key[0]], gold[c.key[0]]) for c in comps]
            _grade_rows(rows, grade_workers)
            store.write_shard(i, rows)
    finally:
        bar.close()
    store.update_manifest(complete=True, sample_seconds=round(time.time() - t0, 2), generated_tokens=state["ntok"],
                          generated_tokens_last_run=state["ntok"])
    return store


def _row(c: Completion, prompt: str, prompt_ids, gold: str) -> dict:
    return {"problem_id": c.key[0], "sample_index": c.key[1], "prompt": prompt, "prompt_ids": list(prompt_ids),
            "completion": c.text, "token_ids": c.token_ids, "logprobs": c.logprobs, "entropies": c.entropies,
            "finish_reason": c.finish_reason, "truncated": c.truncated, "gold": gold}


def regrade_store(store: RolloutStore, grade_workers: int | None = None) -> int:
    """Grade (again) every rollout in a store, rewriting shards atomically. Returns rows graded."""
    n = 0

    def fn(rows):
        nonlocal n
        _grade_rows(rows, grade_workers)
        n += len(rows)
        return rows

    store.manifest()
    store.rewrite_shards(fn)
    return n


def evaluate_stores(sampled: RolloutStore | None, greedy: RolloutStore | None, problems: Sequence[Problem],
                    *, ks=(1, 4, 8, 16), label: str = ""):
    """An `evaluate.EvalReport` over a sampled store and/or a greedy store."""
    from .evaluate import evaluate

    cols = ["problem_id", "sample_index", "strict_correct", "lenient_correct", "strict_extracted",
            "lenient_extracted", "truncated"]
    meta = {p.id: p.metadata for p in problems}
    rows = sampled.read_rows(cols) if sampled else None
    grows = greedy.read_rows(cols) if greedy else None
    if rows is None:
        rows = grows  # greedy-only evaluation: the greedy completions are the samples
    return evaluate(rows, meta, ks=ks, greedy_rows=grows, label=label)
