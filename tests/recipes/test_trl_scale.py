"""Running a TRL baseline at scale: the batch split, vLLM options, processes agreeing on counters
and on stopping, fp32 trainable weights (the end-to-end checks are in test_baselines.py)."""

import pytest
import torch

from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.recipes.trl_scale import fp32_trainable, per_device_batch, vllm_args, world_size


class _Cfg:
    prompts_per_step, num_generations, grad_accum = 4, 4, 2
    vllm, vllm_gpu_memory_utilization, vllm_server_url = "off", 0.3, None


def test_per_device_batch_splits_one_step_over_micro_batches_and_processes(monkeypatch):
    assert per_device_batch(_Cfg(), 1) == 8 and per_device_batch(_Cfg(), 2) == 4
    with pytest.raises(ReasonMaxxerError, match=r"grad_accum x processes \(2 x 3\)"):
        per_device_batch(_Cfg(), 3)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert world_size() == 8
    monkeypatch.delenv("WORLD_SIZE")
    assert world_size() == 1


def test_vllm_args_by_mode():
    c = _Cfg()
    assert vllm_args(c) == {}
    c.vllm = "server"
    assert vllm_args(c) == {"use_vllm": True, "vllm_mode": "server"}  # TRL's host/port defaults
    c.vllm_server_url = "http://h:1"
    assert vllm_args(c)["vllm_server_base_url"] == "http://h:1"
    c.vllm, c.vllm_gpu_memory_utilization = "colocate", 0.5
    assert vllm_args(c) == {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.5}


def test_fp32_trainable_casts_only_trainable_low_precision():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).to(torch.bfloat16)
    m[1].weight.requires_grad_(False)
    assert fp32_trainable(m) == 3
    assert m[0].weight.dtype == m[0].bias.dtype == m[1].bias.dtype == torch.float32
    assert m[1].weight.dtype == torch.bfloat16
    assert fp32_trainable(m) == 0


def _agree_worker(rank, path):
    import torch.distributed as dist

    from reasonmaxxer.recipes.trl_scale import agree_across_processes

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        # only rank 0's clock is past the cap; each process graded its own completions
        total, stop = agree_across_processes({"generated_tokens": 10 + rank, "correct": rank}, rank == 0)
        assert total == {"generated_tokens": 21, "correct": 1} and stop is True
        total, stop = agree_across_processes({"generated_tokens": 1, "correct": 0}, rank == 1)
        assert stop is False  # a non-main clock does not decide
    finally:
        dist.destroy_process_group()


def test_processes_sum_counters_and_follow_the_main_clock(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_agree_worker, args=(str(tmp_path / "pg"),), nprocs=2, join=True)
