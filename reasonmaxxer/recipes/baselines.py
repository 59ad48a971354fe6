"""RL baselines through TRL (method.md s.4-5): GRPO, its 80/20 entropy-gated variant, Dr. GRPO, RLOO.

We do not re-implement RL: `run_baseline` builds TRL's `GRPOTrainer` / `RLOOTrainer` with the
same model, problems, prompt template and verifier as a ReasonMaxxer run (the reward is
`verify.grade`, strict), LoRA of the same rank by default (full fine-tune as an option), and
adds what a fair comparison needs:

- held-out evaluation every `eval_every` steps with the project's own sampler and grader
  (`stages.evaluate.evaluate_model`, the same code that evaluates a ReasonMaxxer run), logged to
  ``curve.jsonl`` against training wall-clock (evaluation time excluded), generated tokens,
  trained tokens and estimated FLOPs (`flops`: 2N per forward token, 6N per trained token);
- a wall-clock cap (`max_train_seconds`) and a compute cap (`max_train_flops`) besides
  `max_steps`, and held-out evaluations at given compute budgets (`eval_at_flops`: with TRL's
  constant learning rate, the model at a budget is the model a run capped there would give);
- stop/resume through TRL's checkpoints (our counters are saved inside each checkpoint).

Artifacts in ``out``: ``baseline_config.json``, ``curve.jsonl``, ``trl/checkpoint-*``,
``evals/step-N/`` (adapter + eval stores + eval.md), ``adapter/`` (final), ``result.json``.
The config, TRL's arguments and ``baseline_config.json`` are built in `recipes.baseline_config`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ReasonMaxxerError
from ..io import atomic_dir, atomic_write_bytes, atomic_write_json, read_jsonl
from ..stages.evaluate import EvalConfig
from .baseline_config import LIMITS, METHODS, BaselineConfig, check_run_dir, load_baseline_config, trl_args
from .trl_scale import COUNTED, agree_across_processes, fp32_trainable, require_vllm

__all__ = [
    "METHODS",
    "BaselineConfig",
    "load_baseline_config",
    "flops",
    "make_reward",
    "step_compute",
    "flops_budgets",
    "run_baseline",
]


# -- pure helpers ------------------------------------------------------------------------------
def flops(n_params: int, forward_tokens: float, trained_tokens: float) -> float:
    """Estimated FLOPs: 2*N per token through a forward pass only, 6*N per token trained
    (forward + backward). N = parameter count of the model (not of the adapter: the
    backward pass still runs through the frozen weights)."""
    return 2.0 * n_params * forward_tokens + 6.0 * n_params * trained_tokens


def make_reward(
    golds_by_prompt: dict[str, str], prompt_lengths: dict[str, int], counters: dict, grade_fn: Callable | None = None
) -> Callable:
    """A TRL reward function: 1.0 when our strict grader accepts the completion, else 0.0.

    TRL calls it with every generated completion (``prompts``, ``completions``,
    ``completion_ids`` and the dataset's other columns). It also counts, into `counters`,
    the tokens generated and the prompt tokens prefilled, which is how a baseline's
    sampling compute is measured.
    """
    if grade_fn is None:
        from ..verify import grade_many

        def grade_fn(golds, texts):
            return [g.strict.correct for g in grade_many(golds, texts, workers=0)]

    def reasonmaxxer_reward(prompts, completions, completion_ids=None, **kwargs):
        golds = []
        for p in prompts:
            if p not in golds_by_prompt:
                raise ReasonMaxxerError("baseline reward: TRL passed a prompt that is not in the training set")
            golds.append(golds_by_prompt[p])
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        if completion_ids is not None:
            n_gen = sum(len(c) for c in completion_ids)
        else:
            n_gen = 0
        counters["generated_tokens"] = counters.get("generated_tokens", 0) + n_gen
        counters["prompt_tokens"] = counters.get("prompt_tokens", 0) + sum(prompt_lengths[p] for p in prompts)
        counters["completions"] = counters.get("completions", 0) + len(prompts)
        ok = grade_fn(golds, texts)
        counters["correct"] = counters.get("correct", 0) + sum(bool(x) for x in ok)
        return [1.0 if x else 0.0 for x in ok]

    return reasonmaxxer_reward


def step_compute(counters: dict, n_params: int, *, beta: float) -> dict:
    """Compute so far from the counters: every sequence (prompt + completion) is generated
    (2N/token), then trained on (6N/token); with a KL term (beta > 0) the reference model
    scores it once more (2N/token)."""
    seq_tokens = counters.get("generated_tokens", 0) + counters.get("prompt_tokens", 0)
    forward = seq_tokens * (2 if beta > 0 else 1)
    return {
        "generated_tokens": counters.get("generated_tokens", 0),
        "forward_tokens": forward,
        "trained_tokens": seq_tokens,
        "flops": flops(n_params, forward, seq_tokens),
    }


def flops_budgets(cfg: BaselineConfig, before: float, after: float) -> tuple[bool, bool]:
    """(stop: the FLOPs cap is reached, evaluate: a budget of ``eval_at_flops`` was first reached)
    after a step that took the counted FLOPs from `before` to `after` (the same on every process:
    the counters are summed over processes)."""
    capped = cfg.max_train_flops is not None and after >= cfg.max_train_flops
    return capped, any(before < f <= after for f in cfg.eval_at_flops)


# -- the run -------------------------------------------------------------------------------------
def _read_curve(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [r for _, r in read_jsonl(path, allow_empty=True, torn_tail=True)]  # a crash may tear the last line


def _write_curve(path: Path, rows: Sequence[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def _training_prompts(train_p, tokenizer, tmpl) -> tuple[list[dict], dict[str, int], dict[str, str]]:
    """(dataset rows {prompt, problem_id}, prompt token counts, gold answers), keyed by prompt text.
    TRL must tokenize each prompt exactly as reasonmaxxer does, or the run is refused."""
    from ..data.prompts import render_prompt

    rows, plen, golds = [], {}, {}
    for p in train_p:
        text = render_prompt(tmpl, p.question, tokenizer)
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        if list(ours) != list(tokenizer(text=text)["input_ids"]):
            raise ReasonMaxxerError(
                f"baseline: problem {p.id}: TRL would tokenize the prompt differently from "
                "reasonmaxxer (the tokenizer adds special tokens); not supported yet"
            )
        plen[text] = len(ours)
        golds.setdefault(text, p.answer)
        rows.append({"prompt": text, "problem_id": p.id})
    return rows, plen, golds


def _restore(out: Path, curve_path: Path, write: bool = True) -> tuple[dict, str | None]:
    """(counters, last TRL checkpoint or None): counters saved with the checkpoint, and the
    curve cut back to that checkpoint's step (rows after it are redone; when `write`)."""
    from transformers.trainer_utils import get_last_checkpoint

    counters: dict = {"train_seconds": 0.0, "eval_seconds": 0.0}
    last = get_last_checkpoint(str(out / "trl")) if (out / "trl").is_dir() else None
    if last:
        saved = Path(last) / "reasonmaxxer_counters.json"
        if saved.is_file():
            counters.update(json.loads(saved.read_text()))
        step0 = int(Path(last).name.split("-")[-1])
        if write:
            _write_curve(curve_path, [r for r in _read_curve(curve_path) if r["step"] <= step0])
    elif write:
        _write_curve(curve_path, [])
    return counters, last


def _save_trained(model, tokenizer, d: Path, cfg: BaselineConfig) -> None:
    if cfg.full_finetune:
        atomic_dir(d, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    else:
        from ..stages.checkpoint import save_adapter

        atomic_dir(d, lambda tmp: save_adapter(model, tokenizer, tmp, cfg.model))


@dataclass
class _EvalContext:
    """What the held-out evaluation during training needs (see `_make_clock`)."""

    cfg: BaselineConfig
    out: Path
    tokenizer: object
    test_p: list
    tmpl: object
    counters: dict
    n_params: int
    beta: float
    progress: bool

    @property
    def curve_path(self) -> Path:
        return self.out / "curve.jsonl"

    def evaluate(self, m, step: int) -> None:
        """Evaluate `m` on the test problems at `step` and (re)write that row of the curve."""
        import torch

        from ..stages.evaluate import evaluate_model

        cfg, t0 = self.cfg, time.time()
        d = self.out / "evals" / f"step-{step:05d}"
        spec_dir = d / ("model" if cfg.full_finetune else "adapter")
        _save_trained(m, self.tokenizer, spec_dir, cfg)
        was_training = m.training
        m.eval()
        try:
            with torch.no_grad():
                rep, _ = evaluate_model(
                    m, self.tokenizer, str(spec_dir), self.test_p, self.tmpl, cfg.eval, d,
                    label=f"{cfg.method} step {step}", progress=self.progress,
                )  # fmt: skip
        finally:
            m.train(was_training)
        c = self.counters
        c["eval_seconds"] += time.time() - t0
        row = {
            "step": step,
            "train_seconds": round(c["train_seconds"], 2),
            "n_params": self.n_params,
            "eval_seconds": round(c["eval_seconds"], 2),
            **step_compute(c, self.n_params, beta=self.beta),
            "reward_mean": c.get("correct", 0) / max(1, c.get("completions", 0)),
            **_accuracy_fields(rep, cfg.eval),
        }
        _write_curve(self.curve_path, [r for r in _read_curve(self.curve_path) if r["step"] != step] + [row])
        if self.progress:
            acc = ", ".join(f"{k} {row[k]:.3f}" for k in ("greedy", "avg_at_n") if row.get(k) is not None)
            print(f"[{cfg.method}] step {step}: {acc} after {row['train_seconds']:.0f} s of training", flush=True)


def _make_clock(ctx: _EvalContext):
    """A TRL callback: training wall-clock (evaluation excluded), held-out evals every
    `eval_every` steps and at the end, the wall-clock cap, counters saved in checkpoints.

    Only the main process (``state.is_world_process_zero``, set by the Trainer on every
    process) evaluates and writes files; the stop and save decisions are the same on all
    processes (`agree_across_processes`)."""
    from transformers import TrainerCallback

    cfg, counters = ctx.cfg, ctx.counters

    class Clock(TrainerCallback):
        def __init__(self):
            self.t = None
            self.synced = {}

        def on_train_begin(self, args, state, control, **kw):
            self.synced = {k: counters.get(k, 0) for k in COUNTED}
            self.t = time.time()
            if not state.is_world_process_zero:
                return
            done = any(r["step"] == 0 for r in _read_curve(ctx.curve_path))
            if cfg.eval_at_start and state.global_step == 0 and not done:
                ctx.evaluate(kw["model"], 0)
                self.t = time.time()

        def on_step_end(self, args, state, control, **kw):
            now = time.time()
            counters["train_seconds"] += now - self.t
            capped = cfg.max_train_seconds is not None and counters["train_seconds"] >= cfg.max_train_seconds
            delta = {k: counters.get(k, 0) - self.synced[k] for k in COUNTED}
            total, capped = agree_across_processes(delta, capped)
            before = step_compute(self.synced, ctx.n_params, beta=ctx.beta)["flops"]
            for k in COUNTED:
                counters[k] = self.synced[k] + total[k]
            self.synced = {k: counters[k] for k in COUNTED}
            flops_capped, budget = flops_budgets(
                cfg, before, step_compute(counters, ctx.n_params, beta=ctx.beta)["flops"]
            )
            capped = capped or flops_capped
            if capped:
                control.should_training_stop = True
            last_step = capped or state.global_step >= state.max_steps
            if last_step or budget or (cfg.eval_every and state.global_step % cfg.eval_every == 0):
                if state.is_world_process_zero:
                    ctx.evaluate(kw["model"], state.global_step)
                control.should_save = True
            self.t = time.time()
            return control

        def on_save(self, args, state, control, **kw):
            ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and ck.is_dir():
                atomic_write_json(ck / "reasonmaxxer_counters.json", counters)

    return Clock()


def _flops_progress(ctx: _EvalContext):
    """The Trainer's progress bar (`ProgressCallback`, whose log printing it keeps) counted in
    FLOPs of the ``max_train_flops`` cap instead of steps: a FLOPs-capped run's ``max_steps`` is
    only a ceiling (the method study passes 100000), so a bar of steps would say nothing. Runs
    after `_make_clock`'s callback, which updates the counters."""
    from tqdm.auto import tqdm
    from transformers.trainer_callback import ProgressCallback

    cap = ctx.cfg.max_train_flops

    def now() -> float:
        return min(step_compute(ctx.counters, ctx.n_params, beta=ctx.beta)["flops"], cap)

    class FlopsProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                desc = f"{ctx.cfg.method} (FLOPs of the cap)"
                self.training_bar = tqdm(total=cap, initial=now(), unit="FLOP", unit_scale=True, desc=desc)
            self.current_step = 0

        def on_step_end(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.training_bar.update(now() - self.training_bar.n)
                self.training_bar.set_postfix(step=state.global_step)

    return FlopsProgress()


def _swap_progress_bar(trainer, ctx: _EvalContext) -> None:
    """A FLOPs-capped run: replace TRL's step progress bar (when shown) by one in FLOPs of the cap."""
    from transformers.trainer_callback import ProgressCallback

    if ctx.cfg.max_train_flops is not None and trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_flops_progress(ctx))


def run_baseline(
    cfg: BaselineConfig, *, progress: bool = True, model=None, tokenizer=None, grade_fn: Callable | None = None
) -> dict:
    """Train one RL baseline with TRL, evaluating on held-out problems along the way.

    Resumes from the last TRL checkpoint in ``out/trl`` when the config is unchanged (a
    changed config is an error: use a new `out`). Returns the contents of ``result.json``.
    `model`/`tokenizer` may be passed in (tests); `grade_fn(golds, texts) -> list[bool]`
    replaces the grader (tests only).
    """
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOTrainer, RLOOTrainer

    from ..data.benchmarks import load_problems
    from ..data.prompts import get_template
    from ..models import load_model, set_torch_threads

    require_vllm(cfg)
    set_torch_threads(cfg.threads)  # warns on a CPU that other jobs keep busy
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_p = load_problems(cfg.train_problems, data_dir=cfg.data_dir)
    test_p = load_problems(cfg.test_problems, data_dir=cfg.data_dir)
    if not train_p or not test_p:
        raise ReasonMaxxerError("baseline: the training or test problem set is empty")
    args = trl_args(cfg, out)  # also sets up the processes under `accelerate launch`
    main = args.process_index == 0
    done = check_run_dir(cfg, out, train_p, test_p, write=main)
    if done is not None:
        return done

    if model is None:
        model, tokenizer = load_model(cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tmpl = get_template(cfg.template)
    rows, plen, golds = _training_prompts(train_p, tokenizer, tmpl)
    n_params = sum(p.numel() for p in model.parameters())
    counters, last = _restore(out, out / "curve.jsonl", write=main)
    kind, _ = METHODS[cfg.method]
    beta = float(args.beta)
    lora = dict(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules), lora_dropout=0.0)
    ctx = _EvalContext(cfg, out, tokenizer, test_p, tmpl, counters, n_params, beta, progress)
    trainer = (GRPOTrainer if kind == "grpo" else RLOOTrainer)(
        model=model,
        reward_funcs=make_reward(golds, plen, counters, grade_fn),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=None if cfg.full_finetune else LoraConfig(**lora, task_type="CAUSAL_LM"),
        callbacks=[_make_clock(ctx)],
    )
    _swap_progress_bar(trainer, ctx)
    if args.deepspeed_plugin is None:
        fp32_trainable(trainer.model)  # before train(), which builds the optimizer
    trainer.train(resume_from_checkpoint=last)
    final_dir = out / ("model" if cfg.full_finetune else "adapter")
    if main:
        _save_trained(trainer.model, tokenizer, final_dir, cfg)
    curve = _read_curve(ctx.curve_path)
    trl_keys = ("loss_type", "beta", "top_entropy_quantile", "num_generations", "scale_rewards")
    res = {
        "method": cfg.method,
        "model": cfg.model,
        "n_params": n_params,
        "steps": trainer.state.global_step,
        **{k: getattr(cfg, k) for k in LIMITS},  # max_steps, max_train_seconds, max_train_flops
        "train_seconds": round(counters["train_seconds"], 2),
        "eval_seconds": round(counters["eval_seconds"], 2),
        "trl": {k: getattr(args, k) for k in trl_keys if hasattr(args, k)},
        **step_compute(counters, n_params, beta=beta),
        "final": curve[-1] if curve else None,
        final_dir.name: str(final_dir),
    }
    if main:
        atomic_write_json(out / "result.json", res)
    return res


def _accuracy_fields(rep, ecfg: EvalConfig) -> dict:
    out = {"n_problems": rep.n_problems}
    if ecfg.n > 0:
        a = rep.strict.avg_at_n
        out.update(avg_at_n=a.value, avg_at_n_low=a.low, avg_at_n_high=a.high, n_samples=ecfg.n)
    if rep.strict.greedy is not None:
        g = rep.strict.greedy
        out.update(greedy=g.value, greedy_low=g.low, greedy_high=g.high)
    return out
