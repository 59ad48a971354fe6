"""The `reasonmaxxer` argument parser: one small function per subcommand, in `--help` order."""

from __future__ import annotations

import argparse

from .commands_analysis import cmd_analyze, cmd_distill, cmd_intervene
from .commands_eval import cmd_eval, cmd_grade, cmd_models, cmd_sample, cmd_score
from .commands_train import cmd_baseline, cmd_calibrate, cmd_compare, cmd_demo, cmd_run, cmd_train
from .options import (
    Parser,
    add_backend,
    add_dry_run,
    add_engine,
    add_model,
    add_pair,
    add_problems,
    add_sampling,
    run_flags,
    train_flags,
)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand's parser, its flags and the `cmd_*` it runs (`fn`)."""
    ap = argparse.ArgumentParser(
        prog="reasonmaxxer", description="RL-free reasoning post-training at high-entropy forks."
    )
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    for add in (_models, _sample, _score, _grade, _run, _demo, _train, _calibrate, _analyze, _distill, _intervene,
                _baseline, _compare, _eval):  # fmt: skip
        add(sub)
    return ap


def _models(sub):
    p = sub.add_parser("models", help="list the embedded models (and convert them once)")
    p.add_argument("--convert", metavar="SPEC", help="convert an alias or .gguf file into the cache now")
    p.set_defaults(fn=cmd_models)


def _sample(sub):
    p = sub.add_parser("sample", help="sample completions per problem into a rollout store (graded)")
    add_model(p)
    add_problems(p, default="arith:train:200")
    add_sampling(p)
    p.add_argument("--greedy", action="store_true", help="one greedy completion per problem instead of --n samples")
    add_backend(p)
    p.add_argument("--out", required=True, help="rollout store directory")
    p.add_argument("--overwrite", action="store_true", help="replace a store made with different inputs")
    p.add_argument("--grade-workers", type=int, default=None, help="grading processes (0 = in-process)")
    add_engine(p)
    p.set_defaults(fn=cmd_sample)


def _score(sub):
    p = sub.add_parser(
        "score", help="teacher-forced entropies and log-probs of every rollout in a store (a score store)"
    )
    p.add_argument("--rollouts", required=True, help="rollout store (from `reasonmaxxer sample`)")
    p.add_argument("--out", required=True, help="score store directory")
    p.add_argument("--model", default=None, help="scoring model (default: the one that sampled the rollouts)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default; Ray workers: 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a score store made with different inputs")
    add_engine(p)
    p.set_defaults(fn=cmd_score)


def _grade(sub):
    p = sub.add_parser("grade", help="grade completions: a rollout store dir (in place) or a JSONL file")
    p.add_argument("input", help="rollout store dir, or a .jsonl with answer and completion fields")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--completion-field", default="completion")
    p.add_argument("--out", default=None, help="output JSONL (default: INPUT.graded.jsonl)")
    p.add_argument("--grade-workers", type=int, default=None)
    p.set_defaults(fn=cmd_grade)


def _run(sub):
    p = sub.add_parser("run", help="the whole pipeline from a TOML config (each stage resumable)", late=run_flags)
    p.add_argument("config", help="TOML run config (see configs/demo.toml)")
    _add_run_options(p, cmd_run)


def _demo(sub):
    p = sub.add_parser("demo", help="the main job: `run` with the embedded default model's presets", late=run_flags)
    _add_run_options(p, cmd_demo)


def _add_run_options(p, fn):
    """What `run` and `demo` share, besides the late flags (one per config field, config.py)."""
    p.add_argument("--overwrite", action="store_true", help="replace stages whose inputs changed")
    add_dry_run(p)
    p.set_defaults(fn=fn)


def _train(sub):
    p = sub.add_parser(
        "train",
        help="train an adapter from a rollout store (select, score, train, export)",
        late=lambda p: train_flags(p, with_tau=True),
    )
    _add_training_inputs(p, validation=None)
    p.add_argument(
        "--dist-timeout-minutes",
        type=float,
        default=60.0,
        help="under `accelerate launch`: how long a process waits for the others in a collective "
        "(torch's NCCL default is 10) (default: 60)",
    )
    p.add_argument("--rescore", action="store_true", help="re-score base entropies even if the sampler's can be reused")
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
    p.set_defaults(fn=cmd_train)


