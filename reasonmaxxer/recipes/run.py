"""The one-command pipeline: sample -> grade -> select -> score -> train -> evaluate -> report.

Each stage writes its artifact under the run directory and is skipped when re-run with
the same inputs (the stage's config hash matches), so `reasonmaxxer run` after a crash
resumes where it stopped:

    run_dir/rollouts/        rollout store of the training problems (sample + grade)
    run_dir/scores.parquet   base entropies of the selected rollouts (score)
    run_dir/train/           adapter/, merged/, checkpoints/, metrics.jsonl (train)
    run_dir/eval/base/, run_dir/eval/trained/   held-out evaluation (eval)
    run_dir/report.md, report.html, summary.json

Scoring. The gate needs the frozen base model's full-vocabulary entropy at each completion
token. When the rollouts were sampled by the HF backend from the same base weights (the
store's manifest says so), those entropies were already computed from the very logits the
sampler drew from, so the scoring pass is skipped (`rescore=True` forces it; it agrees to
~1e-5). Rollouts from another model or from vLLM (top-k log-probs only) are always scored.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from ..analysis.forks import fork_changes, report_examples
from ..config import RunConfig
from ..errors import ReasonMaxxerError, out_of_memory_error
from ..io import atomic_write_json, json_ready
from ..models import set_torch_threads
from ..stages.evaluate import evaluate_model, validation_accuracy_fn
from ..stages.score import attach_scores
from ..stages.select import SelectionConfig
from ..stages.train import TrainConfig, examples_from_selection
from ..store import RolloutStore
from .run_summary import build_summary, finish_run, fork_table, paired_accuracy, tier_table


def prepare_training_data(
    store: RolloutStore,
    model_spec: str,
    model,
    tokenizer,
    selection: SelectionConfig,
    train_cfg: TrainConfig,
    scores_path: Path,
    *,
    rescore: bool = False,
    progress: bool = True,
    engine=None,
):
    """select -> score (-> clarity order). Returns (Selection, rows with base_entropies, score info)."""
    from ..stages.select import select
    from ..stages.train import resolve_tau

    rows = [r for r in store.read_rows() if r["sample_index"] >= 0]
    clarity = selection.order == "clarity"
    sel = select(rows, replace(selection, order="none") if clarity else selection)
    if progress:
        st = sel.stats
        print(
            f"kept {st['problems_kept']} of {st['problems_total']} problems ({st['problems_mixed']} with mixed "
            f"success), {st['rollouts_kept']} rollouts",
            flush=True,
        )
    srows, info = attach_scores(
        store,
        list(sel.rows),
        scores_path,
        model_spec,
        model,
        tokenizer,
        rescore=rescore,
        progress=progress,
        engine=engine,
    )
    if clarity:
        tau0, _ = resolve_tau(examples_from_selection(srows, selection.truncated), train_cfg)
        first = sel
        sel = select(srows, selection, tau=tau0)
        sel = type(sel)(rows=sel.rows, problems=first.problems, stats=first.stats)  # stats of the real selection
        srows = sel.rows
    return sel, srows, info


def reuse_dir(cfg: RunConfig) -> Path | None:
    """The run dir named by `reuse` (its base rollouts and base evaluation are copied into this
    run where they were made with the same inputs: `RolloutStore.copy_from`), or None."""
    if not cfg.reuse:
        return None
    src = Path(cfg.reuse)
    if not src.is_dir():
        raise ReasonMaxxerError(
            f"reuse: {src} is not a run dir (run the config that writes it first, e.g. configs/arith.toml for the "
            "ablations, or drop `reuse`)"
        )
    return src


def _vllm_options(cfg: RunConfig, model, progress: bool):
    """The [vllm] options of the run's engine: LoRA serving for the trained adapter, and
    ``between_stages`` "auto" resolved against the HF model's device (`plan_between_stages`)."""
    from ..backends.vllm_runtime import plan_between_stages

    o = cfg.vllm
    if not cfg.train.full_finetune:
        o = replace(o, enable_lora=True, max_lora_rank=o.max_lora_rank or cfg.train.lora_rank)
    if cfg.backend != "vllm":
        return o
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    device = next(model.parameters()).device
    mode = plan_between_stages(o.between_stages, o.data_parallel_size, o.tensor_parallel_size, device, weights)
    if progress and o.between_stages == "auto":
        print(f"vllm: while the HF model ({device}) scores and trains, the engine will {mode}", flush=True)
    return replace(o, between_stages=mode)


