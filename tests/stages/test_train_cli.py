"""`reasonmaxxer train` and `calibrate` on a synthetic rollout store made with a tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "reasonmaxxer.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_train_cli_scores_trains_and_exports(store_and_ckpt):
    d, ckpt = store_and_ckpt
    r = _run(
        "train",
        "--rollouts",
        str(d / "rollouts"),
        "--out",
        str(d / "run"),
        "--micro-batch",
        "4",
        "--grad-accum",
        "1",
        "--lora-rank",
        "4",
        "--tau",
        "1.0",
        "--order",
        "none",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((d / "run" / "result.json").read_text())
    assert Path(res["adapter"], "adapter_config.json").is_file() and Path(res["merged"], "config.json").is_file()
    # the store's model differs from nothing here (manifest has no fingerprint): entropies were scored
    assert (d / "run" / "scores.parquet").is_file()
    lines = (d / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == res["total_steps"] and "gated_fraction" in json.loads(lines[0])


def test_calibrate_cli_reports_gated_fraction_vs_accuracy(store_and_ckpt):
    d, ckpt = store_and_ckpt
    r = _run(
        "calibrate",
        "--rollouts",
        str(d / "rollouts"),
        "--out",
        str(d / "cal"),
        "--validation",
        "arith:validation:2",
        "--template",
        "raw",
        "--taus",
        "0.5",
        "3.6",
        "99",
        "--steps",
        "1",
        "--micro-batch",
        "4",
        "--grad-accum",
        "1",
        "--lora-rank",
        "4",
        "--max-new-tokens",
        "4",
        "--order",
        "none",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((d / "cal" / "calibrate.json").read_text())
    fr = {c["tau"]: c["gated_fraction"] for c in res["candidates"]}
    assert fr[0.5] == 1.0 and 0 < fr[3.6] < 1 and fr[99.0] == 0.0  # the tiny model: entropies 2.2-4.0 nats
    assert res["best_tau"] in (0.5, 3.6) and "| 99 | 0.00% | - |" in r.stdout
    assert res["n_validation"] == 2  # the count the validation's key records


def test_validation_size_reads_the_validation_key():
    """The sweep's problem count comes from the validation's own key; no key or none: refused."""
    from reasonmaxxer.errors import ReasonMaxxerError
    from reasonmaxxer.recipes.tau_sweep import require_validation, validation_size

    def validate(model):
        return 0.5

    assert validation_size(None) == 0 and validation_size(validate) == 0
    validate.key = {"n": 3}
    assert validation_size(validate) == 3
    require_validation(validate)
    for bad in (None, lambda m: 0.5):
        with pytest.raises(ReasonMaxxerError, match="none are given"):
            require_validation(bad)


def test_train_cli_track_and_push(store_and_ckpt, monkeypatch, capsys):
    """`train --report-to tensorboard --push-to-hub REPO` in-process: a fake SummaryWriter gets every
    step's metrics, a recording HfApi gets the exported adapter dir (with its model card)."""
    import types

    import huggingface_hub

    from reasonmaxxer.cli import main

    scalars, uploads = [], []

    class Writer:
        def __init__(self, log_dir=None, **kw):
            pass

        def add_scalar(self, tag, value, global_step=None, walltime=None):
            scalars.append((tag, global_step))

        def add_text(self, *a, **k):
            pass

        def flush(self):
            pass

        def close(self):
            pass

    class Api:
        def create_repo(self, repo_id, **kw):
            uploads.append(("create", repo_id, kw["exist_ok"]))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, *, repo_id, folder_path, repo_type=None, **kw):
            uploads.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    d, _ = store_and_ckpt
    out = d / "run-push"
    args = ["train", "--rollouts", str(d / "rollouts"), "--out", str(out), "--micro-batch", "4", "--grad-accum", "1"]
    args += ["--lora-rank", "4", "--tau", "1.0", "--order", "none", "--report-to", "tensorboard"]
    assert main([*args, "--push-to-hub", "me/tiny"]) == 0, capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted({s for tag, s in scalars if tag == "train/loss"}) == steps and len(steps) >= 1
    assert uploads[0] == ("create", "me/tiny", True)
    assert uploads[1][:2] == ("upload", "me/tiny") and {"adapter_config.json", "README.md"} <= set(uploads[1][2])
    assert "pushed" in capsys.readouterr().out
    # a missing tracker package: one line, before any model is loaded
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main([*args[:4], str(d / "run-x"), *args[5:]]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install tensorboard" in err and not (d / "run-x").exists()


def test_validation_flags_reach_the_validation_of_train_and_calibrate(monkeypatch):
    """--validation-temperature / --validation-top-p: the one validation that picks `train`'s
    checkpoint and scores `calibrate`'s taus; no --validation: none (calibrate then says so)."""
    from reasonmaxxer.cli.commands_train import validation_fn
    from reasonmaxxer.cli.parser import build_parser
    from reasonmaxxer.stages import evaluate

    seen = {}

    def fake(problems, template, tok, max_new_tokens, batch_size, **kw):
        seen.update(n=len(problems), template=template.name, max_new_tokens=max_new_tokens, **kw)
        return "validate"

    monkeypatch.setattr(evaluate, "validation_accuracy_fn", fake)
    for cmd in ("train", "calibrate"):
        a = build_parser().parse_args(
            [cmd, "--rollouts", "r", "--out", "o", "--validation", "arith:validation:3", "--template", "raw"]
            + ["--max-new-tokens", "7", "--validation-temperature", "0.6", "--validation-top-p", "0.95"]
        )
        assert validation_fn(a, {}, None) == "validate"
        assert seen == {"n": 3, "template": "raw", "max_new_tokens": 7, "temperature": 0.6, "top_p": 0.95}
        a = build_parser().parse_args([cmd, "--rollouts", "r", "--out", "o", "--validation", ""])
        assert validation_fn(a, {}, None) is None
        assert (
            not a.overwrite
            and build_parser().parse_args([cmd, "--rollouts", "r", "--out", "o", "--overwrite"]).overwrite
        )


def test_calibrate_without_validation_stops_before_scoring(store_and_ckpt):
    d, _ = store_and_ckpt
    r = _run("calibrate", "--rollouts", str(d / "rollouts"), "--out", str(d / "cal0"), "--validation", "")
    assert r.returncode != 0 and "tau is chosen on validation problems" in r.stderr
    assert not (d / "cal0" / "scores.parquet").exists()
