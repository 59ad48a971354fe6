"""models.cache_kwarg: the KV-cache keyword, through PEFT-style and DDP-style wrappers;
models.set_torch_threads: the busy-CPU warning."""

import re

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


def test_set_torch_threads_warns_only_on_a_cpu_other_jobs_keep_busy(monkeypatch, caplog):
    """2 threads on 2 cores beside another job that keeps 2 cores busy: one warning line naming
    --threads; on an idle CPU, or with 1 thread, none. busy_cores measures 0..usable cores."""
    from reasonmaxxer.models import busy_cores, set_torch_threads, usable_cores

    monkeypatch.setenv("REASONMAXXER_DEVICE", "cpu")
    before = torch.get_num_threads()
    try:
        with caplog.at_level("WARNING", logger="reasonmaxxer"):
            assert set_torch_threads(2, busy=2.0, cores=2) == 2
            assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()
            assert re.search(r"2\.0 of 2 cores in use.*torch uses 2 threads.*--threads", caplog.text)
            caplog.clear()
            assert set_torch_threads(2, busy=0.3, cores=2) == 2  # idle
            assert set_torch_threads(1, busy=2.0, cores=2) == 1  # one thread: nothing to split
            assert set_torch_threads(16, busy=7.0, cores=16) == 16  # 23 < 1.5 x 16
            assert not caplog.records
    finally:
        torch.set_num_threads(before)
    b = busy_cores(0.05)
    assert b is None or 0.0 <= b <= usable_cores() + 1e-9
