"""`reasonmaxxer` command line: a thin layer over the library.

Precedence: flags > defaults. Bad input prints one line on stderr and exits with status 2
(no traceback); set REASONMAXXER_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from .errors import ReasonMaxxerError, out_of_memory_error


def _add_model(p, default="smollm2-135m"):
    p.add_argument(
        "--model",
        default=default,
        help="alias (smollm2-135m), .gguf file, HF checkpoint dir, PEFT adapter dir or Hub id",
    )


def _add_problems(p, default="arith:test:100"):
    p.add_argument(
        "--problems",
        default=default,
        help="arith:<split>:<n>[:tiers], a benchmark name (gsm8k, math500, aime24, aime25, amc23, "
        "olympiadbench, minerva; optionally name:split), or a .jsonl/.parquet file",
    )
    p.add_argument(
        "--data-dir", default=None, help="local benchmark data dir (default $REASONMAXXER_DATA_DIR, else the Hub)"
    )
    p.add_argument("--question-field", default="question")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--limit", type=int, default=None, help="use only the first N problems")
    p.add_argument(
        "--template",
        default="fewshot",
        help="prompt template: raw, chat, fewshot, mistral, a .txt file, or a literal string with {question}",
    )


def _add_sampling(p, n=4, temperature=0.7, max_new_tokens=256):
    p.add_argument("--n", type=int, default=n, help="samples per problem")
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--stop",
        nargs="+",
        default=[],
        metavar="S",
        help="stop strings, cut from the completion (default: the template's; --stop '' = none)",
    )
    p.add_argument("--shard-size", type=int, default=64, help="problems per rollout-store shard (resumption unit)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")


class _Parser(argparse.ArgumentParser):
    """A subcommand parser whose `late(parser)` adds flags on first use (parse or help): the
    flags generated from the config dataclasses, without importing them (and torch) for
    every other command."""

    def __init__(self, *args, late=None, **kw):
        super().__init__(*args, **kw)
        self._late = late

    def _add_late(self):
        if self._late is not None:
            late, self._late = self._late, None
            late(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_late()
        return super().parse_known_args(args, namespace)

    def format_help(self):
        self._add_late()
        return super().format_help()


def _run_flags(p):
    from .config import add_config_flags

    add_config_flags(p)


# the TrainConfig / SelectionConfig fields that `train` and `calibrate` take as flags
_TRAIN_KEYS = tuple(
    "tau_fraction variant gate lam lr epochs max_steps micro_batch grad_accum warmup_steps checkpoint_every "
    "lora_rank lora_alpha seed full_finetune gradient_checkpointing schedule_steps loss_impl normalisation skip_ungated".split()
)
_SELECTION_KEYS = ("max_problems", "keep_shortest", "truncated", "order", "keep_unmixed")


def _add_dry_run(p):
    g = p.add_argument_group("--dry-run: the plan (problems, tokens, FLOPs, memory, GPU-hours, $) without running")
    g.add_argument("--dry-run", action="store_true", help="print the plan and exit (loads no model)")
    g.add_argument("--gpu", default="A100", choices=("A100", "H100"), help="GPU to plan for (default: A100)")
    g.add_argument("--gpu-memory-gb", type=float, default=None, help="its memory (default: 80)")
    g.add_argument(
        "--dollars-per-hour", type=float, default=None, help="assumed price per GPU-hour (default: A100 2.0, H100 3.0)"
    )


def _train_flags(p, with_tau: bool):
    from .config import add_config_flags
    from .stages.select import SelectionConfig
    from .stages.train import TrainConfig

    names = _TRAIN_KEYS + (("tau",) if with_tau else ())
    add_config_flags(p, TrainConfig, only=names, title="training (TrainConfig)")
    add_config_flags(p, SelectionConfig, only=_SELECTION_KEYS, title="selection")


def _add_engine(p):
    """--engine/--workers/--gpus-per-worker/--ray-address."""
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process; ray: shards spread over Ray workers, same results (default: local)",
    )
    p.add_argument(
        "--workers", type=int, default=2, help="Ray workers (actors), each loads the model once (default: 2)"
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs each Ray worker reserves, one model per GPU; a fraction shares a GPU; 0 = CPU workers "
        "(default: 1 when the cluster has a GPU per worker, an equal share when fewer, 0 without GPUs)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="an existing Ray cluster ('auto' or host:port); default: start a local Ray instance",
    )


def _engine(a):
    from .backends.engines import EngineConfig

    return EngineConfig(
        engine=a.engine,
        workers=a.workers,
        threads=getattr(a, "threads", 0) or 0,
        ray_address=a.ray_address,
        gpus_per_worker=a.gpus_per_worker,
    )


def _add_backend(p):
    """--backend and the vLLM engine options (None = the config's or the default)."""
    p.add_argument(
        "--backend",
        choices=("hf", "vllm"),
        default=None,
        help="sampling backend: hf (default; CPU or GPU) or vllm (GPUs; pip install 'reasonmaxxer[vllm]')",
    )
    p.add_argument("--tensor-parallel-size", type=int, default=None, help="vllm: GPUs per engine (default 1)")
    p.add_argument(
        "--data-parallel-size",
        type=int,
        default=None,
        help="vllm: independent engines, each on its own --tensor-parallel-size GPUs (default 1)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="vllm: fraction of each GPU's memory the engine may take (default: what is free, less 5%%, at most 0.9)",
    )


_VLLM_FLAGS = ("tensor_parallel_size", "data_parallel_size", "gpu_memory_utilization")


def _sampler(a, spec: str):
    """The sampler the flags ask for: None (HF, built by the stage) or a `VLLMSampler` for `spec`."""
    from .backends.vllm import VLLMOptions, make_sampler
    from .stages.sample import check_backend

    check_backend(a.backend, getattr(a, "engine", None))
    opts = {k: getattr(a, k) for k in _VLLM_FLAGS if getattr(a, k, None) is not None}
    if opts and a.backend != "vllm":
        raise ReasonMaxxerError(f"--{next(iter(opts)).replace('_', '-')} applies to --backend vllm only")
    return make_sampler(a.backend, spec, VLLMOptions(**opts))


def _add_pair(p, tuned_required: bool = True):
    """Flags shared by analyze and intervene: a base/tuned pair and the problems to decode."""
    p.add_argument("--base", default="smollm2-135m", help="base model spec")
    p.add_argument(
        "--tuned",
        required=tuned_required,
        help="tuned model: PEFT adapter dir, merged checkpoint or any HF model (same tokenizer)",
    )
    p.add_argument("--problems", default="arith:test:30")
    p.add_argument("--template", default="fewshot")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)


