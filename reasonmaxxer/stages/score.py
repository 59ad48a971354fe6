"""Teacher-forced scoring: per-token entropy and log-probability under a (frozen) model.

ReasonMaxxer's gate needs, for every position of every stored rollout, the base model's
full-vocabulary entropy H_t = -sum_v p(v) log p(v) (nats, raw logits, no temperature) and
the log-probability of the token that was actually sampled. Both come from one
teacher-forced forward pass (method.md section 3, "Scoring").

The naive way (``model(ids).logits.float().log_softmax(-1)``) materialises fp32 [B, T, V]
logits: 400 MB for one 2048-token SmolLM2 sequence, 1.2 GB for Qwen's 151k vocabulary, and
a few more such buffers for the softmax and the entropy product. `score_sequences` instead
runs the decoder body once (hidden states [B, T, H]) and applies the output head to
``chunk_tokens`` positions at a time, so peak extra memory is O(chunk_tokens * V).

Conventions:

- Column t of the returned [B, T] tensors describes the distribution that *predicts*
  token t, i.e. the logits at position t-1. Column 0, padding, and (for left padding)
  the first real token of each row have no in-sequence predecessor and are 0.
- The sampled token's log-probability is called ``logprob`` (its surprisal is -logprob);
  ``entropy`` is always the full-vocabulary entropy.

Limitations: the output head is applied as ``model.get_output_embeddings()`` followed by
the logit post-processing that Hugging Face models declare in their config
(``final_logit_softcapping`` (Gemma 2/3), ``logit_scale`` (Cohere), ``logits_scaling``
(Granite)). Any other post-processing would make these scores silently wrong, so the first
call for each model compares the chunked path against ``model(...).logits`` on a short
probe and raises `ReasonMaxxerError` on a mismatch. Dropout is not disabled here: call
``model.eval()`` first.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from ..backends.distributed import is_main_process, sharded_map
from ..backends.engines import EngineConfig, Progress, map_shards
from ..core.entropy import entropy_logprob_inplace
from ..core.padding import pad_right
from ..errors import ReasonMaxxerError
from ..io import atomic_write_table, config_hash
from ..models import fp32_head_weight, logit_postprocess, split_decoder_head
from ..store import RolloutStore, ShardClaims
from .sample import record_engine


@dataclass
class ScoreTask:
    """Teacher-forced entropies and log-probs of one shard of rows (picklable, like `SampleTask`).
    Rows are scored `batch_size` at a time in order, so a shard whose size is a multiple of
    `batch_size` is batched exactly as in one pass over all rows: the numbers are identical."""

    model_spec: str
    batch_size: int = 4

    def setup(self, model=None, tokenizer=None) -> None:
        if model is None:
            from ..models import load_model

            model, tokenizer = load_model(self.model_spec)
        self._model, self._tok = model, tokenizer

    def run(self, shard: int, rows: Sequence[dict], progress: Progress) -> list[dict]:

        scores = score_tokens(rows, self._model, self._tok, batch_size=self.batch_size, on_batch=progress.units)
        return [
            {"problem_id": r["problem_id"], "sample_index": r["sample_index"], "entropies": e, "logprobs": lp}
            for r, (e, lp) in zip(rows, scores)
        ]


_SCORE_COLUMNS = ("problem_id", "sample_index", "prompt_ids", "token_ids")


def score_rows_on(
    rows: Sequence[dict],
    model_spec: str,
    engine: EngineConfig | None,
    *,
    batch_size: int = 4,
    chunk: int = 256,
    progress: bool = True,
    model=None,
    tokenizer=None,
) -> list[dict]:
    """Score `rows` in chunks of `chunk` rows (a multiple of `batch_size`) on `engine`; returns,
    in row order, {problem_id, sample_index, entropies, logprobs}. Nothing is written."""
    rows = [{k: r[k] for k in _SCORE_COLUMNS} for r in rows]
    chunks = {k: rows[a : a + chunk] for k, a in enumerate(range(0, len(rows), chunk))}
    got: dict[int, list] = {}
    map_shards(
        ScoreTask(model_spec, batch_size),
        chunks,
        engine,
        got.__setitem__,
        total=len(rows),
        desc="score",
        unit="row",
        progress=progress,
        model=model,
        tokenizer=tokenizer,
    )
    return [r for k in sorted(got) for r in got[k]]


def score_stage(
    rollouts: RolloutStore,
    out: str | Path,
    model_spec: str,
    *,
    batch_size: int = 4,
    overwrite: bool = False,
    model=None,
    tokenizer=None,
    progress: bool = True,
    engine: EngineConfig | None = None,
) -> RolloutStore:
    """Teacher-forced scores of every rollout under `model_spec` into a score store at `out`
    (`store.SCORE_SCHEMA`; shard i scores rollout shard i). Resumable like `sample_stage`."""
    import pyarrow.parquet as pq

    from ..models import model_fingerprint
    from ..store import SCORE_SCHEMA

    src = rollouts.manifest()
    store = RolloutStore(out, schema=SCORE_SCHEMA)
    config = {
        "stage": "score",
        "rollouts": src.get("config_hash"),
        "model": model_fingerprint(model_spec),
        "batch_size": batch_size,
    }
    store.open(
        config, {"kind": "scores", "model_spec": model_spec, "rollouts_dir": str(rollouts.root)}, overwrite=overwrite
    )
    if not rollouts.done_shards():
        raise ReasonMaxxerError(f"{rollouts.root}: the store has no shards yet")
    todo = {
        i: pq.read_table(rollouts.shard_path(i), columns=list(_SCORE_COLUMNS)).to_pylist()
        for i in sorted(rollouts.done_shards() - store.done_shards())
    }
    complete = bool(src.get("complete"))  # scoring a store still being sampled scores what is there
    if not todo:
        store.update_manifest(complete=complete)
        return store
    stats = map_shards(
        ScoreTask(model_spec, batch_size),
        todo,
        engine,
        store.write_shard,
        total=sum(len(r) for r in todo.values()),
        desc=f"score {Path(out).name}",
        unit="row",
        progress=progress,
        model=model,
        tokenizer=tokenizer,
        claims=ShardClaims(store),
    )
    record_engine(store, stats, score_seconds=stats.seconds, complete=complete)
    return store


class SequenceScores(NamedTuple):
    """Output of `score_sequences`; unpacks as ``entropy, logprob = ...``."""

    entropy: Tensor  # [B, T] fp32 nats, of the distribution predicting token t
    logprob: Tensor  # [B, T] fp32, log p(token t | tokens < t)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """[B, T] 0/1 -> [B, T] int64 positions counting real tokens from 0 (left or right padding).

    Padding positions get a clamped, meaningless position; they are never attended.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no argument
        return torch.is_autocast_enabled()


