"""The workload of `benchmarks/gpu_check.py`: the model shapes (Qwen2-0.5B's, a small and a
tiny one), built from a config with random weights; a word-level tokenizer whose vocabulary
covers every model id; the sampling requests (a shared prefix + each problem's own tokens), the
training sequences, and a coin in place of grading. No Hub access is needed."""

from __future__ import annotations

import random

import torch

from reasonmaxxer.backends.hf import Request

QWEN2_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=512,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


SMALL = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=512,
    vocab_size=4096,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over "<pad> <s> </s> <unk> w4 ... w{V-1}": every model id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.padding_side = "left"
    return fast


def build_model(dims: dict, device: str, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**dims, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    return model.eval()


def make_requests(a, vocab: int) -> list[Request]:
    rng = random.Random(0)
    prefix = [rng.randrange(4, vocab) for _ in range(a.shared_prefix)]
    reqs = []
    for i in range(a.problems):
        own = tuple(prefix + [rng.randrange(4, vocab) for _ in range(a.unique)])
        reqs += [Request((f"p{i}", s), own) for s in range(a.samples)]
    return reqs


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_examples(ctx, a) -> list:
    """`--train-len`-token sequences (a shared 64-token prompt + own tokens), random entropies, +-1 advantages."""
    from reasonmaxxer.stages.train import TrainExample

    rng = random.Random(1)
    V = ctx["vocab"]
    P = min(64, a.train_len // 4)
    prompt = tuple(rng.randrange(4, V) for _ in range(P))
    n = a.micro_batch * a.train_steps
    return [
        TrainExample(
            prompt_ids=prompt,
            completion_ids=tuple(rng.randrange(4, V) for _ in range(a.train_len - P)),
            entropies=tuple(rng.random() * 3 for _ in range(a.train_len - P)),
            advantage=rng.choice([-1.0, 1.0]),
            correct=False,
            key=(f"p{i // 2}", i % 2),
        )
        for i in range(n)
    ]


def fake_grade_many(golds, texts, workers=None):
    """A deterministic coin (crc32 of the completion) instead of grading: a random model never
    answers right, and the pipeline needs mixed-success problems to select."""
    import zlib

    from reasonmaxxer.verify import Grade, Verdict

    out = []
    for t in texts:
        ok = zlib.crc32(t.encode()) % 3 == 0
        v = Verdict(ok, "1" if ok else "0", "boxed", "match" if ok else "mismatch")
        out.append(Grade(v, v))
    return out