def _calibrate(sub):
    p = sub.add_parser(
        "calibrate",
        help="sweep tau with short trainings on a validation split",
        late=lambda p: train_flags(p, with_tau=False),
    )
    _add_training_inputs(p, validation="arith:validation:32")
    p.add_argument(
        "--taus", type=float, nargs="+", default=[0.8, 1.2, 1.6, 2.0, 2.4], help="candidate tau values, nats"
    )
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per candidate")
    p.set_defaults(fn=cmd_calibrate)


def _add_training_inputs(p, validation):
    """What `train` and `calibrate` share: the rollouts, the model, the output and the validation split."""
    p.add_argument("--rollouts", required=True, help="rollout store (from `reasonmaxxer sample`)")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--model", default=None, help="base model (default: the one that sampled the rollouts)")
    p.add_argument("--template", default=None, help="prompt template for validation (default: the rollouts')")
    p.add_argument("--validation", default=validation, help="held-out problems for checkpoint selection / calibration")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-new-tokens", type=int, default=256, help="for validation decoding")
    p.add_argument(
        "--overwrite", action="store_true", help="retrain a training dir made with another config or validation"
    )
    p.add_argument(
        "--validation-temperature",
        type=float,
        default=0.0,
        help="validation decoding: 0 = greedy; > 0 = one sample per problem at this temperature (official: 0.6)",
    )
    p.add_argument("--validation-top-p", type=float, default=1.0, help="top-p of sampled validation (official: 0.95)")
    p.add_argument("--threads", type=int, default=0)


def _analyze(sub):
    p = sub.add_parser(
        "analyze", help="token-level comparison of a tuned model with its base (reranked/shifted, entropy, KL/JS)"
    )
    add_pair(p, tuned_required=False)
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


def _distill(sub):
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


def _intervene(sub):
    p = sub.add_parser("intervene", help="causal checks: oracle, random control, entropy-gated sweep, cross-sampling")
    add_pair(p)
    p.add_argument("--taus", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 2.5], help="entropy thresholds, nats")
    p.add_argument("--random-seeds", type=int, default=3, help="seeds of the random control")
    p.add_argument("--js-eps", type=float, default=0.1, help="JS threshold (nats) for cross-sampling")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_intervene)


def _baseline(sub):
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
    p.add_argument("--max-train-flops", type=float, default=None, help="compute cap on training (FLOPs as counted)")
    p.add_argument(
        "--eval-at-flops", type=float, nargs="+", default=None, metavar="X",
        help="also evaluate at the first step reaching each of these FLOPs (e.g. 1x/2x/4x a ReasonMaxxer run's)",
    )  # fmt: skip
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N steps (0: at the end)")
    p.add_argument("--eval-at-start", action="store_true", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(fn=cmd_baseline)


def _compare(sub):
    p = sub.add_parser("compare", help="one table of ReasonMaxxer and baseline runs: accuracy, cost, compute-to-match")
    p.add_argument("runs", nargs="+", help="run dirs: a `run`/`demo` dir and/or `baseline` dirs")
    p.add_argument("--reference", default=None, help="the ReasonMaxxer run to match (default: the first `run` dir)")
    p.add_argument("--metric", default="avg_at_n", choices=["avg_at_n", "greedy"], help="held-out accuracy to match")
    p.add_argument("--gpu-hour-price", type=float, default=2.0, help="$ per GPU-hour, for the cost column")
    p.add_argument("--out", default="runs/compare")
    p.set_defaults(fn=cmd_compare)


def _eval(sub):
    p = sub.add_parser("eval", help="accuracy of a model: avg@n pass@1, pass@k, maj@k, greedy")
    add_model(p)
    add_problems(p, default="arith:test:100")
    add_sampling(p, n=4)
    p.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=True, help="also decode greedily")
    add_backend(p)
    p.add_argument("--out", default=None, help="output dir (default: runs/eval/<model>-<hash of the inputs>)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--grade-workers", type=int, default=None)
    add_engine(p)
    p.set_defaults(fn=cmd_eval)