def run_pipeline(cfg: RunConfig, *, progress: bool = True, overwrite: bool = False) -> dict:
    """sample -> grade -> select -> score -> train -> eval (base, trained) -> report. Returns summary.

    Every vLLM engine the run starts is closed when it ends, whether it returns or a stage fails.
    """
    samplers: list = []  # the vLLM samplers started, closed in `finally`
    try:
        return _pipeline(cfg, progress, overwrite, samplers)
    finally:
        for s in samplers:
            s.close()


class StageClock:
    """``with clock("train"):`` prints the stage's name, times it into timings.json, and turns an
    out-of-memory inside it into one line naming the stage's knob (`errors.out_of_memory_error`)."""

    def __init__(self, out: Path, progress: bool):
        self.path, self.progress = out / "timings.json", progress
        self.timings = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @contextmanager
    def __call__(self, name: str):
        t = time.time()
        if self.progress:
            print(f"\n== {name} ==", flush=True)
        try:
            yield
        except Exception as e:
            err = out_of_memory_error(name, e)
            if err is None:
                raise
            raise err from e
        dt = round(time.time() - t, 1)
        if dt > 1.0 or name not in self.timings:  # keep the first real measurement of a skipped stage
            self.timings[name] = dt
        atomic_write_json(self.path, self.timings)


def run_config_dict(cfg: RunConfig) -> dict:
    """`cfg` as `run_config.json` records it (paths and other non-JSON values as strings)."""
    return json_ready(asdict(cfg))


def write_run_config(out: Path, cfg: RunConfig) -> None:
    atomic_write_json(out / "run_config.json", run_config_dict(cfg))


def preflight(cfg: RunConfig) -> None:
    """Check the backend, the tracker and the Hub push before anything runs (a missing package or
    Hub token: one line now, not after sampling), and set the CPU thread count."""
    from ..stages.publish import check_push
    from ..stages.sample import check_backend
    from ..stages.tracking import check_tracker

    check_backend(cfg.backend, cfg.engine)
    check_tracker(cfg.report_to)
    check_push(cfg.push_to_hub, full_finetune=cfg.train.full_finetune)
    set_torch_threads(cfg.threads)  # warns on a CPU that other jobs keep busy


def _pipeline(cfg: RunConfig, progress: bool, overwrite: bool, samplers: list) -> dict:
    from ..backends.engines import release_workers
    from ..backends.vllm import make_sampler
    from ..data.benchmarks import load_problems
    from ..data.prompts import get_template
    from ..models import load_model
    from ..stages.sample import sample_stage
    from ..stages.train import example_gates

    preflight(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, cfg)
    clock = StageClock(out, progress)
    tmpl = get_template(cfg.template)
    train_p = load_problems(cfg.train_problems, data_dir=cfg.data_dir)
    val_p = load_problems(cfg.validation_problems, data_dir=cfg.data_dir) if cfg.validation_problems else []
    test_p = load_problems(cfg.test_problems, data_dir=cfg.data_dir)
    model, tok = load_model(cfg.model)
    src = reuse_dir(cfg)
    engine = cfg.engine_config()
    # vLLM: one engine for sampling and both evals; it serves the trained adapter as a LoRA
    sampler = make_sampler(cfg.backend, cfg.model, _vllm_options(cfg, model, progress), tokenizer=tok)
    if sampler is not None:
        samplers.append(sampler)

    with clock("sample"):
        store = sample_stage(
            out / "rollouts",
            cfg.model,
            train_p,
            tmpl,
            cfg.sampling,
            model=model,
            tokenizer=tok,
            overwrite=overwrite,
            progress=progress,
            engine=engine,
            sampler=sampler,
            reuse=src and src / "rollouts",
        )
    if sampler is not None:  # the GPU is the HF model's until the evaluations (between_stages)
        sampler.suspend()
    with clock("select + score"):
        sel, srows, score_info = prepare_training_data(
            store,
            cfg.model,
            model,
            tok,
            cfg.selection,
            cfg.train,
            out / "scores.parquet",
            rescore=cfg.rescore,
            progress=progress,
            engine=engine,
        )
    examples = examples_from_selection(srows, cfg.selection.truncated)
    release_workers()  # free the Ray workers' models while this process trains
    cfg, res = calibrate_and_train(cfg, out, examples, model, tok, tmpl, val_p, clock, progress, overwrite)
    if cfg.train.full_finetune:  # the base for evaluation and the fork analysis
        model, tok = load_model(cfg.model)
    gates = example_gates(examples, cfg.train, res["tau"])
    if sampler is not None:
        sampler.resume()
    reports, stores, trained_model = evaluate_both(
        cfg, out, model, tok, tmpl, test_p, clock, sampler, samplers, engine, progress, overwrite, src
    )
    tables = [t for t in (tier_table(test_p, stores),) if t]
    with clock("fork analysis"):
        fc = fork_changes(model, trained_model, tok, examples, gates)
    tables.append(fork_table(fc))
    paired = paired_accuracy(stores)
    summary = build_summary(cfg, res, reports, paired, score_info, sel, fc, tables, clock.timings)
    summary["entropy"]["values"] = [h for e in examples for h in e.entropies]
    summary["examples"] = report_examples(model, tok, examples, gates)
    return finish_run(cfg, out, summary, paired, res, progress)


