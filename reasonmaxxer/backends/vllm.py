"""The vLLM backend of the `Sampler` interface: sampling and evaluation on GPUs.

`VLLMSampler(model_spec, VLLMOptions(...))` draws the same completions the HF backend
describes (one request per (problem, sample), each with its own seed
``request_seed(seed, problem_id, sample_index)``), with vLLM's paged attention and
continuous batching. What it records per token differs in one way that matters:

- token ids and the sampled token's log-prob (``SamplingParams(logprobs=0)``: vLLM returns
  the sampled token's log-prob and no alternatives). vLLM's V1 engine (the default from
  0.8 on) computes these from the raw logits, before temperature and top-p/top-k, which is
  the untempered log-prob the HF backend records (``logprobs_mode="raw_logprobs"`` is the
  default where that option exists, >= 0.10.2; the old V0 engine returned processed ones);
- NO entropies (``Completion.entropies`` is None): vLLM returns at most the top-k
  log-probs of each step, never the full distribution, so the full-vocabulary entropy the
  gate needs is computed afterwards by the teacher-forced scoring stage
  (`pipeline.attach_scores` always rescores a store whose manifest says ``backend: vllm``).

Model specs: a HF checkpoint dir or Hub id is served as is; the embedded alias or a
``.gguf`` file is served from its converted safetensors checkpoint (`models.base_dir_for`);
a PEFT adapter dir is served as its base model plus the adapter as a LoRA
(``LLM(enable_lora=True, max_lora_rank=...)`` and a ``LoRARequest`` per generate call), so
a trained adapter is evaluated without merging, and `for_model` serves another adapter of
the same base from the same engine.

Parallelism: ``tensor_parallel_size`` is vLLM's own (one engine over that many GPUs).
``data_parallel_size`` > 1 starts that many independent engines (`vllm_engines`), one process each, pinned
to disjoint groups of ``tensor_parallel_size`` GPUs (``CUDA_VISIBLE_DEVICES``), and splits
each batch of requests between them in contiguous blocks (a problem's samples stay together,
for prefix caching). Per-request seeds make the samples independent of which engine drew
them. This does not use vLLM's own ``data_parallel_size`` engine argument, whose offline use
needs one launcher process per rank with ``VLLM_DP_*`` environment variables and whose
behaviour has changed between releases.

Memory (`vllm_runtime`): an unset ``gpu_memory_utilization`` is sized from what is free when
the engine starts (the HF model of `reasonmaxxer run` may already hold part of the GPU);
`suspend` / `resume` put the engine to sleep (vLLM sleep mode) or close it while the HF model
scores and trains (``between_stages``); `close` frees the engine's GPU memory.

vLLM is imported lazily; without it every entry point raises one `ReasonMaxxerError`
naming the install command, and a vllm older than 0.19.1 (transformers < 5) is refused the same way. It is not installable on the CPU machines this project is
developed on: this module is tested against a fake ``vllm`` module (what is passed in, how
what comes back is converted), never against vLLM itself. Written against vLLM >= 0.8 (the
API), installed as >= 0.19.1 (transformers 5)
(``LLM``, ``SamplingParams(seed=, logprobs=, stop_token_ids=)``, ``vllm.inputs.TokensPrompt``,
``vllm.lora.request.LoRARequest(name, int_id, path)``, ``RequestOutput.outputs[0]`` with
``token_ids``, ``logprobs`` (a list of {token_id: Logprob}), ``finish_reason``, ``stop_reason``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from ..errors import ReasonMaxxerError
from ..schema import check_fields
from .hf import Completion, Request, SamplingConfig, decode_completion, eos_token_ids, request_seed
from .vllm_engines import LocalEngine, ProcessEngine, require_vllm
from .vllm_runtime import (
    BETWEEN_STAGES,
    blocks,
    check_versions,
    generation_config,
    gpu_groups,
    load_tokenizer,
    lora_rank_bucket,
    served_model,
)


@dataclass(frozen=True)
class VLLMOptions:
    """How the vLLM engine(s) run. These do not change what is sampled (not in the config hash)."""

    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: GPUs per engine", "ge": 1})
    data_parallel_size: int = field(
        default=1,
        metadata={"help": "vllm: independent engines, one process each, on tensor_parallel_size GPUs", "ge": 1},
    )
    gpu_memory_utilization: float | None = field(
        default=None,
        metadata={
            "help": "vllm: fraction of each GPU's memory the engine may take (weights + KV cache); "
            "default: what is free when it starts, less 5%, at most 0.9",
            "gt": 0,
            "le": 1,
        },
    )
    dtype: str = field(default="bfloat16", metadata={"help": "vllm: dtype ('auto' = the checkpoint's)"})
    max_model_len: int | None = field(default=None, metadata={"help": "vllm: context length (default: the model's)"})
    enforce_eager: bool = field(
        default=False, metadata={"help": "vllm: no CUDA graphs / compilation (faster start, slower decode)"}
    )
    enable_lora: bool = field(
        default=False, metadata={"help": "vllm: serve adapters even when the model spec is a base model"}
    )
    max_lora_rank: int | None = field(
        default=None, metadata={"help": "vllm: max LoRA rank (default: the adapter's, or 64 with enable_lora)"}
    )
    seed: int = field(default=0, metadata={"help": "vllm: engine seed (each request also has its own)"})
    between_stages: str = field(
        default="auto",
        metadata={
            "help": "vllm (run): the engine while the HF model scores and trains: sleep (vLLM sleep mode), "
            "close (restart for eval), keep, or auto (keep unless it shares the HF model's GPU; then sleep, "
            "or close when CPU memory cannot hold the weights)",
            "choices": BETWEEN_STAGES,
        },
    )

    def __post_init__(self):
        check_fields(self, "vllm")


def sampling_params_kwargs(req: Request, cfg: SamplingConfig, eos: Sequence[int]) -> dict:
    """The `vllm.SamplingParams` keyword arguments of one request (n=1, its own seed)."""
    kw = {
        "n": 1,
        "seed": request_seed(cfg.seed, req.key[0], req.key[1]),
        "max_tokens": cfg.max_new_tokens,
        "logprobs": 0,
        "stop_token_ids": sorted(eos),
        "skip_special_tokens": True,
    }
    if cfg.greedy:
        kw.update(temperature=0.0, top_p=1.0, top_k=-1)
    else:  # top_k -1 = off (accepted by every release; newer ones also take 0, 0.8 rejects 0)
        kw.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k if cfg.top_k > 0 else -1)
    stop = [s for s in cfg.stop if s]  # "" means none (stages.sample.resolve_stop); vLLM would stop at once
    if stop:  # vLLM cuts the text before it (include_stop_str_in_output=False, its default)
        kw["stop"] = stop
    return kw


def finish_reason(plain: dict, key) -> str:
    """vLLM's finish reason -> ours: "length"; "stop" on a stop string -> "stop"; on EOS / a stop token -> "eos"."""
    fr = plain["finish_reason"]
    if fr == "length":
        return "length"
    if fr == "stop":
        return "stop" if isinstance(plain["stop_reason"], str) else "eos"
    raise ReasonMaxxerError(f"vllm: request {key} ended with finish_reason={fr!r}")


