"""Commands that train and compare: `run`, `demo`, `train`, `calibrate`, `baseline`, `compare`."""

from __future__ import annotations

from pathlib import Path

from ..errors import ReasonMaxxerError
from .options import selection_config, set_threads, store_model, train_config

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"

# the BaselineConfig fields `baseline` takes as flags (None = the config file's or the default)
_BASELINE_FLAGS = tuple(
    "out model template train_problems test_problems data_dir loss_type beta lr prompts_per_step num_generations "
    "max_new_tokens lora_rank full_finetune grad_accum vllm vllm_gpu_memory_utilization max_steps max_train_seconds "
    "max_train_flops eval_at_flops eval_every eval_at_start seed threads".split()
)


def cmd_run(a, config=None):
    """`run`: the whole pipeline from a TOML config (`config` instead of a.config), or its --dry-run plan."""
    from ..backends.distributed import launched
    from ..config import config_overrides, load_run_config
    from ..recipes.run import run_pipeline

    if launched():
        raise ReasonMaxxerError(
            "run/demo is single-process; under `accelerate launch` run `-m reasonmaxxer train` "
            "(the README's 'Multi-process training')"
        )
    cfg = load_run_config(config or a.config, **config_overrides(a))
    if a.dry_run:
        from ..recipes.plan import dry_run

        print(dry_run(cfg, gpu=a.gpu, gpu_memory_gb=a.gpu_memory_gb, dollars_per_hour=a.dollars_per_hour))
        return
    run_pipeline(cfg, overwrite=a.overwrite)


def cmd_demo(a):
    """`demo`: `run` with configs/demo.toml (the embedded default model's presets)."""
    print(
        "reasonmaxxer demo: SmolLM2-135M-Instruct (embedded) on built-in arithmetic problems:\n"
        "sample -> grade -> select -> score -> train (LoRA, entropy gate) -> evaluate base vs trained -> report",
        flush=True,
    )
    cmd_run(a, config=DEMO_CONFIG)


def _template_name(a, manifest) -> str:
    """--template, else the template the rollouts were sampled with, else fewshot."""
    return a.template or manifest.get("config", {}).get("template", {}).get("name") or "fewshot"


def cmd_train(a):
    """`train`: select, score, train and export an adapter from a rollout store (any process of a launch)."""
    from dataclasses import asdict

    from ..backends.distributed import is_main_process, main_process_first, set_timeout_minutes
    from ..models import load_model
    from ..recipes.run import prepare_training_data
    from ..stages.publish import check_push, push_adapter
    from ..stages.tracking import check_tracker, make_tracker
    from ..stages.train import examples_from_selection, train
    from ..store import RolloutStore

    set_threads(a)
    check_tracker(a.report_to)  # a missing package or Hub token: one line before any model loads
    check_push(a.push_to_hub, full_finetune=bool(a.full_finetune))
    store = RolloutStore(a.rollouts)
    spec, man = store_model(a, store)
    set_timeout_minutes(a.dist_timeout_minutes)  # before the first collective initialises the process group
    main = is_main_process()  # under `accelerate launch` every process runs this command
    with main_process_first():  # the main process converts the model and caches it; the others read the cache
        model, tok = load_model(spec)
    cfg = train_config(a)
    out = Path(a.out)
    sel_cfg = selection_config(a)
    # every process scores its share of the rows (all get every row's entropies; the main one caches them)
    sel, rows, info = prepare_training_data(
        store, spec, model, tok, sel_cfg, cfg, out / "scores.parquet", rescore=a.rescore, progress=main
    )
    examples = examples_from_selection(rows, sel_cfg.truncated)
    validate = validation_fn(a, man, tok)
    # only the main process logs; the tracker's config is the run's, not part of TrainConfig (resume compares that)
    run_info = {"train": asdict(cfg), "selection": asdict(sel_cfg), "rollouts": a.rollouts, "model": spec}
    tracker = make_tracker(a.report_to, out, run_info, out.name) if main else None
    res = train(
        examples,
        cfg,
        out,
        model,
        tok,
        base_spec=spec,
        validate=validate,
        shuffle=False,
        progress=main,
        tracker=tracker,
        overwrite=a.overwrite,
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
    """`calibrate`: short trainings per candidate tau, scored on a validation split."""
    from ..models import load_model
    from ..recipes.calibrate import calibrate
    from ..store import RolloutStore

    set_threads(a)
    store = RolloutStore(a.rollouts)
    spec, man = store_model(a, store)
    model, tok = load_model(spec)
    validate = validation_fn(a, man, tok)
    res = calibrate(
        store,
        spec,
        model,
        tok,
        validate,
        taus=a.taus,
        selection=selection_config(a),
        train_cfg=train_config(a),
        out=Path(a.out),
        max_steps=a.steps,
        overwrite=a.overwrite,
    )
    print(res["markdown"])
    print(f"best tau: {res['best_tau']:g} nats (written: {a.out}/calibrate.json, calibrate.md)")


def validation_fn(a, man: dict, tok):
    """validate(model) -> accuracy (`stages.evaluate.validation_accuracy_fn`), or None without
    --validation, from `train`/`calibrate`'s validation flags: the template is --template or the rollouts'."""
    from ..data.benchmarks import load_problems
    from ..data.prompts import get_template
    from ..stages.evaluate import validation_accuracy_fn

    if not a.validation:
        return None
    problems = load_problems(a.validation, data_dir=a.data_dir)
    return validation_accuracy_fn(
        problems,
        get_template(_template_name(a, man)),
        tok,
        a.max_new_tokens,
        32,
        temperature=a.validation_temperature,
        top_p=a.validation_top_p,
    )


def cmd_baseline(a):
    """`baseline`: an RL baseline through TRL, from --config and the given flags."""
    from ..recipes.baselines import load_baseline_config, run_baseline

    over = {k: getattr(a, k) for k in _BASELINE_FLAGS}
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
    """`compare`: one table of ReasonMaxxer and baseline runs."""
    from ..recipes.compare import run_compare

    md = run_compare(a.runs, a.out, reference=a.reference, metric=a.metric, gpu_hour_price=a.gpu_hour_price)
    print(md)
