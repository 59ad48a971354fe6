"""analysis.delta: effective rank, LoRA/full delta spectra, gain recovered."""

import copy
import json

import pytest
import torch
from conftest import make_tiny_model

from reasonmaxxer.analysis.delta import (
    effective_rank,
    full_spectra,
    lora_singular_values,
    recovery_bootstrap,
    run_delta,
)
from reasonmaxxer.errors import ReasonMaxxerError


def test_effective_rank_hand_values():
    s = [1.0, 3.0, 2.0]  # energies 9, 4, 1 of 14: cumulative 9/14 = .643, 13/14 = .929, 1
    assert effective_rank(s, 0.5) == 1
    assert effective_rank(s, 0.9) == 2
    assert effective_rank(s, 0.99) == 3
    assert effective_rank([3.0, 1.0], 0.9) == 1  # 9/10 reached exactly
    assert effective_rank([0.0, 0.0], 0.9) == 0
    assert effective_rank([1.0] * 10, 0.9) == 9
    with pytest.raises(ValueError):
        effective_rank(s, 0.0)


def test_lora_singular_values_equal_those_of_the_product():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 30, generator=g), torch.randn(20, 4, generator=g)
    ref = torch.linalg.svdvals(b.double() @ a.double()) * 0.5
    got = lora_singular_values(a, b, 0.5)
    assert torch.allclose(got, ref[:4], rtol=1e-9)
    assert float(ref[4:].abs().max()) < 1e-9


def test_lora_adapter_and_full_delta_spectra(tmp_path, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = make_tiny_model(len(tiny_tokenizer), init_std=0.2)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    for name, p in pm.named_parameters():
        if "lora_B" in name or "lora_A" in name:
            p.data = torch.randn(p.shape, generator=g)
    pm.save_pretrained(tmp_path / "adapter")
    res = run_delta(str(tmp_path / "adapter"), tmp_path / "out")
    assert res["kind"] == "lora" and len(res["modules"]) == 4  # 2 layers x (q, v)
    assert json.loads((tmp_path / "out" / "delta.json").read_text())["summary"]["q_proj"]["n"] == 2
    assert (tmp_path / "out" / "delta.png").stat().st_size > 0
    merged = pm.merge_and_unload()
    full = {r["name"]: r for r in full_spectra(merged.state_dict(), base.state_dict())}
    for r in res["modules"]:  # the adapter's spectrum is the merged weights' change
        f = full[r["name"]]
        assert r["rank_99"] == f["rank_99"] <= 4
        assert r["singular_values"][:4] == pytest.approx(f["singular_values"][:4], rel=1e-4)
    assert all(f["fro_norm"] == 0 for n, f in full.items() if "k_proj" in n)
    with pytest.raises(ReasonMaxxerError, match="pass --base"):
        run_delta(str(tmp_path), tmp_path / "out2")


def test_recovery_bootstrap_hand_value_and_interval():
    base = {"a": 0.0, "b": 0.0, "c": 0.5, "d": 0.5}
    teacher = {"a": 1.0, "b": 1.0, "c": 0.5, "d": 0.5}  # gains 1, 1, 0, 0: mean 0.5
    student = {"a": 1.0, "b": 0.0, "c": 0.5, "d": 0.5}  # gains 1, 0, 0, 0: mean 0.25
    r = recovery_bootstrap(student, base, teacher, n_boot=2000)
    assert r["value"] == pytest.approx(0.5) and r["teacher_gain"] == pytest.approx(0.5) and r["n"] == 4
    assert r["low"] <= 0.5 <= r["high"]
    assert recovery_bootstrap(teacher, base, teacher)["low"] == pytest.approx(1.0)
    assert recovery_bootstrap(base, base, base)["value"] is None
    with pytest.raises(ReasonMaxxerError):
        recovery_bootstrap({"x": 1}, base, teacher)
