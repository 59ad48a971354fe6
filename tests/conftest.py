"""Shared fixtures: a tiny randomly initialised Llama model and a small real tokenizer.

The tokenizer is a word-level tokenizer built in memory with `tokenizers` (no downloads),
so tests are fast and offline. Real-model tests are marked ``slow``.
"""

import copy
import os

import pytest
import torch
from torch import nn

from reasonmaxxer.store import RolloutStore

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads and lose a lot to OpenMP synchronisation on a busy
# 2-core machine; the real-model tests raise this again for themselves.
torch.set_num_threads(1)


def _tiny_tokenizer():
    """Character-level tokenizer over printable ASCII (+ newline), with <pad>/<s>/</s>/<unk>."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + list(dict.fromkeys(string.printable))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.padding_side = "left"
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tiny_tokenizer()


def make_tiny_model(vocab_size: int, seed: int = 0, arch: str = "llama", init_std: float = 0.02):
    """A 2-layer randomly initialised causal LM (Llama or Qwen2 config), fp32, eval mode.

    init_std=0.2 gives outputs that vary from token to token (greedy does not loop at once).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=init_std == 0.02,
        initializer_range=init_std,
    )
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw))
    return model.eval()


def save_tiny_checkpoint(d, tokenizer, seed: int = 3, init_std: float = 0.2) -> str:
    """A tiny model + tokenizer saved as an HF checkpoint dir `d` (loadable by path, e.g. by a
    subprocess or a Ray worker); returns str(d)."""
    make_tiny_model(len(tokenizer), seed=seed, init_std=init_std).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return make_tiny_model(len(tiny_tokenizer))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_tokenizer):
    """A tiny peaky model saved as a HF checkpoint dir (model + tokenizer): a model spec."""
    d = tmp_path_factory.mktemp("tiny-ckpt")
    save_tiny_checkpoint(d, tiny_tokenizer)
    return d


# -- shared by several test modules ---------------------------------------------------------
class _Signature:
    """A model's forward (its signature) and nothing else."""

    def __init__(self, model):
        self.forward = model.forward


class EditedLogits(nn.Module):
    """base model, except at absolute positions `edits` {pos: r}: swap argmax with base rank r.

    Works with `split_prefix_logits` for any prefix length: the absolute position of each logits
    row is taken from `position_ids` when given (the remainder call), else 0..T-1 (the prefix
    call, or a plain full forward with right padding). `get_base_model` lets the cache-kwarg
    probe inspect the real forward signature; all kwargs pass through unchanged.
    """

    def __init__(self, base, edits: dict[int, int]):
        super().__init__()
        self.base = base
        self.edits = edits
        self.config = base.config

    def get_base_model(self):
        # only the forward signature (for the cache-kwarg probe): no decoder or head to split off,
        # so the hidden-state paths (`chunked_head` is None) take these edited logits
        return _Signature(self.base)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
        logits = out.logits.clone()  # [B, T', V]
        B, T = logits.shape[:2]
        pos = position_ids if position_ids is not None else torch.arange(input_ids.shape[1]).expand(B, -1)
        pos = pos[:, -T:]  # the returned rows (all, or the last `logits_to_keep` in a cached decode)
        for b in range(B):
            for t in range(T):
                r = self.edits.get(int(pos[b, t]))
                if r is None:
                    continue
                order = torch.argsort(logits[b, t], descending=True, stable=True)
                a, o = order[0].item(), order[r - 1].item()
                la, lo = logits[b, t, a].clone(), logits[b, t, o].clone()
                logits[b, t, a], logits[b, t, o] = lo, la
        out.logits = logits
        return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, base_model, tiny_tokenizer):
    """good: the tiny pair; bigtok: a tokenizer with one more token (and a model to match);
    wide: the same tokenizer, 8 more logits; corrupt: truncated weights."""
    root = tmp_path_factory.mktemp("models")
    good = root / "good"
    base_model.save_pretrained(good)
    tiny_tokenizer.save_pretrained(good)
    bigtok = copy.deepcopy(tiny_tokenizer)
    bigtok.add_tokens(["<extra>"])
    for name, tok, extra in (("bigtok", bigtok, 1), ("wide", tiny_tokenizer, 8)):
        m = make_tiny_model(len(tiny_tokenizer) + extra, seed=1)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    corrupt = root / "corrupt"
    base_model.save_pretrained(corrupt)
    tiny_tokenizer.save_pretrained(corrupt)
    weights = list(corrupt.glob("*.safetensors"))
    assert weights
    for f in weights:
        f.write_bytes(b"not a safetensors file")
    return {k: str(root / k) for k in ("good", "bigtok", "wide", "corrupt")}


@pytest.fixture(scope="module")
def store_and_ckpt(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("tc")
    ckpt = d / "tiny"
    save_tiny_checkpoint(ckpt, tiny_tokenizer)
    st = RolloutStore(d / "rollouts")
    st.open({"synthetic": 1}, {"model_spec": str(ckpt)})
    g = torch.Generator().manual_seed(0)
    rows = []
    prefix = tiny_tokenizer("Solve: ")["input_ids"]
    for p in range(4):
        q = prefix + tiny_tokenizer(f"{p} + {p}?")["input_ids"]
        for s in range(4):
            toks = torch.randint(4, 100, (6 + s,), generator=g).tolist()
            ok = (p + s) % 2 == 0
            rows.append(
                {
                    "problem_id": f"q{p}",
                    "sample_index": s,
                    "prompt": "x",
                    "prompt_ids": q,
                    "completion": "y",
                    "token_ids": toks,
                    "logprobs": [-1.0] * len(toks),
                    "entropies": (torch.rand(len(toks), generator=g) * 3).tolist(),
                    "finish_reason": "eos",
                    "truncated": False,
                    "gold": str(2 * p),
                    "reward": float(ok),
                    "strict_correct": ok,
                    "strict_extracted": "1",
                    "lenient_correct": ok,
                    "lenient_extracted": "1",
                    "grade_reason": "x",
                }
            )
    st.write_shard(0, rows)
    return d, ckpt


def random_train_examples(n=8, seed=0, vocab=100):
    """n random TrainExamples (prompts, completions, entropies in [0, 3) nats), alternating correct/incorrect."""
    from reasonmaxxer.stages.train import TrainExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(4, vocab, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(4, vocab, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g).tolist()
        ent = (torch.rand(len(c), generator=g) * 3).tolist()
        out.append(
            TrainExample(
                tuple(p),
                tuple(c),
                tuple(ent),
                advantage=1.0 if i % 2 == 0 else -1.0,
                correct=i % 2 == 0,
                key=(f"p{i // 2}", i % 2),
            )
        )
    return out