def _apply_head(head, post, h: Tensor, out: Tensor, w32: Tensor | None = None) -> Tensor:
    """fp32 logits of hidden states h [c, H] written into out [c, V] (a reused buffer).

    A plain bias-free fp32 nn.Linear head (the usual tied embedding) is computed straight
    into ``out``; so is a half-precision one whose fp32 weight `w32` [V, H] is given (see
    `fp32_head_weight`; h is upcast). Any other head (LoRA on lm_head, a bias) runs as a
    module and is copied (cast) in. ``post`` is the config-declared logit transform, or None.
    """
    autocast = _autocast_on(h.device.type)
    if w32 is not None and not autocast:
        torch.matmul(h.float(), w32.t(), out=out)
        if post is not None:
            out.copy_(post(out))
        return out
    plain = type(head) is torch.nn.Linear and head.bias is None and head.weight.dtype == out.dtype == h.dtype
    if plain and not autocast:
        torch.matmul(h, head.weight.t(), out=out)
        if post is not None:
            out.copy_(post(out))
        return out
    logits = head(h)  # [c, V] model dtype
    return out.copy_(logits if post is None else post(logits))


def _hidden_states(decoder, input_ids, attention_mask, position_ids) -> Tensor:
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden  # [B, T, H]


_CHECKED: weakref.WeakSet = weakref.WeakSet()


