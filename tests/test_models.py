"""models.cache_kwarg: the KV-cache keyword, through PEFT-style and DDP-style wrappers."""

import torch

from reasonmaxxer.models import cache_kwarg


class Old(torch.nn.Module):
    def forward(self, input_ids, past_key_values=None):
        return input_ids


class New(torch.nn.Module):
    def forward(self, input_ids, cache=None):
        return input_ids


class PeftLike(torch.nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base

    def get_base_model(self):
        return self.base

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)


def test_cache_kwarg():
    assert cache_kwarg(Old()) == "past_key_values"
    assert cache_kwarg(New()) == "cache"
    assert cache_kwarg(PeftLike(New())) == "cache"
    assert cache_kwarg(PeftLike(Old())) == "past_key_values"
