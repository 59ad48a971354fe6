"""Where a vLLM engine runs, for the vLLM backend (`reasonmaxxer.backends.vllm`).

`LocalEngine`: one engine in this process. `ProcessEngine`: one engine in a spawned child
process pinned to its own GPUs (``CUDA_VISIBLE_DEVICES``), driven over a pipe: the replicas of
``data_parallel_size`` > 1. Both take the same calls: `wait_ready`, `submit` (prompts, sampling
parameters, LoRA) then `result` (`plain_output` dicts in prompt order), `sleep`, `wake_up`,
`close`. vllm itself is imported lazily (`require_vllm`).
"""

from __future__ import annotations

import atexit
import gc
import math
import os
from collections.abc import Sequence

from ..errors import ReasonMaxxerError
from .vllm_runtime import auto_memory_utilization, free_engine_memory

INSTALL = "pip install 'reasonmaxxer[vllm]'"


def require_vllm():
    """Import vllm, or raise one clear error saying how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ReasonMaxxerError(
            f"the vLLM backend needs the vllm package ({e}): run `{INSTALL}` on a CUDA machine"
        ) from None
    return vllm


def plain_output(out) -> dict:
    """A vLLM RequestOutput -> {token_ids, logprobs (sampled tokens, nats), finish_reason, stop_reason}."""
    c = out.outputs[0]
    ids = [int(t) for t in c.token_ids]
    lps = []
    for i, t in enumerate(ids):
        step = c.logprobs[i] if c.logprobs is not None and i < len(c.logprobs) else None
        lp = step.get(t) if step is not None else None
        lps.append(float(getattr(lp, "logprob", lp)) if lp is not None else math.nan)
    return {"token_ids": ids, "logprobs": lps, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}


def generate_plain(llm, prompts: Sequence[Sequence[int]], params: Sequence[dict], lora: tuple | None) -> list[dict]:
    """One `LLM.generate` call on token-id prompts; returns `plain_output`s in prompt order."""
    vllm = require_vllm()
    try:
        from vllm.inputs import TokensPrompt
    except ImportError:  # a TypedDict: a plain dict is the same thing
        TokensPrompt = dict
    kw = {}
    if lora:
        from vllm.lora.request import LoRARequest

        kw["lora_request"] = LoRARequest(*lora)
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
        sampling_params=[vllm.SamplingParams(**p) for p in params],
        use_tqdm=False,
        **kw,
    )
    return [plain_output(o) for o in outs]


class LocalEngine:
    """One vLLM engine in this process.

    ``gpu_memory_utilization`` None is sized here, from what is free on this process's GPUs
    (`auto_memory_utilization`); a replica process sizes its own. Sleep and wake are vLLM's
    ``LLM.sleep(level=)`` / ``LLM.wake_up()`` (vllm/entrypoints/llm.py: level 1 offloads the
    weights to CPU memory and discards the KV cache; the engine must have been started with
    ``enable_sleep_mode=True``, a ModelConfig field, CUDA only).
    """

    def __init__(self, llm_kwargs: dict):
        import torch.distributed as dist

        kw = dict(llm_kwargs)
        if kw.get("gpu_memory_utilization") is None:
            kw["gpu_memory_utilization"] = auto_memory_utilization(kw.get("tensor_parallel_size", 1))
        self.owns_process_group = not (dist.is_available() and dist.is_initialized())
        self.llm = require_vllm().LLM(**kw)
        self._out = None

    def wait_ready(self) -> None:
        """Started in __init__ already (a replica process reports here)."""

    def submit(self, prompts, params, lora):
        self._out = generate_plain(self.llm, prompts, params, lora)

    def result(self) -> list[dict]:
        out, self._out = self._out, None
        return out

    def sleep(self, level: int) -> None:
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        import torch

        gc.collect()  # what training left in PyTorch's cache goes back to the driver before vLLM reallocates
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.llm.wake_up()

    def close(self):
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        del llm
        free_engine_memory(self.owns_process_group)


def _replica_main(conn, env: dict, llm_kwargs: dict) -> None:
    """A data-parallel replica process: its own GPUs, its own engine, commands over a pipe.

    Commands: ("generate", prompts, params, lora) -> ("ok", plain outputs); ("sleep", level) and
    ("wake_up",) -> ("ok", None); None -> close the engine and exit.
    """
    os.environ.update(env)
    try:
        eng = LocalEngine(llm_kwargs)
        conn.send(("ready", None))
        while (msg := conn.recv()) is not None:
            if msg[0] == "generate":
                eng.submit(*msg[1:])
                conn.send(("ok", eng.result()))
            else:
                getattr(eng, msg[0])(*msg[1:])
                conn.send(("ok", None))
        eng.close()
    except BaseException as e:  # reported to the parent, which raises it as a ReasonMaxxerError
        conn.send(("error", f"{type(e).__name__}: {e}"))


class ProcessEngine:
    """One vLLM engine in a child process pinned to `gpus` (spawned: CUDA must not be initialised here).

    The process starts loading in __init__; `wait_ready` waits for its engine, so that several
    replicas load at the same time.
    """

    def __init__(self, llm_kwargs: dict, gpus: Sequence[str]):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.gpus = ",".join(gpus)
        self.proc = ctx.Process(target=_replica_main, args=(child, {"CUDA_VISIBLE_DEVICES": self.gpus}, llm_kwargs))
        self.proc.start()  # not a daemon: vLLM starts its own worker processes for tensor parallelism
        atexit.register(self.close)  # runs before multiprocessing joins its non-daemon children at exit

    def wait_ready(self) -> None:
        self._recv()

    def _recv(self):
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            raise ReasonMaxxerError(
                f"vllm: the replica on GPUs {self.gpus} died (exit code {self.proc.exitcode})"
            ) from None
        if kind == "error":
            raise ReasonMaxxerError(f"vllm: the replica on GPUs {self.gpus} failed: {payload}")
        return payload

    def submit(self, prompts, params, lora):
        self.conn.send(("generate", list(prompts), list(params), lora))

    def result(self) -> list[dict]:
        return self._recv()

    def sleep(self, level: int) -> None:
        self.conn.send(("sleep", level))
        self._recv()

    def wake_up(self) -> None:
        self.conn.send(("wake_up",))
        self._recv()

    def close(self):
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(timeout=60)
            if self.proc.is_alive():
                self.proc.terminate()
