"""Commands that sample, score, grade and evaluate: `models`, `sample`, `score`, `grade`, `eval`."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ReasonMaxxerError
from .options import engine_config, problems_from, sampler_for, sampling_config, set_threads, slug, store_model


def cmd_models(a):
    """`models`: list the embedded models, or convert one (--convert)."""
    from ..models import convert_gguf, list_models, resolve_spec

    if a.convert:
        r = resolve_spec(a.convert)
        if r.kind not in ("alias", "gguf"):
            raise ReasonMaxxerError(f"{a.convert}: only an alias or a .gguf file can be converted")
        print(convert_gguf(Path(r.path)))
        return
    for row in list_models():
        if row["installed"]:
            state = "converted" if row["converted"] else "not converted yet (first load takes ~25 s)"
            print(
                f"{row['alias']}: installed, {state}\n  gguf:  {row['gguf']}\n  cache: {row['cache']}\n  hub:   {row['hub_id']}"
            )
        else:
            print(f"{row['alias']}: NOT installed: run `{row['install']}` (hub: {row['hub_id']})")


def cmd_sample(a):
    """`sample`: completions per problem into a graded rollout store."""
    from ..data.prompts import get_template
    from ..stages.sample import sample_stage

    set_threads(a)
    problems = problems_from(a)
    sampler = sampler_for(a, a.model)
    try:
        store = sample_stage(
            a.out,
            a.model,
            problems,
            get_template(a.template),
            sampling_config(a),
            greedy=a.greedy,
            shard_size=a.shard_size,
            overwrite=a.overwrite,
            grade_workers=a.grade_workers,
            engine=engine_config(a),
            sampler=sampler,
        )
    finally:
        if sampler is not None:
            sampler.close()
    m = store.manifest()
    print(
        f"rollouts: {store.root} ({len(store.done_shards())} shards, {m.get('generated_tokens_last_run', 0)} tokens generated this run)"
    )


def cmd_score(a):
    """`score`: the base model's entropies and log-probs of a rollout store's completions."""
    from ..stages.score import score_stage
    from ..store import RolloutStore

    set_threads(a)
    rollouts = RolloutStore(a.rollouts)
    spec, _ = store_model(a, rollouts)
    store = score_stage(rollouts, a.out, spec, batch_size=a.batch_size, overwrite=a.overwrite, engine=engine_config(a))
    t = store.read_table(["entropies"])
    ents = [h for row in t.column("entropies").to_pylist() for h in row]
    mean = sum(ents) / len(ents) if ents else float("nan")
    print(
        f"scores: {store.root} ({len(store.done_shards())} shards, {t.num_rows} rollouts, {len(ents)} tokens, "
        f"mean entropy {mean:.3f} nats under {spec})"
    )


def cmd_grade(a):
    """`grade`: regrade a rollout store in place, or grade a JSONL file (`_grade_jsonl`)."""
    from ..stages.sample import regrade_store
    from ..store import RolloutStore

    src = Path(a.input)
    if src.is_dir():
        n = regrade_store(RolloutStore(src), a.grade_workers)
        print(f"regraded {n} rollouts in {src}")
        return
    if not src.is_file():
        raise ReasonMaxxerError(f"{src}: no such file or rollout store")
    _grade_jsonl(a, src)


def _grade_jsonl(a, src: Path):
    """`grade` on a JSONL file: each row with its strict and lenient grades, to --out."""
    from ..io import atomic_write_bytes, read_jsonl
    from ..verify import grade_many, parse_failures

    rows = []
    for where, r in read_jsonl(src):
        for fld in (a.answer_field, a.completion_field):
            if fld not in r:
                raise ReasonMaxxerError(f"{where}: missing field '{fld}' (has: {', '.join(sorted(r))})")
        rows.append(r)
    grades = grade_many(
        [str(r[a.answer_field]) for r in rows],
        [str(r[a.completion_field]) for r in rows],
        workers=a.grade_workers,
        progress=True,
    )
    out_lines = []
    for r, g in zip(rows, grades):
        r = dict(r)
        for mode in ("strict", "lenient"):
            v = getattr(g, mode)
            r[f"{mode}_correct"], r[f"{mode}_extracted"], r[f"{mode}_reason"] = v.correct, v.extracted, v.reason
        out_lines.append(json.dumps(r))
    out = Path(a.out or src.with_suffix(".graded.jsonl"))
    atomic_write_bytes(out, ("\n".join(out_lines) + "\n").encode())
    s = sum(g.strict.correct for g in grades)
    l = sum(g.lenient.correct for g in grades)
    pf = parse_failures(grades)
    print(
        f"{len(grades)} graded -> {out}\nstrict {s}/{len(grades)} correct ({pf['strict']} without an answer), "
        f"lenient {l}/{len(grades)} ({pf['lenient']} without an answer)"
    )


def _default_eval_dir(a) -> Path:
    """runs/eval/<model>-<hash of the inputs that change the result>."""
    inputs = (a.model, a.problems, a.limit, a.template, vars(a).get("n"), a.temperature, a.top_p, a.top_k,
              a.max_new_tokens, a.seed)  # fmt: skip
    extra = (["vllm"] if a.backend == "vllm" else []) + ([f"stop={a.stop}"] if a.stop else [])
    return Path("runs") / "eval" / f"{Path(a.model).name}-{slug(*inputs, *extra)}"


def run_eval(a, label=None):
    """Sample (n samples + greedy) and evaluate; returns (report, out_dir)."""
    from ..data.prompts import get_template
    from ..models import load_model
    from ..stages.evaluate import evaluate_stores, save_report, to_markdown
    from ..stages.sample import sample_stage

    set_threads(a)
    problems = problems_from(a)
    tmpl = get_template(a.template)
    cfg = sampling_config(a)
    out = Path(a.out or _default_eval_dir(a))
    engine = engine_config(a)
    model = tok = None
    sampler = sampler_for(a, a.model)
    if sampler is None and (a.n > 0 or a.greedy) and engine.engine == "local":
        model, tok = load_model(a.model)
    sampled = greedy = None
    kw = dict(
        shard_size=a.shard_size,
        overwrite=a.overwrite,
        model=model,
        tokenizer=tok,
        grade_workers=a.grade_workers,
        engine=engine,
        sampler=sampler,
    )
    try:
        if a.n > 0:
            sampled = sample_stage(out / "samples", a.model, problems, tmpl, cfg, **kw)
        if a.greedy:
            greedy = sample_stage(out / "greedy", a.model, problems, tmpl, cfg, greedy=True, **kw)
    finally:
        if sampler is not None:
            sampler.close()
    ks = tuple(k for k in (1, 2, 4, 8, 16, 32, 64) if k <= max(a.n, 1))
    report = evaluate_stores(sampled, greedy, problems, ks=ks, label=label or f"{a.model} on {a.problems}")
    save_report(report, out / "eval.json", out / "eval.md")
    print(to_markdown(report))
    print(f"\nwritten: {out}/eval.json, {out}/eval.md")
    return report, out


def cmd_eval(a):
    """`eval`: `run_eval` with the default label."""
    run_eval(a)