class VLLMSampler:
    """The vLLM backend of `Sampler` (see the module docstring). Engines start on first use."""

    name = "vllm"

    def __init__(self, model_spec: str, options: VLLMOptions | None = None, *, tokenizer=None):
        check_versions(require_vllm())
        self.spec = model_spec
        self.options = options or VLLMOptions()
        self.served = served_model(model_spec)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.served.base)
        self.eos = eos_token_ids(generation_config(self.served.base), self.tokenizer)
        o = self.options
        kw = {
            "model": self.served.base,
            "tokenizer": self.served.base,
            "dtype": o.dtype,
            "seed": o.seed,
            "tensor_parallel_size": o.tensor_parallel_size,
            "gpu_memory_utilization": o.gpu_memory_utilization,
            "enforce_eager": o.enforce_eager,
        }
        if o.max_model_len:
            kw["max_model_len"] = o.max_model_len
        if o.between_stages == "sleep":
            kw["enable_sleep_mode"] = True
        if o.enable_lora or self.served.adapter:
            rank = o.max_lora_rank or self.served.lora_rank or 64
            kw.update(enable_lora=True, max_lora_rank=lora_rank_bucket(rank), max_loras=1)
        self.llm_kwargs = kw
        # shared with the samplers `for_model` returns
        self._shared = {"engines": None, "lora_ids": {}, "asleep": False}

    def describe(self) -> dict:
        """For the store manifest: the backend, its options and what it serves."""
        return {
            "name": self.name,
            "options": asdict(self.options),
            "base": self.served.base,
            "adapter": self.served.adapter,
        }

    def for_model(self, model_spec: str) -> VLLMSampler:
        """A sampler for another adapter of the same base (or the base itself), on the same engine(s)."""
        served = served_model(model_spec)
        if served.base != self.served.base:
            raise ReasonMaxxerError(
                f"vllm: {model_spec} is served from {served.base}, not from this engine's {self.served.base}"
            )
        if served.adapter:
            if not self.llm_kwargs.get("enable_lora"):
                raise ReasonMaxxerError(
                    f"vllm: {model_spec} is a LoRA adapter but the engine was started without enable_lora"
                )
            if served.lora_rank > self.llm_kwargs["max_lora_rank"]:
                raise ReasonMaxxerError(
                    f"vllm: adapter rank {served.lora_rank} > the engine's max_lora_rank "
                    f"{self.llm_kwargs['max_lora_rank']}"
                )
        other = copy.copy(self)
        other.spec, other.served = model_spec, served
        return other

    def _engines(self) -> list:
        """The running engine(s): started on first use (replicas all at once), woken if asleep."""
        if self._shared["engines"] is None:
            o = self.options
            if o.data_parallel_size == 1:
                self._shared["engines"] = [LocalEngine(self.llm_kwargs)]
            else:
                groups = gpu_groups(o.data_parallel_size, o.tensor_parallel_size)
                engines = []
                try:
                    for g in groups:  # every replica process starts loading now ...
                        engines.append(ProcessEngine(self.llm_kwargs, g))
                    for e in engines:  # ... then we wait for them, so they load side by side
                        e.wait_ready()
                except BaseException:
                    for e in engines:
                        e.close()
                    raise
                self._shared["engines"] = engines
        self.resume()
        return self._shared["engines"]

    def suspend(self) -> None:
        """Free the GPU(s) for the HF model between sampling and evaluation, per ``between_stages``:
        "sleep": vLLM sleep mode, level 1 (weights to CPU memory, KV cache dropped; the weights
        are still the base's, which the base evaluation after training needs); "close": stop the
        engine(s), started again on next use; "keep" (and "auto" outside `run`): nothing."""
        mode = self.options.between_stages
        engines = self._shared["engines"]
        if mode == "close":
            self.close()
        elif mode == "sleep" and engines and not self._shared["asleep"]:
            for e in engines:
                e.sleep(1)
            self._shared["asleep"] = True

    def resume(self) -> None:
        """Wake the engine(s) after `suspend` (a closed engine restarts on next use)."""
        if self._shared["asleep"]:
            for e in self._shared["engines"]:
                e.wake_up()
            self._shared["asleep"] = False

    def _lora(self) -> tuple | None:
        """(name, int id, path) of the adapter served, or None for the base. A rewritten adapter dir gets a new id."""
        a = self.served.adapter
        if not a:
            return None
        key = (a, os.stat(a).st_mtime_ns)
        ids = self._shared["lora_ids"]
        if key not in ids:
            ids[key] = len(ids) + 1
        return (f"adapter-{ids[key]}", ids[key], a)

    def generate(
        self,
        requests: Sequence[Request],
        cfg: SamplingConfig,
        on_done: Callable[[Completion], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Draw one completion per request (request order). `cfg.batch_size` is not used: vLLM schedules itself.

        `on_done` is called for each completion and `progress(n_tokens)` once, after the batch.
        """
        if not requests:
            return []
        for r in requests:
            if not r.prompt_ids:
                raise ReasonMaxxerError(f"sampling: request {r.key} has an empty prompt")
        params = [sampling_params_kwargs(r, cfg, self.eos) for r in requests]
        prompts = [r.prompt_ids for r in requests]
        lora = self._lora()
        engines = self._engines()
        spans = blocks(len(requests), len(engines))
        for eng, (a, b) in zip(engines, spans):
            if b > a:
                eng.submit(prompts[a:b], params[a:b], lora)
        plain = []
        for eng, (a, b) in zip(engines, spans):
            if b > a:
                plain.extend(eng.result())
        comps = []
        for r, p in zip(requests, plain):
            reason = finish_reason(p, r.key)
            comps.append(
                Completion(
                    r.key,
                    p["token_ids"],
                    p["logprobs"],
                    None,
                    reason,
                    decode_completion(self.tokenizer, p["token_ids"], reason, cfg.stop),
                )
            )
        for c in comps:
            if on_done:
                on_done(c)
        if progress:
            progress(sum(len(c.token_ids) for c in comps))
        return comps

    def close(self) -> None:
        """Stop the engine(s): replica processes exit; an in-process engine is dropped and its GPU
        memory and process groups freed (`free_engine_memory`). The next use starts new ones."""
        engines, self._shared["engines"] = self._shared["engines"], None
        self._shared["asleep"] = False
        for e in engines or []:
            e.close()


def make_sampler(backend: str | None, model_spec: str, options: VLLMOptions | None = None, *, tokenizer=None):
    """None for the HF backend (the stage builds it from the loaded model), a `VLLMSampler` for "vllm"."""
    backend = backend or "hf"
    if backend == "hf":
        return None
    if backend == "vllm":
        return VLLMSampler(model_spec, options, tokenizer=tokenizer)
    raise ReasonMaxxerError(f"unknown sampling backend {backend!r} (hf | vllm)")
