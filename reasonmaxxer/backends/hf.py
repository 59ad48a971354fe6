"""Batched sampling from Hugging Face causal LMs, recording what the method needs per token.

For every generated token the sampler records its id, its log-prob under the model's
UNTEMPERED distribution (nats; `logprob`), and the full-vocabulary entropy of that
untempered distribution (nats; `entropy`), both computed from the logits the decode step
already produced (no second pass).

Why not ``model.generate``: HF generate keeps stepping finished sequences until the longest
ends, re-encodes the same few-shot prefix for every prompt, and grows its KV cache by
``torch.cat`` (a full copy per step). This sampler instead

- encodes the longest token prefix shared by all prompts (the few-shot examples, the
  system prompt) ONCE and copies its KV cache into each new row;
- encodes the rest of a prompt once per admission however many of the admitted rows share it
  (the n samples of one problem), copying its KV cache to each of them (`share_prompts`);
- keeps a preallocated KV "slab" per layer that is written in place (`kv_slab`);
- drops finished rows and admits waiting requests into the freed slots (continuous
  batching): rows are compacted, right-aligned, whenever a quarter of the batch is done,
  so dead rows cost at most ~25% of a step and the copy is amortised.

Rows have different amounts of padding (left and between the shared prefix and each
prompt's own suffix); attention masks and explicit position ids make this exact.

Seeding. Each request draws its random numbers from its own generator seeded by
``request_seed(seed, problem_id, sample_index)``: one uniform number per generated token,
turned into a token by inverse-CDF sampling. So the random stream of a (seed, problem,
sample) never depends on which other requests share its batch. What is guaranteed:
re-running with the same requests, batch size and software gives identical completions;
across different batch compositions the random draws are identical, and completions are
identical unless float rounding in batched kernels (which differs with batch shape and
padding) flips the choice of a token, which is rare but possible (encoding a shared prompt
once is such a change: MKL's fp32 GEMM rounds a row differently with the row count, e.g. in
SmolLM2's down_proj; same tokens in the tests and a mini demo, log-probs/entropies within
~3e-5 nats of the unshared encoding). Greedy decoding
(temperature 0) matches HF ``generate`` token for token (tested).

Models with sliding-window attention layers are not supported by this backend (error).
The vLLM backend (`reasonmaxxer.backends.vllm`) implements the same `Sampler` interface for GPUs.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..core.entropy import entropy_and_logprob
from ..core.padding import pad_left
from ..errors import ReasonMaxxerError
from ..models import cache_kwarg, fp32_head_weight, logit_postprocess, split_decoder_head
from ..schema import check_fields
from .kv_slab import SlabCache, filled_kv, repack, seed_with_prefix


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are drawn. temperature 0 = greedy: top_p/top_k do not apply and are set to
    1.0/0, so every greedy config (and a greedy store's hash) is the same whatever they were."""

    n: int = field(default=4, metadata={"help": "samples per problem", "ge": 1})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (0 = greedy)", "ge": 0})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass", "gt": 0, "le": 1})
    top_k: int = field(default=0, metadata={"help": "top-k filter (0 = none)", "ge": 0})
    max_new_tokens: int = field(default=256, metadata={"help": "completion length cap, tokens", "ge": 1})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    batch_size: int = field(default=32, metadata={"help": "rows decoded together", "ge": 1})
    stop: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "stop strings, cut from the completion (EOS always stops; the stages default to the template's)"
        },
    )

    def __post_init__(self):
        check_fields(self, "sampling")
        if self.temperature == 0:
            object.__setattr__(self, "top_p", 1.0)
            object.__setattr__(self, "top_k", 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Request:
    """One completion to draw: `key` identifies it (problem_id, sample_index)."""

    key: tuple[str, int]
    prompt_ids: tuple[int, ...]


@dataclass
class Completion:
    key: tuple[str, int]
    token_ids: list[int]
    logprobs: list[float]  # log p(token) under the untempered model distribution, nats
    entropies: list[float] | None  # full-vocabulary entropy of that distribution, nats (None: the
    # backend cannot compute it, e.g. vLLM; the scoring stage does)
    finish_reason: str  # "eos" | "stop" | "length"
    text: str = ""

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class Sampler(Protocol):
    """A sampling backend: HF (CPU/GPU, this module) or vLLM (GPUs)."""

    def generate(
        self,
        requests: Sequence[Request],
        cfg: SamplingConfig,
        on_done: Callable[[Completion], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Completion]: ...


def request_seed(seed: int, problem_id: str, sample_index: int) -> int:
    """A 63-bit seed for one (seed, problem, sample), independent of everything else."""
    h = hashlib.sha256(f"{seed}\x00{problem_id}\x00{sample_index}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def eos_token_ids(*sources) -> set[int]:
    """The union of `eos_token_id` (an int or a list) over sources (generation configs, tokenizers)."""
    eos = set()
    for src in sources:
        e = getattr(src, "eos_token_id", None)
        if e is not None:
            eos.update(e if isinstance(e, (list, tuple)) else [e])
    return eos


def decode_completion(tokenizer, token_ids: Sequence[int], finish_reason: str, stop: Sequence[str] = ()) -> str:
    """The completion's text: special tokens skipped; cut before the first stop string if it stopped on one."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    if finish_reason == "stop":
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        text = text[:cut] if cut >= 0 else text
    return text


def cut_at_stop(tokenizer, c: Completion, stop: Sequence[str]) -> Completion:
    """`c` with its tokens (and their logprobs/entropies) cut before the stop string it ended on.

    The text is `decode_completion`'s (cut before the first stop string, as vLLM's
    ``include_stop_str_in_output=False`` cuts its text; vLLM keeps the token ids, this does
    not). Tokens kept: the longest prefix whose decoded text is no longer than the cut text,
    so a token that straddles the stop string is dropped (its text part before the stop
    string stays in `text`). Idempotent; a completion that did not end on a stop string
    (finish_reason "eos"/"length") is returned unchanged.
    """
    if c.finish_reason != "stop":
        return c
    text = decode_completion(tokenizer, c.token_ids, "stop", stop)
    if len(text) == len(tokenizer.decode(c.token_ids, skip_special_tokens=True)):
        return c  # no stop string in the tokens: already cut
    k = len(c.token_ids)
    while k > 0 and len(tokenizer.decode(c.token_ids[:k], skip_special_tokens=True)) > len(text):
        k -= 1
    ents = c.entropies[:k] if c.entropies is not None else None
    return Completion(c.key, c.token_ids[:k], c.logprobs[:k], ents, "stop", text)


def sample_from_logits(
    logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0
) -> torch.Tensor:
    """Inverse-CDF sampling. logits [B, V] fp32, u [B] uniform in [0, 1) -> token ids [B].

    temperature 0 -> argmax. top_k keeps the k largest logits, top_p the smallest set of
    tokens (in descending probability) whose tempered probability reaches top_p.
    """
    if temperature == 0:
        return logits.argmax(-1)
    z = logits / temperature  # [B, V]
    if top_k and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        zs, idx = z.sort(dim=-1, descending=True)  # [B, V]
        ps = torch.softmax(zs, -1)
        before = ps.cumsum(-1) - ps  # mass strictly before each token
        zs = zs.masked_fill(before >= top_p, float("-inf"))
        cdf = torch.softmax(zs, -1).cumsum(-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1).contiguous(), right=True).clamp_max(
            z.shape[-1] - 1
        )
        return idx.gather(-1, pick).squeeze(-1)
    cdf = torch.softmax(z, -1).cumsum(-1)  # [B, V]
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1).contiguous(), right=True)
    return pick.clamp_max(z.shape[-1] - 1).squeeze(-1)


@dataclass
class _Row:
    """One request being decoded: its own generator, what it has drawn so far, why it ended."""

    req: Request
    gen: torch.Generator
    tokens: list
    logprobs: list
    entropies: list
    done: str | None = None


def fp32_head(model):
    """(decoder body, fp32 head weight [V, H]) of a bf16/fp16 model whose head is a plain linear
    map with no logit post-processing, so sampling and the recorded entropies/log-probs use
    fp32 logits (as scoring does); (None, None) otherwise (fp32 models: unchanged path)."""
    if logit_postprocess(model) is not None:
        return None, None
    try:
        decoder, head = split_decoder_head(model)
    except ReasonMaxxerError:
        return None, None
    w32 = fp32_head_weight(head)
    if w32 is None or cache_kwarg(decoder) != cache_kwarg(model):
        return None, None
    return decoder, w32


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


class HFSampler:
    """The Hugging Face backend of `Sampler` (see the module docstring).

    `min_shared_prefix`: the shortest prefix common to ALL prompts worth encoding once (tokens).
    `share_prompts`: rows admitted together with identical prompts are encoded once (False: every
    row is encoded; the same tokens, log-probs/entropies within ~3e-5 nats on SmolLM2)."""

    def __init__(self, model, tokenizer, min_shared_prefix: int = 8, share_prompts: bool = True):
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if any(t == "sliding_attention" for t in (getattr(cfg, "layer_types", None) or [])) or getattr(
            cfg, "use_sliding_window", False
        ):
            raise ReasonMaxxerError(
                "HF sampler: models with sliding-window attention are not supported; use the vLLM backend"
            )
        self.model = model
        self.tok = tokenizer
        self.num_layers = cfg.num_hidden_layers
        self.min_shared_prefix = min_shared_prefix
        self.share_prompts = share_prompts
        self.device = next(model.parameters()).device
        self.eos = eos_token_ids(getattr(model, "generation_config", None), tokenizer)
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self._cache_kw = cache_kwarg(model)
        self._decoder, self._w32 = fp32_head(model)

    # -- building blocks -------------------------------------------------------------
    def _forward(self, ids, mask, pos, cache):
        """fp32 logits [B, V] of the last position of each row."""
        kw = {self._cache_kw: cache}
        if self._w32 is not None:  # a bf16/fp16 model: the decoder body, then the head in fp32
            out = self._decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
            return out.last_hidden_state[:, -1, :].float() @ self._w32.t()  # [B, V]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **kw)
        return out.logits[:, -1, :].float()  # [B, V]

    def _shared_prefix(self, prompts: Sequence[Sequence[int]]):
        """(length, per-layer KV) of the token prefix common to all `prompts`, encoded once; (0, None)
        when it is shorter than `min_shared_prefix`. At least one token of every prompt is left out."""
        plen = _common_prefix(prompts)
        plen = min(plen, min(len(p) for p in prompts) - 1)
        if plen < self.min_shared_prefix:
            plen = 0
        return plen, (self._prefix_kv(tuple(prompts[0][:plen])) if plen else None)

    def _prefix_kv(self, prefix: tuple[int, ...]):
        cache = SlabCache(self.num_layers)
        if prefix:
            ids = torch.tensor([prefix], device=self.device)
            self._forward(ids, torch.ones_like(ids), torch.arange(len(prefix), device=self.device)[None], cache)
        return filled_kv(cache) if prefix else None

    def _prefill(self, reqs: list[Request], prefix_len: int, prefix_kv):
        """Encode new rows: [prefix][pad][suffix]. Returns (per-layer (k, v), mask [b, m], next_pos [b], logits [b, V]).

        `share_prompts`: each distinct prompt is encoded once (padded to the same width as all
        rows: only the batch's row count differs) and its outputs copied to the rows that share it."""
        if self.share_prompts:
            first: dict[tuple[int, ...], int] = {}
            inv = [first.setdefault(r.prompt_ids, len(first)) for r in reqs]  # row -> distinct prompt
            if len(first) < len(reqs):
                uniq = [reqs[inv.index(j)] for j in range(len(first))]
                kv, mask, next_pos, logits = self._encode(uniq, prefix_len, prefix_kv)
                idx = torch.tensor(inv, dtype=torch.long)
                di = idx.to(self.device)
                kv = [(k.index_select(0, di), v.index_select(0, di)) for k, v in kv]
                return kv, mask[idx], next_pos[idx], logits.index_select(0, di)
        return self._encode(reqs, prefix_len, prefix_kv)

    def _encode(self, reqs: list[Request], prefix_len: int, prefix_kv):
        """`_prefill` for every row of `reqs`, each encoded in one batched forward."""
        b = len(reqs)
        sufs = [r.prompt_ids[prefix_len:] for r in reqs]
        ids, smask = pad_left(sufs, self.tok.pad_token_id or 0)  # [b, s_max]
        s_max = ids.shape[1]
        pos = (prefix_len + smask.cumsum(-1) - 1).clamp_min(0)
        mask = torch.cat([torch.ones((b, prefix_len), dtype=torch.long), smask], 1)
        cache = SlabCache(self.num_layers)
        if prefix_kv is not None:
            seed_with_prefix(cache, prefix_kv, b, prefix_len, s_max)
        dev = self.device
        logits = self._forward(ids.to(dev), mask.to(dev), pos.to(dev), cache)
        return filled_kv(cache), mask, (pos[:, -1] + 1), logits

    # -- the loop --------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        requests: Sequence[Request],
        cfg: SamplingConfig,
        on_done: Callable[[Completion], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Draw one completion per request; returns them in request order.

        `on_done(completion)` is called as each finishes; `progress(n_new_tokens)` after each step.
        The batch is rebuilt (finished rows dropped, waiting requests admitted) when
        `_Decoding.wants_refill` says so; otherwise every row decodes one token.
        """
        if not requests:
            return []
        for r in requests:
            if not r.prompt_ids:
                raise ReasonMaxxerError(f"sampling: request {r.key} has an empty prompt")
        plen, prefix_kv = self._shared_prefix([r.prompt_ids for r in requests])
        run = _Decoding(self, cfg, plen, prefix_kv, on_done, progress)
        pending = deque(requests)
        while pending or run.rows:
            if run.wants_refill(pending):
                run.refill(pending)
            else:
                run.step()
        return [run.results[r.key] for r in requests]


class _Decoding:
    """The state of one `HFSampler.generate` call: the rows in the batch, their KV slab, attention
    mask [B, n] over cache columns, next positions [B] and last tokens [B] (the one to feed
    next), and the finished completions by key (`results`)."""

    def __init__(self, sampler: HFSampler, cfg: SamplingConfig, plen: int, prefix_kv, on_done, progress):
        self.s, self.cfg = sampler, cfg
        self.plen, self.prefix_kv = plen, prefix_kv
        self.on_done, self.progress = on_done, progress
        self.stop = tuple(s for s in cfg.stop if s)
        self.results: dict[tuple, Completion] = {}
        self.rows: list[_Row] = []
        self.cache = SlabCache(sampler.num_layers)
        self.mask = torch.zeros((0, 0), dtype=torch.long)  # [B, n] over cache columns
        self.next_pos = torch.zeros((0,), dtype=torch.long)  # [B]
        self.last = torch.zeros((0,), dtype=torch.long)  # [B] token to feed next

    # -- per token ---------------------------------------------------------------------
    def _choose(self, logits, active: list[_Row]):
        """The next token of each row of `active` (one uniform draw from each row's generator, in
        row order; none when greedy) and its untempered entropy and log-prob, on the CPU."""
        cfg = self.cfg
        u = (
            torch.stack([torch.rand((), generator=r.gen) for r in active])
            if not cfg.greedy
            else torch.zeros(len(active))
        )
        tok = sample_from_logits(logits, u.to(logits.device), cfg.temperature, cfg.top_p, cfg.top_k)
        ent, lp = entropy_and_logprob(logits, tok)
        return tok.cpu(), ent.cpu(), lp.cpu()

    def _hit_stop(self, row: _Row) -> bool:
        """Whether the text of the row's last 12 tokens contains a stop string."""
        text = self.s.tok.decode(row.tokens[-12:], skip_special_tokens=True)
        return any(s in text for s in self.stop)

    def _record(self, row: _Row, t: int, e: float, lp: float) -> None:
        """Append a drawn token to `row`; end the row on EOS, a stop string or the length cap."""
        row.tokens.append(t)
        row.entropies.append(e)
        row.logprobs.append(lp)
        if t in self.s.eos:
            row.done = "eos"
        elif self.stop and self._hit_stop(row):
            row.done = "stop"
        elif len(row.tokens) >= self.cfg.max_new_tokens:
            row.done = "length"
        if row.done:
            self._finish(row)

    def _finish(self, row: _Row) -> None:
        """The row's `Completion` (text decoded, cut before a stop string) into `results`, and `on_done`."""
        tok, stop = self.s.tok, self.stop
        text = decode_completion(tok, row.tokens, row.done, stop)
        c = cut_at_stop(tok, Completion(row.req.key, row.tokens, row.logprobs, row.entropies, row.done, text), stop)
        self.results[row.req.key] = c
        if self.on_done:
            self.on_done(c)

    # -- the batch ---------------------------------------------------------------------
    def wants_refill(self, pending: deque) -> bool:
        """Rebuild the batch now: at the start, once a quarter of the rows are done, or when
        requests wait and fewer than half the slots hold live rows."""
        rows, B = self.rows, self.cfg.batch_size
        dead = [i for i, r in enumerate(rows) if r.done]
        return bool(
            not rows or (dead and len(dead) >= max(1, len(rows) // 4)) or (pending and len(rows) - len(dead) < B // 2)
        )

    def refill(self, pending: deque) -> None:
        """Drop the finished rows and admit waiting requests into the free slots: prefill them,
        draw their first tokens, and repack the live rows and the new ones, right-aligned, into
        a new KV slab (`kv_slab.repack`)."""
        cfg, rows = self.cfg, self.rows
        keep = [i for i, r in enumerate(rows) if not r.done]
        admit = [pending.popleft() for _ in range(min(len(pending), cfg.batch_size - len(keep)))]
        new_rows = [
            _Row(r, torch.Generator().manual_seed(request_seed(cfg.seed, r.key[0], r.key[1])), [], [], [])
            for r in admit
        ]
        new_kv = new_mask = None
        if admit:
            new_kv, new_mask, new_pos, logits = self.s._prefill(admit, self.plen, self.prefix_kv)
            tok, ent, lp = self._choose(logits, new_rows)
        if not keep and not admit:
            self.rows = []
            return
        self.mask = repack(self.cache, self.mask, keep, new_kv, new_mask, cfg.max_new_tokens // 2)
        keep_t = torch.tensor(keep, dtype=torch.long)
        self.next_pos = torch.cat(
            [self.next_pos[keep_t] if keep else self.next_pos[:0], new_pos if admit else self.next_pos[:0]]
        )
        self.last = torch.cat([self.last[keep_t] if keep else self.last[:0], tok if admit else self.last[:0]])
        self.rows = [rows[i] for i in keep] + new_rows
        if admit:
            for j, r in enumerate(new_rows):
                self._record(r, int(tok[j]), float(ent[j]), float(lp[j]))
            if self.progress:
                self.progress(len(new_rows))

    def _end_full_rows(self) -> None:
        """End, truncated ("length"), each live row whose prompt + completion fill the context
        (next_pos + 1 tokens, the last not yet fed); the others go on. As vLLM's check_stop
        (vllm/v1/core/sched/utils.py: num_tokens >= max_model_len -> length-capped)."""
        full = [r for r, p in zip(self.rows, self.next_pos.tolist()) if not r.done and p + 1 >= self.s.max_positions]
        for r in full:
            r.done = "length"
            self._finish(r)

    def step(self) -> None:
        """One decode step for every row in the batch (dead rows ride along until the next refill)."""
        s, rows = self.s, self.rows
        if s.max_positions:
            self._end_full_rows()
            if all(r.done for r in rows):
                return
        self.mask = torch.cat([self.mask, torch.ones((len(rows), 1), dtype=torch.long)], 1)
        dev = s.device
        # dead rows' positions are clamped so they stay valid (their outputs are ignored)
        pos = self.next_pos.clamp_max(s.max_positions - 1) if s.max_positions else self.next_pos
        logits = s._forward(self.last[:, None].to(dev), self.mask.to(dev), pos[:, None].to(dev), self.cache)
        active = [i for i, r in enumerate(rows) if not r.done]
        tok, ent, lp = self._choose(logits[active], [rows[i] for i in active])
        new_last = self.last.clone()
        new_last[active] = tok
        self.last = new_last
        self.next_pos = self.next_pos + 1
        for j, i in enumerate(active):
            self._record(rows[i], int(tok[j]), float(ent[j]), float(lp[j]))
        if self.progress:
            self.progress(len(active))
