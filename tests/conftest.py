"""Shared fixtures: a tiny randomly initialised Llama model and a small real tokenizer.

The tokenizer is a word-level tokenizer built in memory with `tokenizers` (no downloads),
so tests are fast and offline. Real-model tests are marked ``slow``.
"""
import os

import pytest
import torch

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
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=init_std == 0.02,
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