def _check_head_matches(model, decoder, head, post, input_ids: Tensor) -> None:
    """Once per model: chunked head == model(...).logits on a short probe, else raise."""
    try:
        if model in _CHECKED:
            return
    except TypeError:  # not weak-referenceable: check every call (cheap)
        pass
    probe = input_ids[:1, -8:]  # [1, k]
    mask = torch.ones_like(probe)
    pos = position_ids_from_mask(mask)
    ref = model(input_ids=probe, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()  # [1,k,V]
    hidden = _hidden_states(decoder, probe, mask, pos)[0]  # [k, H]
    w32 = fp32_head_weight(head)
    ours = _apply_head(head, post, hidden, torch.empty(hidden.shape[0], ref.shape[-1], device=ref.device), w32)[None]
    # the reference of a half-precision model is rounded to its dtype (bf16: 2^-8 relative)
    tol = 1e-3 if w32 is None else 2e-2
    if ref.shape != ours.shape or not torch.allclose(ref, ours, rtol=tol, atol=tol * (1 + ref.abs().max().item())):
        raise ReasonMaxxerError(
            f"score_sequences: {type(model).__name__} post-processes its logits in a way this scorer does not "
            "reproduce (only final_logit_softcapping, logit_scale and logits_scaling are supported); "
            "score it with token_entropy(model(...).logits) instead"
        )
    try:
        _CHECKED.add(model)
    except TypeError:
        pass


@torch.no_grad()
def score_sequences(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    chunk_tokens: int = 256,
    position_ids: Tensor | None = None,
) -> SequenceScores:
    """Teacher-forced (entropy, logprob) of every token of every row, under ``model``.

    input_ids, attention_mask: [B, T] (left or right padded; mask 1 = real token).
    position_ids: [B, T] or None (then derived from the mask, so a left-padded row scores
    exactly like the same row unpadded).
    Returns `SequenceScores` (entropy [B, T], logprob [B, T]), fp32, where column t is
    the distribution predicting token t (logits at t-1): entropy in nats over the full
    vocabulary, logprob = log p(input_ids[:, t]). Positions t with no real predecessor
    (t = 0, padding, a left-padded row's first real token) are 0.

    Memory: the decoder body runs once ([B, T, H] hidden states); the head is applied to
    ``chunk_tokens`` valid positions at a time, so the fp32 [B, T, V] logits never exist
    (peak extra ~ 2 * chunk_tokens * V * 4 bytes on top of the forward pass). A bf16/fp16
    model's head runs in fp32 (`fp32_head_weight`): scores come from fp32 logits.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            "input_ids and attention_mask must both be [B, T]; "
            f"got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    B, T = input_ids.shape
    mask = attention_mask.bool()  # [B, T]
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)  # [B, T]

    decoder, head = split_decoder_head(model)
    post = logit_postprocess(model)
    _check_head_matches(model, decoder, head, post, input_ids)

    hidden = _hidden_states(decoder, input_ids, attention_mask, position_ids)  # [B, T, H]
    entropy = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)  # [B, T]
    logprob = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)  # [B, T]
    if T < 2:
        return SequenceScores(entropy, logprob)

    valid = mask[:, 1:] & mask[:, :-1]  # [B, T-1]: column t+1 has a real predecessor at t
    b_idx, t_idx = valid.nonzero(as_tuple=True)  # [N] each; predecessor is (b, t), target (b, t+1)
    ent_flat = torch.empty(b_idx.numel(), dtype=torch.float32, device=input_ids.device)  # [N]
    lp_flat = torch.empty_like(ent_flat)  # [N]
    V = head.weight.shape[0] if hasattr(head, "weight") else None
    w32 = fp32_head_weight(head)  # [V, H] fp32 for a bf16/fp16 head, else None
    c_max = min(chunk_tokens, b_idx.numel())
    buf_logits = buf_work = None  # [c_max, V] fp32 each, reused by every chunk
    for s in range(0, b_idx.numel(), chunk_tokens):
        b, t = b_idx[s : s + chunk_tokens], t_idx[s : s + chunk_tokens]  # [c]
        c = b.numel()
        if buf_logits is None:
            V = V if V is not None else head(hidden[b[:1], t[:1]]).shape[-1]
            buf_logits = torch.empty(c_max, V, dtype=torch.float32, device=hidden.device)
            buf_work = torch.empty_like(buf_logits)
        block = _apply_head(head, post, hidden[b, t], buf_logits[:c], w32)  # [c, V] fp32
        ent_flat[s : s + c], lp_flat[s : s + c] = entropy_logprob_inplace(block, input_ids[b, t + 1], buf_work[:c])
    entropy[:, 1:][valid] = ent_flat
    logprob[:, 1:][valid] = lp_flat
    return SequenceScores(entropy, logprob)


def score_tokens(
    rows: Sequence[dict], model, tokenizer, *, batch_size: int = 4, on_batch=None
) -> list[tuple[list[float], list[float]]]:
    """Teacher-forced (entropies, logprobs) in nats of each row's completion tokens (`token_ids`
    after `prompt_ids`), `batch_size` rows a forward pass; `on_batch(k)` after each batch."""

    out = []
    pad = tokenizer.pad_token_id or 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        seqs = [list(r["prompt_ids"]) + list(r["token_ids"]) for r in chunk]
        ids, att = pad_right(seqs, pad)  # [b, T]
        dev = next(model.parameters()).device
        ent, lp = score_sequences(model, ids.to(dev), att.to(dev))
        for j, r in enumerate(chunk):
            p, c = len(r["prompt_ids"]), len(r["token_ids"])
            out.append((ent[j, p : p + c].tolist(), lp[j, p : p + c].tolist()))
        if on_batch:
            on_batch(len(chunk))
    return out


def score_rows(rows: list[dict], model, tokenizer, *, batch_size: int = 4, progress: bool = True) -> list[list[float]]:
    """Teacher-forced base entropies (nats) of each row's completion tokens.

    Under `accelerate launch` (N processes) each process scores every N-th batch of
    `batch_size` rows and all get every row's entropies (`distributed.sharded_map`: the
    single-process batches, so the same numbers); every process must call it (collective).
    """
    from tqdm.auto import tqdm

    def run(batch: list[dict]) -> list[list[float]]:
        return [e for e, _ in score_tokens(batch, model, tokenizer, batch_size=batch_size, on_batch=bar.update)]

    with tqdm(total=len(rows), desc="score", unit="row", disable=not progress, dynamic_ncols=True) as bar:
        return sharded_map(rows, batch_size, run)


def attach_scores(
    store: RolloutStore,
    rows: list[dict],
    out_path: Path,
    model_spec: str,
    model,
    tokenizer,
    *,
    rescore: bool = False,
    progress: bool = True,
    engine=None,
) -> tuple[list[dict], dict]:
    """Add `base_entropies` to rows (scored or reused, see module docstring); cache in out_path.
    `engine` (`engines.EngineConfig`) scores on Ray workers when it says so (same numbers).
    Under `accelerate launch` every process calls it: the scoring is split over them (`score_rows`)."""
    from ..models import model_fingerprint

    man = store.manifest()
    conf = man.get("config", {})
    same = (
        conf.get("model") == model_fingerprint(model_spec)
        and conf.get("backend", "hf") == "hf"
        and all(r.get("entropies") is not None for r in rows)
    )  # vLLM records no entropies
    info = {"rows": len(rows), "reused_sampler_entropies": bool(same and not rescore)}
    if same and not rescore:
        for r in rows:
            r["base_entropies"] = list(r["entropies"])
        return rows, info
    keys = [(r["problem_id"], r["sample_index"]) for r in rows]
    h = config_hash({"store": man.get("config_hash"), "model": model_fingerprint(model_spec), "keys": keys})
    if out_path.is_file():
        t = pq.read_table(out_path)
        if t.schema.metadata and t.schema.metadata.get(b"config_hash", b"").decode() == h:
            ents = t.column("base_entropies").to_pylist()
            for r, e in zip(rows, ents):
                r["base_entropies"] = e
            info["cached"] = True
            return rows, info
    t0 = time.time()
    if engine is None or engine.engine == "local":
        ents = score_rows(rows, model, tokenizer, progress=progress)
    else:
        ents = [r["entropies"] for r in score_rows_on(rows, model_spec, engine, progress=progress)]
    for r, e in zip(rows, ents):
        r["base_entropies"] = e
    table = pa.table(
        {"problem_id": [k[0] for k in keys], "sample_index": [k[1] for k in keys], "base_entropies": ents}
    ).replace_schema_metadata({"config_hash": h})
    if is_main_process():  # launched: every process has every row's scores; one writes the cache
        atomic_write_table(out_path, table)
    info["score_seconds"] = round(time.time() - t0, 2)
    return rows, info
