"""--report-to: TensorBoard and W&B trackers (fake packages that record calls), the missing-package line."""

import sys
import types

import pytest

from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.stages.tracking import check_tracker, make_tracker


class FakeWriter:
    made: list = []

    def __init__(self, log_dir=None, **kw):
        self.log_dir, self.scalars, self.texts, self.closed = log_dir, [], [], 0
        FakeWriter.made.append(self)

    def add_scalar(self, tag, scalar_value, global_step=None, walltime=None):
        self.scalars.append((tag, scalar_value, global_step))

    def add_text(self, tag, text_string, global_step=None, walltime=None):
        self.texts.append((tag, text_string))

    def flush(self):
        pass

    def close(self):
        self.closed += 1


@pytest.fixture
def fake_tensorboard(monkeypatch):
    mod = types.ModuleType("torch.utils.tensorboard")
    mod.SummaryWriter = FakeWriter
    FakeWriter.made = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", mod)
    return FakeWriter.made


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []

    class Run:
        def log(self, data, step=None):
            calls.append(("log", dict(data), step))

        def finish(self):
            calls.append(("finish",))

    mod = types.ModuleType("wandb")
    mod.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return calls


REC = {"step": 3, "loss": 0.5, "decision": 0.4, "anchor": 0.1, "gated_tokens": 7, "lr": 1e-4, "val_accuracy": 0.25}


def test_tensorboard_logs_every_numeric_metric_at_its_step(tmp_path, fake_tensorboard):
    t = make_tracker("tensorboard", tmp_path, {"lr": 1e-4, "tau": None}, "run1")
    t.log(REC, 3)
    t.close()
    t.close()  # idempotent
    (w,) = fake_tensorboard
    assert w.log_dir == str(tmp_path / "tb") and w.closed == 1
    assert sorted(w.scalars) == sorted((f"train/{k}", v, 3) for k, v in REC.items() if k != "step")


def test_wandb_init_log_finish(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    t = make_tracker("wandb", tmp_path / "run", {"train": {"target_modules": ("q_proj",)}}, "run1")
    t.log(REC, 3)
    t.close()
    t.close()
    init, log, finish = fake_wandb
    assert init == (
        "init",
        {"project": "reasonmaxxer", "name": "run1", "config": {"train": {"target_modules": ["q_proj"]}},
         "dir": str(tmp_path / "run")},
    )  # fmt: skip
    assert log == ("log", {k: v for k, v in REC.items() if k != "step"}, 3) and finish == ("finish",)


@pytest.mark.parametrize("kind, module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_missing_package_is_one_line_naming_the_pip_install(tmp_path, monkeypatch, kind, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    for call in (lambda: check_tracker(kind), lambda: make_tracker(kind, tmp_path, {}, "r")):
        with pytest.raises(ReasonMaxxerError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and f"pip install {kind}" in msg and f"--report-to {kind}" in msg
    assert not (tmp_path / "tb").exists()


def test_none_and_unknown(tmp_path):
    t = make_tracker("none", tmp_path, {}, "r")
    t.log(REC, 1)
    t.close()
    with pytest.raises(ReasonMaxxerError, match="unknown tracker 'mlflow'"):
        check_tracker("mlflow")