def calibrate_and_train(cfg: RunConfig, out: Path, examples, model, tok, tmpl, val_p, clock, progress, overwrite):
    """tau from the [calibrate] sweep on the validation split (when taus are given; the chosen
    tau is written back to run_config.json), then `stages.train.train`. Returns (cfg, result)."""
    from ..stages.tracking import make_tracker
    from ..stages.train import train

    # one validation for the tau sweep and the checkpoint choice: greedy, or sampled at
    # validation_temperature with [eval] top_p and seed
    validate = (
        validation_accuracy_fn(
            *(val_p, tmpl, tok, cfg.eval.max_new_tokens, cfg.eval.batch_size, cfg.eval.stop),
            temperature=cfg.validation_temperature,
            top_p=cfg.eval.top_p,
            seed=cfg.eval.seed,
        )
        if val_p
        else None
    )
    if cfg.calibrate.taus:  # the test split is not touched
        from .tau_sweep import sweep_tau

        with clock("calibrate tau"):
            cal = sweep_tau(
                examples,
                cfg.model,
                model,
                tok,
                validate,
                taus=cfg.calibrate.taus,
                train_cfg=cfg.train,
                out=out / "calibrate",
                max_steps=cfg.calibrate.max_steps,
                progress=progress,
                overwrite=overwrite,
            )
        cfg = replace(cfg, train=replace(cfg.train, tau=cal["best_tau"]))
        write_run_config(out, cfg)
    with clock("train"):
        res = train(
            examples,
            cfg.train,
            out / "train",
            model,  # LoRA: handed back unchanged (no copy); a full fine-tune trains it in place
            tok,
            base_spec=cfg.model,
            validate=validate,
            shuffle=False,
            progress=progress,  # selection already ordered the rows
            overwrite=overwrite,
            tracker=make_tracker(cfg.report_to, out / "train", asdict(cfg), out.name),
        )
    return cfg, res


def evaluate_both(cfg, out, model, tok, tmpl, test_p, clock, sampler, samplers, engine, progress, overwrite, src=None):
    """The base and the trained model (train/merged; with vLLM the adapter served as a LoRA, or a
    new engine for a full fine-tune) on the test problems; the base's stores copied from the run
    dir `src` (`reuse`) when made with the same inputs. Returns (reports, stores, trained model)."""
    from ..backends.vllm import make_sampler
    from ..models import load_model

    reports, stores, trained_model = {}, {}, None
    for name, spec in (("base", cfg.model), ("trained", str(out / "train" / "merged"))):
        with clock(f"eval {name}"):
            if name == "trained":
                trained_model, _ = load_model(spec)
            m = model if name == "base" else trained_model
            esampler = sampler
            if sampler is not None and name == "trained":
                if cfg.train.full_finetune:  # no adapter to serve: a new engine on the merged weights
                    sampler.close()
                    sampler = esampler = make_sampler(cfg.backend, spec, cfg.vllm, tokenizer=tok)
                    samplers.append(sampler)
                else:  # the trained adapter, as a LoRA on the same engine
                    spec = str(out / "train" / "adapter")
                    esampler = sampler.for_model(spec)
            reports[name], stores[name] = evaluate_model(
                m,
                tok,
                spec,
                test_p,
                tmpl,
                cfg.eval,
                out / "eval" / name,
                label=f"{name}: {spec}",
                overwrite=overwrite,
                progress=progress,
                engine=engine,
                sampler=esampler,
                reuse=src / "eval" / "base" if src is not None and name == "base" else None,
            )
    if sampler is not None:
        sampler.close()
    return reports, stores, trained_model