def _sampling_config(a):
    from .backends.hf import SamplingConfig

    return SamplingConfig(
        n=a.n,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        max_new_tokens=a.max_new_tokens,
        seed=a.seed,
        batch_size=a.batch_size,
        stop=tuple(a.stop),
    )


def _problems(a):
    from .data.benchmarks import load_problems

    return load_problems(
        a.problems, data_dir=a.data_dir, question_field=a.question_field, answer_field=a.answer_field, limit=a.limit
    )


def _slug(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _threads(a):
    if getattr(a, "threads", 0):
        import torch

        torch.set_num_threads(a.threads)


# -- commands ----------------------------------------------------------------------------
def cmd_models(a):
    from .models import convert_gguf, list_models, resolve_spec

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
    from .data.prompts import get_template
    from .stages.sample import sample_stage

    _threads(a)
    problems = _problems(a)
    sampler = _sampler(a, a.model)
    try:
        store = sample_stage(
            a.out,
            a.model,
            problems,
            get_template(a.template),
            _sampling_config(a),
            greedy=a.greedy,
            shard_size=a.shard_size,
            overwrite=a.overwrite,
            grade_workers=a.grade_workers,
            engine=_engine(a),
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
    from .stages.score import score_stage
    from .store import RolloutStore

    _threads(a)
    rollouts = RolloutStore(a.rollouts)
    spec, _ = _store_model(a, rollouts)
    store = score_stage(rollouts, a.out, spec, batch_size=a.batch_size, overwrite=a.overwrite, engine=_engine(a))
    t = store.read_table(["entropies"])
    ents = [h for row in t.column("entropies").to_pylist() for h in row]
    mean = sum(ents) / len(ents) if ents else float("nan")
    print(
        f"scores: {store.root} ({len(store.done_shards())} shards, {t.num_rows} rollouts, {len(ents)} tokens, "
        f"mean entropy {mean:.3f} nats under {spec})"
    )


def cmd_grade(a):
    from .io import atomic_write_bytes
    from .stages.sample import regrade_store
    from .store import RolloutStore

    src = Path(a.input)
    if src.is_dir():
        n = regrade_store(RolloutStore(src), a.grade_workers)
        print(f"regraded {n} rollouts in {src}")
        return
    if not src.is_file():
        raise ReasonMaxxerError(f"{src}: no such file or rollout store")
    from .io import read_jsonl
    from .verify import grade_many, parse_failures

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


def run_eval(a, label=None):
    """Sample (n samples + greedy) and evaluate; returns (report, out_dir)."""
    from .data.prompts import get_template
    from .models import load_model
    from .stages.evaluate import evaluate_stores, save_report, to_markdown
    from .stages.sample import sample_stage

    _threads(a)
    problems = _problems(a)
    tmpl = get_template(a.template)
    cfg = _sampling_config(a)
    out = Path(
        a.out
        or Path("runs")
        / "eval"
        / f"{Path(a.model).name}-{_slug(a.model, a.problems, a.limit, a.template, vars(a).get('n'), a.temperature, a.top_p, a.top_k, a.max_new_tokens, a.seed, *(['vllm'] if a.backend == 'vllm' else []), *([f'stop={a.stop}'] if a.stop else []))}"
    )
    engine = _engine(a)
    model = tok = None
    sampler = _sampler(a, a.model)
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
    run_eval(a)


DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.toml"


def cmd_run(a, config=None):
    from .backends.distributed import launched
    from .config import config_overrides, load_run_config
    from .recipes.run import run_pipeline

    if launched():
        raise ReasonMaxxerError(
            "run/demo is single-process; under `accelerate launch` run `-m reasonmaxxer train` "
            "(the README's 'Multi-process training')"
        )
    cfg = load_run_config(config or a.config, **config_overrides(a))
    if a.dry_run:
        from .recipes.plan import dry_run

        print(dry_run(cfg, gpu=a.gpu, gpu_memory_gb=a.gpu_memory_gb, dollars_per_hour=a.dollars_per_hour))
        return
    run_pipeline(cfg, overwrite=a.overwrite)


def _train_config(a):
    from .stages.train import TrainConfig

    return TrainConfig(**_given(a, _TRAIN_KEYS + ("tau",)))


def _selection(a):
    from .stages.select import SelectionConfig

    return SelectionConfig(**_given(a, _SELECTION_KEYS))


def _given(a, keys) -> dict:
    """The flags among `keys` that were given (not None)."""
    return {k: getattr(a, k) for k in keys if getattr(a, k, None) is not None}


def _store_model(a, store):
    m = store.manifest()
    spec = a.model or m.get("model_spec")
    if not spec:
        raise ReasonMaxxerError(f"{store.root}/manifest.json: no model_spec recorded; pass --model")
    return spec, m


def cmd_train(a):
    from dataclasses import asdict

    from .backends.distributed import is_main_process, main_process_first, set_timeout_minutes
    from .data.benchmarks import load_problems
    from .data.prompts import get_template
    from .models import load_model
    from .recipes.run import prepare_training_data
    from .stages.evaluate import greedy_accuracy_fn
    from .stages.publish import check_push, push_adapter
    from .stages.tracking import check_tracker, make_tracker
    from .stages.train import examples_from_selection, train
    from .store import RolloutStore

    _threads(a)
    check_tracker(a.report_to)  # a missing package or Hub token: one line before any model loads
    check_push(a.push_to_hub, full_finetune=bool(a.full_finetune))
    store = RolloutStore(a.rollouts)
    spec, man = _store_model(a, store)
    set_timeout_minutes(a.dist_timeout_minutes)  # before the first collective initialises the process group
    main = is_main_process()  # under `accelerate launch` every process runs this command
    with main_process_first():  # the main process converts the model and caches it; the others read the cache
        model, tok = load_model(spec)
    cfg = _train_config(a)
    out = Path(a.out)
    sel_cfg = _selection(a)
    # every process scores its share of the rows (all get every row's entropies; the main one caches them)
    sel, rows, info = prepare_training_data(
        store, spec, model, tok, sel_cfg, cfg, out / "scores.parquet", rescore=a.rescore, progress=main
    )
    examples = examples_from_selection(rows, sel_cfg.truncated)
    validate = None
    if a.validation:
        tmpl = get_template(a.template or man.get("config", {}).get("template", {}).get("name") or "fewshot")
        validate = greedy_accuracy_fn(load_problems(a.validation, data_dir=a.data_dir), tmpl, tok, a.max_new_tokens, 32)
    # only the main process logs; the tracker's config is the run's, not part of TrainConfig (resume compares that)
    run_info = {"train": asdict(cfg), "selection": asdict(sel_cfg), "rollouts": a.rollouts, "model": spec}
    tracker = make_tracker(a.report_to, out, run_info, out.name) if main else None
    res = train(
        examples, cfg, out, model, tok, base_spec=spec, validate=validate, shuffle=False, progress=main, tracker=tracker
    )
    if not main:
        return
    if a.push_to_hub:
        print(f"pushed {res.get('adapter')} to {push_adapter(res['adapter'], a.push_to_hub)}", flush=True)
    print(
        f"tau {res['tau']:.3f} nats ({res['tau_source']}), gated fraction {res['gated_fraction']:.2%}; "
        f"selected step {res['selected_step']} (val accuracy {res['selected_val_accuracy']})\n"
        f"adapter: {res.get('adapter')}\nmerged:  {res.get('merged')}"
    )


def cmd_calibrate(a):
    from .data.benchmarks import load_problems
    from .data.prompts import get_template
    from .models import load_model
    from .recipes.calibrate import calibrate
    from .store import RolloutStore

    _threads(a)
    store = RolloutStore(a.rollouts)
    spec, man = _store_model(a, store)
    model, tok = load_model(spec)
    tmpl = get_template(a.template or man.get("config", {}).get("template", {}).get("name") or "fewshot")
    res = calibrate(
        store,
        spec,
        model,
        tok,
        tmpl,
        load_problems(a.validation, data_dir=a.data_dir),
        taus=a.taus,
        selection=_selection(a),
        train_cfg=_train_config(a),
        out=Path(a.out),
        max_steps=a.steps,
        max_new_tokens=a.max_new_tokens,
    )
    print(res["markdown"])
    print(f"best tau: {res['best_tau']:g} nats (written: {a.out}/calibrate.json, calibrate.md)")


def cmd_analyze(a):
    from .analysis.tokens import run_analyze

    _threads(a)
    if a.delta:
        return cmd_delta(a)
    if not a.tuned:
        raise ReasonMaxxerError("analyze: pass --tuned MODEL (token-level comparison) or --delta ADAPTER (spectrum)")
    res = run_analyze(
        a.base,
        a.tuned,
        a.problems,
        a.out,
        template=a.template,
        limit=a.limit,
        max_new_tokens=a.max_new_tokens,
        data_dir=a.data_dir,
        trajectories=a.trajectories,
    )
    from .reports.explorer import analysis_plots, write_explorer, write_fork_atlas

    analysis_plots(a.out)
    write_explorer(a.out)
    try:
        write_fork_atlas(a.out)
        atlas = ", fork_atlas.html"
    except ReasonMaxxerError as e:  # e.g. no reranked position at all: nothing to build an atlas from
        atlas = f" (no fork atlas: {e})"
    print((Path(a.out) / "analysis.md").read_text())
    print(f"written: {a.out}/analysis.json, analysis.md, trajectories.jsonl, explorer.html, plots/{atlas}")
    return res


def cmd_delta(a):
    from .analysis.delta import run_delta

    res = run_delta(a.delta, a.out, base=a.base)  # --base: read for a full fine-tune only
    for mod, v in res["summary"].items():
        print(f"{mod}: {v['n']} modules, effective rank 90% mean {v['mean_rank_90']:.1f} (max {v['max_rank_90']}), "
              f"99% mean {v['mean_rank_99']:.1f} (max {v['max_rank_99']})")  # fmt: skip
    print(f"written: {a.out}/delta.json, delta.png")
    return res


def cmd_distill(a):
    from .recipes.distill import run_distill
    from .stages.distill import DistillConfig

    _threads(a)
    keys = ("positions", "lr", "epochs", "max_steps", "micro_batch", "grad_accum", "seed", "alpha_per_rank")
    cfg = DistillConfig(**{k: getattr(a, k) for k in keys if getattr(a, k) is not None})
    res = run_distill(
        a.teacher, a.base, a.ranks, a.problems, a.out, cfg=cfg, rollouts=a.rollouts, test_problems=a.test_problems,
        template=a.template, data_dir=a.data_dir, limit=a.limit, n=a.n, max_new_tokens=a.max_new_tokens,
        eval_n=a.eval_n, heldout_rollouts=a.heldout_rollouts, progress=True,
    )  # fmt: skip
    print((Path(a.out) / "distill.md").read_text())
    print(f"written: {a.out}/distill.json, distill.md, recovery_vs_rank.png, rank-*/")
    return res


def cmd_intervene(a):
    from .analysis.intervene import run_intervene

    _threads(a)
    run_intervene(
        a.base,
        a.tuned,
        a.problems,
        a.out,
        template=a.template,
        limit=a.limit,
        max_new_tokens=a.max_new_tokens,
        taus=tuple(a.taus),
        random_seeds=tuple(range(a.random_seeds)),
        js_eps=a.js_eps,
        data_dir=a.data_dir,
    )
    print((Path(a.out) / "intervene.md").read_text())
    print(f"written: {a.out}/intervene.json, intervene.md, intervene_bars.png, tau_sweep.png")


def cmd_baseline(a):
    from .recipes.baselines import load_baseline_config, run_baseline

    keys = (
        "out",
        "model",
        "template",
        "train_problems",
        "test_problems",
        "data_dir",
        "loss_type",
        "beta",
        "lr",
        "prompts_per_step",
        "num_generations",
        "max_new_tokens",
        "lora_rank",
        "full_finetune",
        "grad_accum",
        "vllm",
        "vllm_gpu_memory_utilization",
        "max_steps",
        "max_train_seconds",
        "eval_every",
        "eval_at_start",
        "seed",
        "threads",
    )
    over = {k: getattr(a, k) for k in keys}
    over["method"] = a.method
    if over["out"] is None and not a.config:
        over["out"] = f"runs/baseline-{a.method}"
    res = run_baseline(load_baseline_config(a.config, **over))
    f = res.get("final") or {}
    acc = ", ".join(f"{k} {f[k]:.3f}" for k in ("greedy", "avg_at_n") if f.get(k) is not None)
    print(
        f"{res['method']}: {res['steps']} steps, {res['train_seconds']:.0f} s of training, {res['flops']:.3g} FLOPs; "
        f"held-out {acc}; curve: {Path(res['adapter' if 'adapter' in res else 'model']).parent / 'curve.jsonl'}"
    )


def cmd_compare(a):
    from .recipes.compare import run_compare

    md = run_compare(a.runs, a.out, reference=a.reference, metric=a.metric, gpu_hour_price=a.gpu_hour_price)
    print(md)


def cmd_demo(a):
    print(
        "reasonmaxxer demo: SmolLM2-135M-Instruct (embedded) on built-in arithmetic problems:\n"
        "sample -> grade -> select -> score -> train (LoRA, entropy gate) -> evaluate base vs trained -> report",
        flush=True,
    )
    cmd_run(a, config=DEMO_CONFIG)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="reasonmaxxer", description="RL-free reasoning post-training at high-entropy forks."
    )
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="list the embedded models (and convert them once)")
    p.add_argument("--convert", metavar="SPEC", help="convert an alias or .gguf file into the cache now")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("sample", help="sample completions per problem into a rollout store (graded)")
    _add_model(p)
    _add_problems(p, default="arith:train:200")
    _add_sampling(p)
    p.add_argument("--greedy", action="store_true", help="one greedy completion per problem instead of --n samples")
    _add_backend(p)
    p.add_argument("--out", required=True, help="rollout store directory")
    p.add_argument("--overwrite", action="store_true", help="replace a store made with different inputs")
    p.add_argument("--grade-workers", type=int, default=None, help="grading processes (0 = in-process)")
    _add_engine(p)
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser(
        "score", help="teacher-forced entropies and log-probs of every rollout in a store (a score store)"
    )
    p.add_argument("--rollouts", required=True, help="rollout store (from `reasonmaxxer sample`)")
    p.add_argument("--out", required=True, help="score store directory")
    p.add_argument("--model", default=None, help="scoring model (default: the one that sampled the rollouts)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default; Ray workers: 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a score store made with different inputs")
    _add_engine(p)
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("grade", help="grade completions: a rollout store dir (in place) or a JSONL file")
    p.add_argument("input", help="rollout store dir, or a .jsonl with answer and completion fields")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--completion-field", default="completion")
    p.add_argument("--out", default=None, help="output JSONL (default: INPUT.graded.jsonl)")
    p.add_argument("--grade-workers", type=int, default=None)
    p.set_defaults(fn=cmd_grade)

    for name, fn, hlp in (
        ("run", cmd_run, "the whole pipeline from a TOML config (each stage resumable)"),
        ("demo", cmd_demo, "the main job: `run` with the embedded default model's presets"),
    ):
        p = sub.add_parser(name, help=hlp, late=_run_flags)  # + one flag per config field (config.py)
        if name == "run":
            p.add_argument("config", help="TOML run config (see configs/demo.toml)")
        p.add_argument("--overwrite", action="store_true", help="replace stages whose inputs changed")
        _add_dry_run(p)
        p.set_defaults(fn=fn)

    for name, fn, hlp in (
        ("train", cmd_train, "train an adapter from a rollout store (select, score, train, export)"),
        ("calibrate", cmd_calibrate, "sweep tau with short trainings on a validation split"),
    ):
        p = sub.add_parser(name, help=hlp, late=lambda p, tau=name == "train": _train_flags(p, tau))
        p.add_argument("--rollouts", required=True, help="rollout store (from `reasonmaxxer sample`)")
        p.add_argument("--out", required=True, help="output dir")
        p.add_argument("--model", default=None, help="base model (default: the one that sampled the rollouts)")
        p.add_argument("--template", default=None, help="prompt template for validation (default: the rollouts')")
        p.add_argument(
            "--validation",
            default="arith:validation:32" if name == "calibrate" else None,
            help="held-out problems for checkpoint selection / calibration",
        )
        p.add_argument("--data-dir", default=None)
        p.add_argument("--max-new-tokens", type=int, default=256, help="for validation decoding")
        p.add_argument("--threads", type=int, default=0)
        if name == "train":
            p.add_argument(
                "--dist-timeout-minutes",
                type=float,
                default=60.0,
                help="under `accelerate launch`: how long a process waits for the others in a collective "
                "(torch's NCCL default is 10) (default: 60)",
            )
            p.add_argument(
                "--rescore", action="store_true", help="re-score base entropies even if the sampler's can be reused"
            )
            p.add_argument(
                "--report-to",
                default="none",
                choices=("none", "tensorboard", "wandb"),  # stages/tracking.py REPORT_TO (not imported here)
                help="log each step's metrics (metrics.jsonl's) to TensorBoard (OUT/tb) or W&B (default: none)",
            )
            p.add_argument(
                "--push-to-hub",
                metavar="REPO",
                default="",
                help="after export, upload the adapter and its model card to this Hub model repo (created private)",
            )
        else:
            p.add_argument(
                "--taus", type=float, nargs="+", default=[0.8, 1.2, 1.6, 2.0, 2.4], help="candidate tau values, nats"
            )
            p.add_argument("--steps", type=int, default=8, help="optimizer steps per candidate")
        p.set_defaults(fn=fn)

    p = sub.add_parser(
        "analyze", help="token-level comparison of a tuned model with its base (reranked/shifted, entropy, KL/JS)"
    )
    _add_pair(p, tuned_required=False)
    p.add_argument(
        "--delta",
        default=None,
        help="instead: the spectrum of a weight change (a LoRA adapter dir, or a full fine-tune with --base)",
    )
    p.add_argument(
        "--trajectories",
        choices=("base", "tuned", "both"),
        default="base",
        help="whose greedy trajectories to analyse (both models are teacher-forced on them); "
        "both: each reported separately",
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_analyze)

    p = sub.add_parser("distill", help="rank sweep of KL-LoRA students of a tuned teacher: how low-dimensional is it?")
    p.add_argument(
        "--teacher", required=True, help="tuned model: PEFT adapter dir, merged or any HF model (same tokenizer)"
    )
    p.add_argument("--base", required=True, help="base model spec the students are LoRAs of")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--problems", required=True, help="problems the teacher's rollouts are sampled on")
    p.add_argument("--rollouts", default=None, help="a rollout store of the teacher to distill on (default: sample)")
    p.add_argument(
        "--positions", choices=("all", "gated"), default=None, help="all completion tokens | the base's forks"
    )
    p.add_argument("--test-problems", default=None, help="held-out problems for the table (default: no evaluation)")
    p.add_argument("--template", default="fewshot")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=int, default=None, help="first N of --problems")
    p.add_argument("--n", type=int, default=4, help="teacher rollouts per problem")
    p.add_argument("--eval-n", type=int, default=4, help="held-out samples per problem (avg@n)")
    p.add_argument("--heldout-rollouts", type=int, default=64, help="teacher's held-out rollouts for KL/agreement")
    p.add_argument("--max-new-tokens", type=int, default=256)
    for flag, typ in (("lr", float), ("epochs", float), ("max-steps", int), ("micro-batch", int), ("grad-accum", int),
                      ("seed", int), ("alpha-per-rank", float)):  # fmt: skip
        p.add_argument(f"--{flag}", type=typ, default=None, help="stages.distill.DistillConfig")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="runs/distill", help="run dir; re-run to resume (finished ranks are skipped)")
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser("intervene", help="causal checks: oracle, random control, entropy-gated sweep, cross-sampling")
    _add_pair(p)
    p.add_argument("--taus", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 2.5], help="entropy thresholds, nats")
    p.add_argument("--random-seeds", type=int, default=3, help="seeds of the random control")
    p.add_argument("--js-eps", type=float, default=0.1, help="JS threshold (nats) for cross-sampling")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_intervene)

    p = sub.add_parser(
        "baseline", help="an RL baseline through TRL (grpo, grpo-entropy, dr-grpo, rloo), evaluated along the way"
    )
    p.add_argument("method", choices=["grpo", "grpo-entropy", "dr-grpo", "rloo"])
    p.add_argument("--config", default=None, help="TOML file with BaselineConfig keys (+ an [eval] table); flags win")
    p.add_argument("--out", default=None, help="run dir (default runs/baseline-<method>); re-run to resume")
    p.add_argument("--model", default=None)
    p.add_argument("--template", default=None)
    p.add_argument("--train-problems", default=None)
    p.add_argument("--test-problems", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--loss-type", default=None, help="TRL loss_type (grpo default: TRL's, 'dapo')")
    p.add_argument("--beta", type=float, default=None, help="KL coefficient (default: TRL's)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--prompts-per-step", type=int, default=None)
    p.add_argument("--num-generations", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--full-finetune", action="store_true", default=None)
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    p.add_argument("--vllm", choices=["off", "colocate", "server"], default=None, help="generate through vLLM (TRL)")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=None, help="colocated vLLM's GPU share")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-train-seconds", type=float, default=None, help="wall-clock cap on training (evals excluded)")
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N steps (0: at the end)")
    p.add_argument("--eval-at-start", action="store_true", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(fn=cmd_baseline)

    p = sub.add_parser("compare", help="one table of ReasonMaxxer and baseline runs: accuracy, cost, compute-to-match")
    p.add_argument("runs", nargs="+", help="run dirs: a `run`/`demo` dir and/or `baseline` dirs")
    p.add_argument("--reference", default=None, help="the ReasonMaxxer run to match (default: the first `run` dir)")
    p.add_argument("--metric", default="avg_at_n", choices=["avg_at_n", "greedy"], help="held-out accuracy to match")
    p.add_argument("--gpu-hour-price", type=float, default=2.0, help="$ per GPU-hour, for the cost column")
    p.add_argument("--out", default="runs/compare")
    p.set_defaults(fn=cmd_compare)

    for name, fn, hlp in (("eval", cmd_eval, "accuracy of a model: avg@n pass@1, pass@k, maj@k, greedy"),):
        p = sub.add_parser(name, help=hlp)
        _add_model(p)
        _add_problems(p, default="arith:test:100" if name == "eval" else "arith:test:64")
        _add_sampling(p, n=4)
        p.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=True, help="also decode greedily")
        _add_backend(p)
        p.add_argument("--out", default=None, help="output dir (default: runs/eval/<model>-<hash of the inputs>)")
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--grade-workers", type=int, default=None)
        _add_engine(p)
        p.set_defaults(fn=fn)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            args.fn(args)
        except Exception as e:  # an out-of-memory anywhere: one line naming the knob
            err = out_of_memory_error(args.cmd, e)
            if err is None:
                raise
            raise err from e
    except ReasonMaxxerError as e:
        if os.environ.get("REASONMAXXER_DEBUG"):
            raise
        print(f"reasonmaxxer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "reasonmaxxer: interrupted (finished shards are kept; re-run the same command to resume)", file=sys.stderr
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
