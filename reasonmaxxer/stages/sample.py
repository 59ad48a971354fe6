"""stages.sample."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..backends.engines import EngineConfig, MapStats, Progress, map_shards
from ..backends.hf import Completion, HFSampler, Request, SamplingConfig, cut_at_stop
from ..data.problems import Problem, problems_hash
from ..data.prompts import PromptTemplate, render_prompt, template_fingerprint
from ..errors import ReasonMaxxerError
from ..store import RolloutStore, ShardClaims


def _grade_rows(rows: list[dict], workers: int | None) -> None:
    from ..verify import grade_many

    grades = grade_many([r["gold"] for r in rows], [r["completion"] for r in rows], workers=workers)
    for r, g in zip(rows, grades):
        r.update(
            reward=1.0 if g.strict.correct else 0.0,
            strict_correct=g.strict.correct,
            strict_extracted=g.strict.extracted,
            lenient_correct=g.lenient.correct,
            lenient_extracted=g.lenient.extracted,
            grade_reason=g.strict.reason,
        )


@dataclass
class SampleTask:
    """Sample (ungraded) rows for one shard of problems; picklable, so a Ray worker can load
    the model itself from `model_spec` (see `engines`). Grading runs on the driver."""

    model_spec: str
    template: PromptTemplate
    cfg: SamplingConfig
    greedy: bool = False
    sampler: Any = field(default=None, repr=False)  # another backend (vLLM), in-process only: not picklable

    def setup(self, model=None, tokenizer=None) -> None:
        if self.sampler is not None:
            self._tok, self._sampler = tokenizer or self.sampler.tokenizer, self.sampler
            return
        if model is None:
            from ..models import load_model

            model, tokenizer = load_model(self.model_spec)
        self._tok, self._sampler = tokenizer, HFSampler(model, tokenizer)

    def run(self, shard: int, chunk: Sequence[Problem], progress: Progress) -> list[dict]:
        tok = self._tok
        prompts = {p.id: render_prompt(self.template, p.question, tok) for p in chunk}
        enc = {pid: tuple(tok(t, add_special_tokens=False)["input_ids"]) for pid, t in prompts.items()}
        for pid, ids in enc.items():
            if not ids:
                raise ReasonMaxxerError(f"sample: problem {pid} renders to an empty prompt")
        idxs = [-1] if self.greedy else list(range(self.cfg.n))
        reqs = [Request((p.id, s), enc[p.id]) for p in chunk for s in idxs]
        comps = self._sampler.generate(reqs, self.cfg, on_done=lambda c: progress.units(1), progress=progress.tokens)
        # the tokens of a stop string are cut for every backend (vLLM keeps them; HF has cut already)
        comps = [cut_at_stop(tok, c, self.cfg.stop) for c in comps]
        gold = {p.id: p.answer for p in chunk}
        return [_row(c, prompts[c.key[0]], enc[c.key[0]], gold[c.key[0]]) for c in comps]


def resolve_stop(stop: Sequence[str], template: PromptTemplate) -> tuple[str, ...]:
    """The stop strings to sample with: `stop` if given, else the template's; ``""`` entries are
    dropped, so ``("",)`` (``--stop ''``) means none, not even the template's."""
    return tuple(s for s in (stop or template.stop) if s)


def check_backend(backend: str | None, engine: EngineConfig | str | None) -> None:
    """Refuse the Ray engine with a non-HF sampling backend: a vLLM sampler is an engine of its
    own in this process (it parallelises with tensor_parallel_size / data_parallel_size)."""
    name = getattr(engine, "engine", engine) or "local"
    if (backend or "hf") != "hf" and name == "ray":
        raise ReasonMaxxerError(
            f"--engine ray does not apply to --backend {backend}: vLLM runs its own engines "
            "(--tensor-parallel-size, --data-parallel-size); use --engine local"
        )


def record_engine(store: RolloutStore, stats: MapStats, **fields) -> None:
    """Note in the manifest which engine ran and how many workers (outside the config hash)."""
    run = {
        "engine": stats.engine,
        "workers": stats.workers,
        "shards": stats.shards,
        "retries": stats.retries,
        "seconds": stats.seconds,
    }

    def edit(m):
        runs = m.get("engine_runs", []) + [run]
        m.update({"complete": True, **fields, "engine": stats.engine, "workers": stats.workers, "engine_runs": runs})

    store.edit_manifest(edit)  # under the manifest lock: another process may record its run


