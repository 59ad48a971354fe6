"""The command line's shared flag groups, and what turns parsed flags into the library's objects
(problems, sampling/engine configs, samplers, training and selection configs)."""

from __future__ import annotations

import argparse
import hashlib
import json

from ..data.prompts import TEMPLATES
from ..errors import ReasonMaxxerError


def add_model(p, default="smollm2-135m"):
    """--model: the model spec to load."""
    p.add_argument(
        "--model",
        default=default,
        help="alias (smollm2-135m), .gguf file, HF checkpoint dir, PEFT adapter dir or Hub id",
    )


def add_problems(p, default="arith:test:100"):
    """--problems and how to read them: --data-dir, the field names, --limit, --template."""
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
        help=f"prompt template: {', '.join(TEMPLATES)}, a .txt file, or a literal string with {{question}}",
    )


def add_sampling(p, n=4, temperature=0.7, max_new_tokens=256):
    """The decoding flags of `sample` and `eval` (read back by `sampling_config`), shards and threads."""
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


class Parser(argparse.ArgumentParser):
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


def run_flags(p):
    """`run`/`demo`'s late flags: one per run-config field (config.py)."""
    from ..config import add_config_flags

    add_config_flags(p)


# the TrainConfig / SelectionConfig fields that `train` and `calibrate` take as flags
TRAIN_KEYS = tuple(
    "tau_fraction variant gate lam lr epochs max_steps micro_batch grad_accum warmup_steps checkpoint_every "
    "lora_rank lora_alpha seed full_finetune gradient_checkpointing schedule_steps loss_impl normalisation skip_ungated".split()
)
SELECTION_KEYS = ("max_problems", "keep_shortest", "truncated", "order", "keep_unmixed")


def add_dry_run(p):
    """--dry-run and the GPU it plans for."""
    g = p.add_argument_group("--dry-run: the plan (problems, tokens, FLOPs, memory, GPU-hours, $) without running")
    g.add_argument("--dry-run", action="store_true", help="print the plan and exit (loads no model)")
    g.add_argument("--gpu", default="A100", choices=("A100", "H100"), help="GPU to plan for (default: A100)")
    g.add_argument("--gpu-memory-gb", type=float, default=None, help="its memory (default: 80)")
    g.add_argument(
        "--dollars-per-hour", type=float, default=None, help="assumed price per GPU-hour (default: A100 2.0, H100 3.0)"
    )


def train_flags(p, with_tau: bool):
    """`train`/`calibrate`'s late flags: the TrainConfig and SelectionConfig fields (+ --tau for `train`)."""
    from ..config import add_config_flags
    from ..stages.select import SelectionConfig
    from ..stages.train import TrainConfig

    names = TRAIN_KEYS + (("tau",) if with_tau else ())
    add_config_flags(p, TrainConfig, only=names, title="training (TrainConfig)")
    add_config_flags(p, SelectionConfig, only=SELECTION_KEYS, title="selection")


def add_engine(p):
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


def engine_config(a):
    """The `EngineConfig` of the --engine flags (`add_engine`)."""
    from ..backends.engines import EngineConfig

    return EngineConfig(
        engine=a.engine,
        workers=a.workers,
        threads=getattr(a, "threads", 0) or 0,
        ray_address=a.ray_address,
        gpus_per_worker=a.gpus_per_worker,
    )


def add_backend(p):
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


def sampler_for(a, spec: str):
    """The sampler the flags ask for: None (HF, built by the stage) or a `VLLMSampler` for `spec`."""
    from ..backends.vllm import VLLMOptions, make_sampler
    from ..stages.sample import check_backend

    check_backend(a.backend, getattr(a, "engine", None))
    opts = {k: getattr(a, k) for k in _VLLM_FLAGS if getattr(a, k, None) is not None}
    if opts and a.backend != "vllm":
        raise ReasonMaxxerError(f"--{next(iter(opts)).replace('_', '-')} applies to --backend vllm only")
    return make_sampler(a.backend, spec, VLLMOptions(**opts))


def add_pair(p, tuned_required: bool = True):
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


def sampling_config(a):
    """The `SamplingConfig` of the decoding flags (`add_sampling`)."""
    from ..backends.hf import SamplingConfig

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


def problems_from(a):
    """The problems the --problems flags name (`add_problems`)."""
    from ..data.benchmarks import load_problems

    return load_problems(
        a.problems, data_dir=a.data_dir, question_field=a.question_field, answer_field=a.answer_field, limit=a.limit
    )


def slug(*parts) -> str:
    """A short hash of `parts`, for default output dirs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def set_threads(a):
    """Apply --threads to torch (0 or absent: torch's default; `models.set_torch_threads` warns on a busy CPU)."""
    from ..models import set_torch_threads

    set_torch_threads(getattr(a, "threads", 0) or 0)


def train_config(a):
    """The `TrainConfig` of the given training flags (the rest: its defaults)."""
    from ..stages.train import TrainConfig

    return TrainConfig(**given(a, TRAIN_KEYS + ("tau",)))


def selection_config(a):
    """The `SelectionConfig` of the given selection flags (the rest: its defaults)."""
    from ..stages.select import SelectionConfig

    return SelectionConfig(**given(a, SELECTION_KEYS))


def given(a, keys) -> dict:
    """The flags among `keys` that were given (not None)."""
    return {k: getattr(a, k) for k in keys if getattr(a, k, None) is not None}


def store_model(a, store):
    """(model spec, manifest): --model, else the model that sampled the rollout `store`."""
    m = store.manifest()
    spec = a.model or m.get("model_spec")
    if not spec:
        raise ReasonMaxxerError(f"{store.root}/manifest.json: no model_spec recorded; pass --model")
    return spec, m
