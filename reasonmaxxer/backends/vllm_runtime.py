"""What the vLLM backend checks and frees around its engines: versions, GPU memory, teardown.

- `check_versions`: the installed vllm is one that works with transformers 5 (>= 0.19.1,
  the first release after vLLM's "Update to transformers v5", vllm-project/vllm#30566; earlier
  releases declare ``transformers >= 4.56.0, < 5`` in requirements/common.txt) and the
  installed transformers satisfies what that vllm declares (its package metadata).
- `auto_memory_utilization`: the ``gpu_memory_utilization`` an engine gets when the user did
  not set one: what is free on its GPUs now (the HF model of the same process may already be
  there), less a margin, at most vLLM's own default 0.9.
- `plan_between_stages`: what the pipeline does with the engine while the HF model scores and
  trains: keep it, put it to sleep (vLLM sleep mode, level 1) or close it.
- `free_engine_memory`: after an in-process engine is dropped, collect it, empty PyTorch's
  cache and destroy the process groups vLLM created.

And the plain helpers of the backend: what a model spec serves (`served_model`), its
tokenizer, the GPU groups of the replicas and the request blocks they get.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ReasonMaxxerError, first_line

MIN_VLLM = (0, 19, 1)  # the first vllm release that supports transformers 5 (pyproject's `vllm` extra)
DEFAULT_UTILIZATION = 0.9  # vLLM's own default (LLM(gpu_memory_utilization=0.9))
MEMORY_MARGIN = 0.05  # of the GPU's total memory, left free beside what the engine takes
BETWEEN_STAGES = ("auto", "sleep", "close", "keep")


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release
    except InvalidVersion:
        return ()


def check_versions(vllm) -> None:
    """One-line `ReasonMaxxerError` when the installed vllm cannot run beside the installed transformers.

    A module without ``__version__`` (a source checkout, a test double) is not checked.
    """
    from importlib import metadata

    import transformers
    from packaging.requirements import InvalidRequirement, Requirement

    version = getattr(vllm, "__version__", None)
    if version is None:
        return
    rel = _release(str(version))
    if rel and rel[:3] < MIN_VLLM:
        want = ".".join(map(str, MIN_VLLM))
        raise ReasonMaxxerError(
            f"vllm {version} needs transformers < 5 and this package needs transformers 5: "
            f"pip install 'vllm>={want}' (or: pip install 'reasonmaxxer[vllm]')"
        )
    try:
        reqs = metadata.requires("vllm") or []
    except metadata.PackageNotFoundError:
        return
    for line in reqs:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.name.lower() != "transformers" or (req.marker and not req.marker.evaluate()):
            continue
        if not req.specifier.contains(transformers.__version__, prereleases=True):
            raise ReasonMaxxerError(
                f"vllm {version} declares {line!r} but transformers {transformers.__version__} is installed: "
                f"install a vllm whose requirement admits it, or `pip install 'transformers{req.specifier}'`"
            )


def auto_memory_utilization(n_gpus: int = 1) -> float:
    """The fraction of each GPU's total memory an engine on the first `n_gpus` visible GPUs may take.

    ``min(0.9, free / total - 0.05)`` over those GPUs (``torch.cuda.mem_get_info``): vLLM checks
    at start that this fraction of the total is free, so 0.9 of the total fails when an HF model
    of this process already holds part of the GPU. 0.9 without a visible GPU.
    """
    import torch

    if not torch.cuda.is_available():
        return DEFAULT_UTILIZATION
    gc.collect()  # what PyTorch caches (training's freed tensors) is free memory for vLLM
    torch.cuda.empty_cache()
    fracs = []
    for i in range(min(n_gpus, torch.cuda.device_count())):
        free, total = torch.cuda.mem_get_info(i)
        fracs.append(free / total)
    frac = min(fracs, default=1.0) - MEMORY_MARGIN
    util = min(DEFAULT_UTILIZATION, int(frac * 100) / 100)
    if util < 0.05:
        raise ReasonMaxxerError(
            f"vllm: only {frac + MEMORY_MARGIN:.0%} of the GPU memory is free for the engine: "
            "free GPU memory or set vllm.gpu_memory_utilization (--gpu-memory-utilization)"
        )
    return util


def cpu_bytes_available() -> int | None:
    """Memory the OS reports as available (Linux /proc/meminfo MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def plan_between_stages(
    choice: str, dp: int, tp: int, train_device, weight_bytes: int, *, cpu_available: int | None = None
) -> str:
    """ "keep" | "sleep" | "close": what the engine does while the HF model scores and trains.

    An explicit choice is kept. "auto": "keep" when the HF model is not on a GPU an engine
    uses; otherwise "sleep" (vLLM sleep mode level 1 keeps the weights in CPU memory, one copy
    per engine) when the available CPU memory holds twice those copies, else "close" (the
    engine is started again for the evaluations).
    """
    if choice != "auto":
        return choice
    dev = str(train_device)
    if not dev.startswith("cuda"):
        return "keep"
    ordinal = int(dev.split(":")[1]) if ":" in dev else 0
    if ordinal >= min(dp * tp, len(visible_gpus())):  # the engines use the first dp * tp GPUs
        return "keep"
    avail = cpu_bytes_available() if cpu_available is None else cpu_available
    return "sleep" if avail is not None and avail >= 2 * dp * weight_bytes else "close"


def free_engine_memory(owned_process_group: bool) -> None:
    """After the last reference to an in-process `vllm.LLM` is dropped: collect it, empty PyTorch's
    CUDA cache and destroy vLLM's parallel groups.

    vLLM's own teardown (vllm/distributed/parallel_state.py, `cleanup_dist_env_and_memory`) is
    `destroy_model_parallel()`, `destroy_distributed_environment()` (which also destroys the
    torch.distributed default group), `gc.collect()`, `torch.cuda.empty_cache()`. The default
    group is destroyed only when vLLM created it (`owned_process_group`), never one the caller
    had initialised before the engine started.
    """
    import torch

    try:
        from vllm.distributed import parallel_state as ps
    except ImportError:
        ps = None
    if ps is not None:
        teardown = [getattr(ps, "destroy_model_parallel", None)]
        if owned_process_group:
            teardown.append(getattr(ps, "destroy_distributed_environment", None))
        for fn in teardown:
            if fn is not None:
                try:
                    fn()
                except Exception:  # best effort: the engine is already gone
                    pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- what a model spec serves, the GPUs and the request blocks of each replica -----------------
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # max_lora_rank values vLLM accepts


@dataclass(frozen=True)
class ServedModel:
    """What vLLM loads for a model spec: a base checkpoint (dir or Hub id) and an optional LoRA adapter dir."""

    base: str
    adapter: str | None = None
    lora_rank: int | None = None


def served_model(spec: str) -> ServedModel:
    from ..models import adapter_base, base_dir_for, resolve_spec

    r = resolve_spec(spec)
    if r.kind != "adapter":
        return ServedModel(base_dir_for(spec))
    cfg = json.loads((Path(r.path) / "adapter_config.json").read_text())
    return ServedModel(base_dir_for(adapter_base(r.path)), r.path, int(cfg.get("r") or 8))


def lora_rank_bucket(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    for b in LORA_RANKS:
        if rank <= b:
            return b
    raise ReasonMaxxerError(f"vllm: LoRA rank {rank} is above vLLM's maximum {LORA_RANKS[-1]}")


def visible_gpus() -> list[str]:
    """The visible GPU ids ($CUDA_VISIBLE_DEVICES, else every device); CUDA ordinal i is the i-th."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis:
        return [g.strip() for g in vis.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_groups(dp: int, tp: int) -> list[list[str]]:
    """Disjoint groups of `tp` visible GPU ids, one per data-parallel replica."""
    ids = visible_gpus()
    if len(ids) < dp * tp:
        raise ReasonMaxxerError(
            f"vllm: data_parallel_size {dp} x tensor_parallel_size {tp} needs {dp * tp} GPUs; {len(ids)} visible"
        )
    return [ids[r * tp : (r + 1) * tp] for r in range(dp)]


def blocks(n: int, k: int) -> list[tuple[int, int]]:
    """Split range(n) into k contiguous blocks of near-equal size: [(start, end), ...]."""
    q, r = divmod(n, k)
    out, a = [], 0
    for i in range(k):
        b = a + q + (i < r)
        out.append((a, b))
        a = b
    return out


def load_tokenizer(path: str):
    """The HF tokenizer of a checkpoint (left padding, a pad token), without loading the weights."""
    from transformers import AutoTokenizer

    from ..models import prepare_tokenizer

    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    except OSError as e:
        raise ReasonMaxxerError(f"{path}: could not load the tokenizer ({first_line(e, empty='')})") from e


def generation_config(path: str):
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None
