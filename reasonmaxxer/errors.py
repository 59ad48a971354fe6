"""User-facing errors. The CLI prints these as one line on stderr and exits non-zero."""


class ReasonMaxxerError(Exception):
    """An error caused by the user's input or environment, with a message they can act on.

    Messages name the file/row/field at fault (``path:line: reason``) and, where a missing
    package or file is the cause, the command that fixes it.
    """


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """The first line of an exception's message, for a one-line error; `empty` (default: the
    exception's type name) when the message is blank."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if empty is None else empty


# The knobs that lower a stage's peak memory, named as the config keys / CLI flags a user sets.
OOM_KNOBS = {
    "sample": "lower [sampling] batch_size (--batch-size) or max_new_tokens; with vLLM, [vllm] gpu_memory_utilization",
    "score": "score fewer rows at once (--batch-size) or shorter rollouts (max_new_tokens at sampling)",
    "train": (
        "lower [train] micro_batch (--micro-batch; raise grad_accum to keep the step size), sample shorter "
        "rollouts (max_new_tokens), or train LoRA instead of full_finetune"
    ),
    "eval": "lower [eval] batch_size (--batch-size) or max_new_tokens; with vLLM, [vllm] gpu_memory_utilization",
    "analyze": "lower --batch-size or analyse fewer/shorter rollouts (--limit)",
    "fork analysis": "analyse fewer/shorter rollouts (the train split's max_new_tokens)",
    "intervene": "lower --batch-size or intervene on fewer rollouts (--limit)",
    "calibrate": "lower --micro-batch (raise --grad-accum to keep the step size) or sample shorter rollouts",
    "baseline": (
        "raise --grad-accum (a step's prompts x num_generations completions are split into that many micro-batches; "
        "the step size is kept), lower --max-new-tokens or [eval] batch_size, or with vLLM "
        "--vllm-gpu-memory-utilization"
    ),
    "distill": "lower --micro-batch (raise --grad-accum to keep the step size) or --max-new-tokens",
}


def is_out_of_memory(exc: BaseException) -> bool:
    """An out-of-memory error: torch.OutOfMemoryError (CUDA and other accelerators), or a
    RuntimeError whose message says so (some kernels raise plain "CUDA error: out of memory";
    the CPU allocator says "can't allocate memory")."""
    if any(t.__name__ == "OutOfMemoryError" for t in type(exc).__mro__):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def out_of_memory_error(stage: str, exc: BaseException) -> ReasonMaxxerError | None:
    """The one-line error for an out-of-memory `exc` raised in `stage` (a key of OOM_KNOBS, or
    a name starting with one, e.g. "eval base"), naming the knob that fixes it; None if `exc`
    is not an out-of-memory error. What earlier stages wrote is kept (artifacts are written
    atomically), so re-running the command resumes."""
    if not is_out_of_memory(exc):
        return None
    words = stage.replace("+", " ").split()
    key = stage if stage in OOM_KNOBS else next((k for k in OOM_KNOBS if k in words[:1]), None)
    key = key or next((k for k in OOM_KNOBS if k in words), None)
    hint = OOM_KNOBS.get(key, "lower the batch size or the sequence length")
    sentences = first_line(exc).split(". ")
    what = next((x for x in sentences if "memory" in x.lower()), sentences[0])[:160]
    return ReasonMaxxerError(
        f"{stage}: out of memory ({what}); {hint}. Finished artifacts are kept: re-run the same command to resume"
    )
