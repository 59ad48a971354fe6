"""The configuration of an RL baseline (`recipes.baselines`): the methods and `BaselineConfig`,
its TOML loader, TRL's `GRPOConfig`/`RLOOConfig` built from it (`trl_args`), and the run
directory's ``baseline_config.json`` (a resumed run must have the same config, `check_run_dir`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import ReasonMaxxerError
from ..io import atomic_write_json, json_ready, package_versions, read_toml
from ..stages.evaluate import EvalConfig
from .trl_scale import per_device_batch, vllm_args, world_size

# method -> (trainer, TRL config overrides). Anything else is TRL's own default.
METHODS: dict[str, tuple[str, dict]] = {
    "grpo": ("grpo", {}),
    "grpo-entropy": ("grpo", {"top_entropy_quantile": 0.2}),  # "Beyond the 80/20 rule"
    "dr-grpo": ("grpo", {"loss_type": "dr_grpo", "scale_rewards": "none"}),
    "rloo": ("rloo", {}),
}


@dataclass(frozen=True)
class BaselineConfig:
    """One RL baseline run. Defaults match the reference ReasonMaxxer run (configs/arith.toml)."""

    method: str = field(default="grpo", metadata={"help": "RL method", "choices": tuple(METHODS)})
    out: str = "runs/baseline-grpo"
    model: str = "smollm2-135m"
    template: str = "fewshot"
    train_problems: str = "arith:train:80"
    test_problems: str = "arith:test:96"
    data_dir: str | None = None
    loss_type: str | None = None  # None: the method's (TRL's default for grpo: "dapo")
    prompts_per_step: int = 4
    num_generations: int = 4
    max_new_tokens: int = 96
    temperature: float = 0.7
    lr: float = 1e-4
    beta: float | None = None  # KL coefficient; None: TRL's default (grpo 0.0, rloo 0.05)
    lora_rank: int = 32
    lora_alpha: int = 64
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    full_finetune: bool = False  # trained weights in fp32 (bf16 autocast on CUDA), see `fp32_trainable`
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step", "ge": 1})
    vllm: str = field(
        default="off", metadata={"help": "TRL generation through vLLM", "choices": ("off", "colocate", "server")}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "GPU memory share of colocated vLLM (TRL's default)", "gt": 0, "le": 1}
    )
    vllm_server_url: str | None = None  # vllm = "server": e.g. http://host:8000 (None: TRL's 0.0.0.0:8000)
    max_steps: int = 200
    max_train_seconds: float | None = None  # wall-clock cap on training (evaluation excluded)
    max_train_flops: float | None = field(
        default=None, metadata={"help": "compute cap on training, FLOPs as `step_compute` counts them", "gt": 0}
    )
    eval_at_flops: tuple[float, ...] = field(
        default=(), metadata={"help": "also evaluate at the first step whose counted FLOPs reach each of these"}
    )
    eval_every: int = 10  # steps; 0 = only at the end
    eval_at_start: bool = False  # also evaluate the untrained model (step 0)
    # held-out evaluation; None (the default): EvalConfig's defaults at this run's `max_new_tokens`,
    # set by __post_init__ (an [eval] table without a length gets it too: `load_baseline_config`)
    eval: EvalConfig | None = None
    seed: int = 0
    threads: int = 0

    def __post_init__(self):
        if self.eval is None:  # decode as long as training generates: a longer solution is not a wrong one
            object.__setattr__(self, "eval", EvalConfig(max_new_tokens=self.max_new_tokens))
        if self.method not in METHODS:
            raise ReasonMaxxerError(f"baseline: unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        if self.num_generations < 2:
            raise ReasonMaxxerError("baseline: num_generations must be >= 2 (group-relative advantages)")
        if self.prompts_per_step < 1 or self.max_steps < 1:
            raise ReasonMaxxerError("baseline: prompts_per_step and max_steps must be >= 1")
        per_device_batch(self, world_size())  # the batch must split evenly over grad_accum x processes


def load_baseline_config(path: str | Path | None = None, **overrides) -> BaselineConfig:
    """A `BaselineConfig` from a TOML file (top-level keys + an [eval] table); non-None overrides win.
    Keys, types and ranges are checked by `config.build_config` (an [eval] table fills in from
    `EvalConfig`'s defaults, as before). The evaluation decodes as long as training generates
    (`max_new_tokens`) unless the [eval] table says otherwise: `--max-new-tokens 192` alone must
    not evaluate at the default 96 and count every longer solution wrong."""
    from ..config import build_config

    raw = read_toml(path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    ev = raw.get("eval")  # no table: BaselineConfig's own default (the same rule); not a table: build_config's error
    if isinstance(ev, dict) and "max_new_tokens" not in ev:
        length = raw.get("max_new_tokens", BaselineConfig.__dataclass_fields__["max_new_tokens"].default)
        raw["eval"] = {**ev, "max_new_tokens": length}
    return build_config(BaselineConfig, raw, str(path or "baseline config"))


def trl_args(cfg: BaselineConfig, out: Path):
    """TRL's GRPOConfig or RLOOConfig for `cfg` (output under ``out/trl``). A key this TRL lacks, or
    a generation batch other than one optimizer step's completions, is refused."""
    from trl import GRPOConfig, RLOOConfig

    kind, over = METHODS[cfg.method]
    cls = GRPOConfig if kind == "grpo" else RLOOConfig
    import torch

    on_gpu = torch.cuda.is_available()
    kw = dict(
        output_dir=str(out / "trl"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=per_device_batch(cfg, world_size()),
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        learning_rate=cfg.lr,
        logging_steps=1,
        save_strategy="steps",
        # a checkpoint at every evaluation, or every 10 steps when evaluating only at the end or
        # at FLOPs budgets (the clock also saves at those), so a long run loses little on a crash
        save_steps=max(1, cfg.eval_every or min(10, cfg.max_steps)),
        save_total_limit=2,
        report_to=[],
        seed=cfg.seed,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        disable_tqdm=False,
        gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type="constant",
        warmup_steps=0,
        # TRL turns it on by default, which also turns off the KV cache in generation: on
        # the CPU, where memory is not short, that made each step minutes slower
        gradient_checkpointing=on_gpu,
    )
    kw.update(over)
    kw.update(vllm_args(cfg))
    if cfg.loss_type is not None:
        kw["loss_type"] = cfg.loss_type
    if cfg.beta is not None:
        kw["beta"] = cfg.beta
    known = {f.name for f in fields(cls)}
    missing = sorted(set(kw) - known)
    if missing:
        raise ReasonMaxxerError(f"baseline {cfg.method}: this TRL's {cls.__name__} lacks {missing}; upgrade trl")
    args = cls(**kw)
    want = cfg.prompts_per_step * cfg.num_generations
    if args.generation_batch_size != want:  # one generation per optimizer step, as the compute accounting assumes
        raise ReasonMaxxerError(
            f"baseline grad_accum: TRL generates {args.generation_batch_size} completions per batch, not "
            f"prompts_per_step x num_generations = {want}; check grad_accum against the number of processes"
        )
    return args


# keys added after runs were made, with the value those runs had
ADDED_KEYS = {
    "grad_accum": 1,
    "vllm": "off",
    "vllm_gpu_memory_utilization": 0.3,
    "vllm_server_url": None,
    "max_train_flops": None,
    "eval_at_flops": [],
}
# the limits, which may change when a run is resumed (a longer budget continues the same run)
LIMITS = ("max_steps", "max_train_seconds", "max_train_flops")


def check_run_dir(cfg: BaselineConfig, out: Path, train_p, test_p, write: bool = True) -> dict | None:
    """Write ``baseline_config.json`` (when `write`: the main process); refuse a directory holding
    another config. Returns the finished result when this run is already done with the same
    limits (a no-op), else None."""
    from ..data.problems import problems_hash

    config = {
        "baseline": json_ready(asdict(cfg)),
        "train_data_hash": problems_hash(train_p),
        "test_data_hash": problems_hash(test_p),
    }
    cpath = out / "baseline_config.json"
    if cpath.is_file():
        old = json.loads(cpath.read_text())
        old["baseline"] = {**ADDED_KEYS, **old["baseline"]}  # a run dir from before these keys
        keep = LIMITS + ("eval_at_flops", "threads", "vllm_gpu_memory_utilization")  # may change on resume
        strip = lambda c: {k: v for k, v in c["baseline"].items() if k not in keep}
        if strip(old) != strip(config) or old.get("train_data_hash") != config["train_data_hash"]:
            raise ReasonMaxxerError(
                f"{cpath}: this directory holds a baseline run with a different config; use another --out"
            )
    if write:
        atomic_write_json(cpath, {**config, "versions": package_versions()})
    result_path = out / "result.json"
    if result_path.is_file():
        res = json.loads(result_path.read_text())
        if all(res.get(k) == getattr(cfg, k) for k in LIMITS):
            return res
    return None