def sample_stage(
    out: str | Path,
    model_spec: str,
    problems: Sequence[Problem],
    template: PromptTemplate,
    cfg: SamplingConfig,
    *,
    greedy: bool = False,
    shard_size: int = 64,
    overwrite: bool = False,
    model=None,
    tokenizer=None,
    grade_workers: int | None = None,
    progress: bool = True,
    engine: EngineConfig | None = None,
    sampler=None,
    reuse: str | Path | None = None,
) -> RolloutStore:
    """Sample `cfg.n` completions per problem (or one greedy completion), grade them, store them.

    Stop strings: `cfg.stop`, else the template's (`resolve_stop`); the resolved tuple is in
    the config hash, so a template without stops (the chat kinds) keeps its stores' hash.

    Resumable: shards already on disk are skipped. Processes sampling into one store with the
    same inputs split its shards (per-shard locks, `store.ShardClaims`); each shard is computed once. `model`/`tokenizer` may be passed to
    reuse a loaded model (they must be what `model_spec` names; Ray workers load their own).
    `engine` spreads the shards over Ray workers (`engines`); the rows are the same.
    `sampler`: another backend (e.g. `vllm_backend.VLLMSampler` for `model_spec`; default: an
    `HFSampler` on `model`), run in this process (not with the Ray engine); its name is part of
    the config hash and its options are recorded. `reuse`: another store dir (e.g. another run's
    base rollouts) copied here first when this store does not exist yet and it was made with the
    same inputs (`RolloutStore.copy_from`); otherwise ignored. Returns the store.
    """
    if not problems:
        raise ReasonMaxxerError("sample: the problem set is empty")
    check_backend(getattr(sampler, "name", "hf"), engine)
    stop = resolve_stop(cfg.stop, template)
    if greedy or stop != cfg.stop:
        argmax = {"n": 1, "temperature": 0.0}  # (SamplingConfig resets top_p/top_k at temperature 0)
        cfg = SamplingConfig(**{**asdict(cfg), "stop": stop, **(argmax if greedy else {})})
    config, describe = store_config(model_spec, problems, template, cfg, greedy, shard_size, sampler)
    store = RolloutStore(out)
    if reuse is not None:
        store.copy_from(reuse, config)
    store.open(config, describe, overwrite=overwrite)
    shards = [list(problems[i : i + shard_size]) for i in range(0, len(problems), shard_size)]
    done = store.done_shards()
    todo = {i: shards[i] for i in range(len(shards)) if i not in done}
    if not todo:
        store.update_manifest(complete=True, generated_tokens_last_run=0)
        return store

    def write(i, rows):
        _grade_rows(rows, grade_workers)
        store.write_shard(i, rows)

    stats = map_shards(
        SampleTask(model_spec, template, cfg, greedy, sampler),
        todo,
        engine,
        write,
        total=sum(len(c) for c in todo.values()) * cfg.n,
        desc=f"sample {Path(out).name}",
        progress=progress,
        model=model,
        tokenizer=tokenizer,
        claims=ShardClaims(store),
    )
    record_engine(
        store,
        stats,
        sample_seconds=stats.seconds,
        generated_tokens=stats.tokens,
        generated_tokens_last_run=stats.tokens,
    )
    return store


def store_config(
    model_spec: str,
    problems: Sequence[Problem],
    template: PromptTemplate,
    cfg: SamplingConfig,
    greedy: bool,
    shard_size: int,
    sampler=None,
) -> tuple[dict, dict]:
    """The rollout store's config (what its hash covers; `cfg` with its stop strings resolved)
    and description, for `sample_stage`. A non-HF `sampler` must serve `model_spec`."""
    from ..models import model_fingerprint

    backend = getattr(sampler, "name", "hf")
    config = {
        "stage": "sample",
        "model": model_fingerprint(model_spec),
        "template": {"name": template.name, "fingerprint": template_fingerprint(template)},
        "sampling": asdict(cfg),
        "greedy": greedy,
        "data_hash": problems_hash(problems),
        "n_problems": len(problems),
        "shard_size": shard_size,
    }
    describe = {"model_spec": model_spec, "template_text": template.template}
    if backend != "hf":  # the HF backend stays implicit, so existing stores keep their hash
        if sampler.spec != model_spec:
            raise ReasonMaxxerError(f"sample: the {backend} sampler serves {sampler.spec}, not {model_spec}")
        config["backend"] = backend
        describe["backend"] = sampler.describe()
    return config, describe


def _row(c: Completion, prompt: str, prompt_ids, gold: str) -> dict:
    return {
        "problem_id": c.key[0],
        "sample_index": c.key[1],
        "prompt": prompt,
        "prompt_ids": list(prompt_ids),
        "completion": c.text,
        "token_ids": c.token_ids,
        "logprobs": c.logprobs,
        "entropies": c.entropies,
        "finish_reason": c.finish_reason,
        "truncated": c.truncated,
        "gold": gold,
    }


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
