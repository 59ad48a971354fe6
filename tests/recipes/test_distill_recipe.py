"""recipes.distill: the rank sweep end to end (tiny models), the vocabulary check, the CLI."""

import copy
import json

import pytest
import torch
from conftest import make_tiny_model, save_tiny_checkpoint

from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.recipes.distill import check_same_vocab


def _teacher_adapter(base_dir, d, seed=1):
    """A rank-2 LoRA of the checkpoint in base_dir, saved as a PEFT adapter dir d."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj"])
    )
    g = torch.Generator().manual_seed(seed)
    for name, p in pm.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g)
    pm.save_pretrained(d)
    cfgp = d / "adapter_config.json"
    cfgp.write_text(json.dumps({**json.loads(cfgp.read_text()), "base_model_name_or_path": str(base_dir)}))
    return str(d)


def test_teacher_with_another_vocabulary_is_one_line_naming_both(tiny_tokenizer):
    base = make_tiny_model(len(tiny_tokenizer))
    other_tok = copy.deepcopy(tiny_tokenizer)
    other_tok.add_tokens(["<extra>"])
    other = make_tiny_model(len(other_tok))
    with pytest.raises(ReasonMaxxerError) as e:
        check_same_vocab("teacher-x", other, other_tok, "base-y", base, tiny_tokenizer)
    msg = str(e.value)
    assert "\n" not in msg and "'teacher-x'" in msg and "'base-y'" in msg and "105 logits" in msg
    same_size = copy.deepcopy(tiny_tokenizer)  # same size, one token renamed: the vocab digests differ
    vocab = same_size.get_vocab()
    assert "~" in vocab
    from tokenizers import models

    backend = same_size.backend_tokenizer
    backend.model = models.WordLevel({("@@" if t == "~" else t): i for t, i in vocab.items()}, unk_token="<unk>")
    with pytest.raises(ReasonMaxxerError, match="different vocabularies"):
        check_same_vocab("t", base, same_size, "b", base, tiny_tokenizer)
    check_same_vocab("t", base, tiny_tokenizer, "b", base, tiny_tokenizer)  # no error


def test_distill_cli_end_to_end_and_resume(tmp_path, tiny_tokenizer, monkeypatch):
    from reasonmaxxer.cli import main

    base_dir = save_tiny_checkpoint(tmp_path / "base", tiny_tokenizer)
    teacher = _teacher_adapter(base_dir, tmp_path / "teacher")
    out = tmp_path / "distill"
    argv = [
        "distill", "--teacher", teacher, "--base", base_dir, "--ranks", "1", "2", "--problems", "arith:train:2",
        "--test-problems", "arith:test:2", "--template", "raw", "--n", "2", "--eval-n", "2", "--max-new-tokens", "6",
        "--max-steps", "2", "--micro-batch", "2", "--grad-accum", "1", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "distill.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert names == ["teacher", "base", "rank-1", "rank-2"]
    r1, r2 = res["rows"][2], res["rows"][3]
    assert 0 < r1["trainable_pct"] < r2["trainable_pct"] < 100
    assert r2["trainable_params"] == 2 * r1["trainable_params"]
    assert res["rows"][1]["kl"] > 0 and r1["kl"] >= 0 and "recovery" in r1
    assert (out / "recovery_vs_rank.png").stat().st_size > 0 and "| rank-2 | 2 |" in (out / "distill.md").read_text()
    for r in (1, 2):
        assert (out / f"rank-{r}" / "adapter" / "adapter_config.json").is_file()

    import reasonmaxxer.stages.distill as dm

    monkeypatch.setattr(dm, "attach_adapter", lambda *a: pytest.fail("a finished rank was trained again"))
    assert main(argv) == 0  # resumed: everything on disk is reused

    spec = main(["analyze", "--delta", teacher, "--out", str(tmp_path / "delta")])
    assert spec == 0
    d = json.loads((tmp_path / "delta" / "delta.json").read_text())
    assert d["kind"] == "lora" and all(m["rank_99"] <= 2 for m in d["modules"])


def test_analyze_needs_tuned_or_delta(tmp_path, capsys):
    from reasonmaxxer.cli import main

    assert main(["analyze", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--tuned" in err and "--delta" in err
