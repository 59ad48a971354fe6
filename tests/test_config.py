"""The typed config loader: types, ranges and choices checked at load, flags generated from the
dataclass fields (flags > file > defaults), defaults equal to the reference run's (configs/arith.toml)."""

import re
from dataclasses import fields, replace
from pathlib import Path

import pytest

import reasonmaxxer
from reasonmaxxer.backends.hf import SamplingConfig
from reasonmaxxer.backends.vllm import VLLMOptions
from reasonmaxxer.cli import build_parser
from reasonmaxxer.config import RunConfig, build_config, config_overrides, load_run_config
from reasonmaxxer.core.losses import LOSS_VARIANTS
from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.stages.evaluate import EvalConfig
from reasonmaxxer.stages.select import SelectionConfig
from reasonmaxxer.stages.train import TrainConfig

DEMO = Path(reasonmaxxer.__file__).parent / "configs" / "demo.toml"
REFERENCE = Path(reasonmaxxer.__file__).parent / "configs" / "arith.toml"


def _load(tmp_path, text, **over):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_run_config(p, **over)


@pytest.mark.parametrize(
    "text,msg",
    [
        ('[train]\nlr = "fast"\n', 'c.toml [train] lr: expected a float, got "fast"'),
        ('[train]\nepochs = "two"\n', 'c.toml [train] epochs: expected a float, got "two"'),
        ('[sampling]\nn = "two"\n', 'c.toml [sampling] n: expected an integer, got "two"'),
        ("[sampling]\nn = 2.5\n", "c.toml [sampling] n: expected an integer, got 2.5"),
        ("[sampling]\nn = true\n", "c.toml [sampling] n: expected an integer, got true"),
        ("[eval]\ngreedy = 1\n", "c.toml [eval] greedy: expected a boolean (true/false), got 1"),
        ('[eval]\ngreedy = "yes"\n', 'c.toml [eval] greedy: expected a boolean (true/false), got "yes"'),
        ("model = 3\n", "c.toml model: expected a string, got 3"),
        ('[train]\ntarget_modules = "q_proj"\n', 'c.toml [train] target_modules: expected a list, got "q_proj"'),
        ("[train]\ntarget_modules = [1]\n", "c.toml [train] target_modules[0]: expected a string, got 1"),
        ("train = 3\n", "c.toml train: expected a table, got 3"),
        ('[train]\ntau = "high"\n', 'c.toml [train] tau: expected a float, got "high"'),
        ('[selection]\nmax_problems = "all"\n', 'c.toml [selection] max_problems: expected an integer, got "all"'),
        ('data_dir = ["a"]\n', 'c.toml data_dir: expected a string, got ["a"]'),
    ],
)
def test_type_errors_name_file_table_and_key(tmp_path, text, msg):
    with pytest.raises(ReasonMaxxerError) as e:
        _load(tmp_path, text)
    assert str(e.value) == f"{tmp_path}/{msg}"


@pytest.mark.parametrize(
    "text,msg",
    [
        ("[train]\nlr = 0\n", "[train] lr: must be > 0, got 0"),
        ("[train]\ntau_fraction = 1.5\n", "[train] tau_fraction: must be < 1, got 1.5"),
        ("[sampling]\ntop_p = 1.5\n", "[sampling] top_p: must be <= 1, got 1.5"),
        ("[eval]\nn = -1\n", "[eval] n: must be >= 0, got -1"),
        ("[selection]\nmax_problems = 0\n", "[selection] max_problems: must be >= 1, got 0"),
        ('[train]\nvariant = "bogus"\n', "[train] variant: expected one of " + ", ".join(LOSS_VARIANTS)),
        ('[train]\ngate = "eentropy"\n', '[train] gate: expected one of entropy, random; got "eentropy"'),
        ('[selection]\ntruncated = "cut"\n', '[selection] truncated: expected one of drop, mask, keep; got "cut"'),
        ('engine = "slurm"\n', 'engine: expected one of local, ray; got "slurm"'),
        ("[vllm]\ngpu_memory_utilization = 0\n", "[vllm] gpu_memory_utilization: must be > 0, got 0"),
    ],
)
def test_range_and_choice_errors(tmp_path, text, msg):
    with pytest.raises(ReasonMaxxerError, match=re.escape(msg)):
        _load(tmp_path, text)


def test_unknown_keys_and_tables(tmp_path):
    with pytest.raises(ReasonMaxxerError, match=re.escape("c.toml [train]: unknown key(s) ['lrr']")):
        _load(tmp_path, "[train]\nlrr = 1\n")
    with pytest.raises(ReasonMaxxerError, match=re.escape("c.toml: unknown key(s) ['trian']")):
        _load(tmp_path, "[trian]\nlr = 1\n")


def test_int_is_a_fine_float_and_lists_become_tuples(tmp_path):
    c = _load(tmp_path, '[train]\nlr = 1\nepochs = 3\ntarget_modules = ["q_proj"]\n[sampling]\nstop = ["###"]\n')
    assert (c.train.lr, c.train.epochs, c.train.target_modules, c.sampling.stop) == (1, 3, ("q_proj",), ("###",))


def test_errors_come_before_anything_is_built(tmp_path):
    # the check is in the loader itself: a typo in the last table stops the load
    with pytest.raises(ReasonMaxxerError, match="lr: expected a float"):
        _load(tmp_path, 'model = "no-such-model"\n[train]\nlr = "fast"\n')


def test_non_utf8_config_names_the_file_and_byte_offset(tmp_path):
    p = tmp_path / "c.toml"
    p.write_bytes(b'model = "caf\xe9"\n')
    with pytest.raises(ReasonMaxxerError) as e:
        load_run_config(p)
    assert str(e.value).startswith(f"{p}: not UTF-8 text (invalid byte at offset 12)")
    assert "\n" not in str(e.value)


def test_defaults_are_the_reference_run():
    ref = load_run_config(REFERENCE)
    assert replace(load_run_config(None), out=ref.out) == ref
    assert RunConfig().out != ref.out  # `out` is the one key the reference run must set
    demo = load_run_config(DEMO)  # the demo: a smaller version of it, the same recipe
    assert (demo.train.lam, demo.train.tau_fraction, demo.train.variant) == (
        ref.train.lam,
        ref.train.tau_fraction,
        ref.train.variant,
    )
    assert (demo.validation_problems, demo.eval.greedy, demo.train.epochs) == ("", False, 1.0)


def test_precedence_flags_over_file_over_defaults(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('out = "from-file"\n[train]\nlr = 3e-4\nlam = 0.5\n[sampling]\nn = 3\n')
    a = build_parser().parse_args(["run", str(p), "--train-lr", "5e-4", "--sampling-n", "6", "--eval-n", "0"])
    c = load_run_config(a.config, **config_overrides(a))
    assert (c.train.lr, c.sampling.n, c.eval.n) == (5e-4, 6, 0)  # flags
    assert (c.out, c.train.lam) == ("from-file", 0.5)  # file
    assert c.train.epochs == RunConfig().train.epochs == 2.0  # defaults (the reference run's)
    assert c.selection == RunConfig().selection


def test_existing_flag_names_keep_working():
    a = build_parser().parse_args(
        ["demo", "--train-gate", "random", "--out", "runs/demo-random", "--threads", "1"]
        + ["--train-tau", "1.5", "--train-tau-fraction", "0.1", "--train-variant", "rft", "--train-lam", "0"]
        + ["--train-max-steps", "3", "--backend", "vllm", "--tensor-parallel-size", "2", "--data-parallel-size", "2"]
        + ["--gpu-memory-utilization", "0.5", "--engine", "ray", "--workers", "3", "--ray-address", "auto"]
    )
    o = config_overrides(a)
    assert o == {
        "out": "runs/demo-random",
        "threads": 1,
        "engine": "ray",
        "workers": 3,
        "ray_address": "auto",
        "backend": "vllm",
        "train.variant": "rft",
        "train.gate": "random",
        "train.tau": 1.5,
        "train.tau_fraction": 0.1,
        "train.lam": 0.0,
        "train.max_steps": 3,
        "vllm.tensor_parallel_size": 2,
        "vllm.data_parallel_size": 2,
        "vllm.gpu_memory_utilization": 0.5,
    }
    assert config_overrides(build_parser().parse_args(["demo"])) == {}


def test_flag_choices_come_from_the_registries(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "c.toml", "--train-variant", "bogus"])
    assert "{" + ",".join(LOSS_VARIANTS) + "}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--rollouts", "r", "--out", "o", "--variant", "bogus"])
    assert "{" + ",".join(LOSS_VARIANTS) + "}" in capsys.readouterr().err
    a = build_parser().parse_args(["train", "--rollouts", "r", "--out", "o", "--variant", "rft", "--full-finetune"])
    assert (a.variant, a.full_finetune, a.lr, a.tau) == ("rft", True, None, None)


@pytest.mark.parametrize("cmd", [["run"], ["demo"], ["train"]])
def test_generated_help_has_the_field_help_text(capsys, cmd):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*cmd, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    lr = next(f for f in fields(TrainConfig) if f.name == "lr").metadata["help"]
    frac = next(f for f in fields(TrainConfig) if f.name == "tau_fraction").metadata["help"]
    flag = "--lr" if cmd == ["train"] else "--train-lr"
    assert f"{flag} X {lr}" in out and " ".join(frac.split()) in out


def test_build_config_over_a_base_keeps_the_base_values():
    base = TrainConfig(lr=2e-4, epochs=2.0)
    c = build_config(TrainConfig, {"lam": 0.5}, "x [train]", base=base)
    assert (c.lr, c.epochs, c.lam) == (2e-4, 2.0, 0.5)
    assert build_config(TrainConfig, {"lam": 0.5}, "x [train]").lr == TrainConfig().lr


def test_baseline_config_is_checked_by_the_same_loader(tmp_path):
    from reasonmaxxer.recipes.baselines import load_baseline_config

    p = tmp_path / "b.toml"
    p.write_text('lr = "fast"\n')
    with pytest.raises(ReasonMaxxerError, match=re.escape(f'{p} lr: expected a float, got "fast"')):
        load_baseline_config(p)
    p.write_text("[eval]\ngreedy = 1\n")
    with pytest.raises(ReasonMaxxerError, match=re.escape(f"{p} [eval] greedy: expected a boolean")):
        load_baseline_config(p)
    p.write_text("[eval]\nn = 2\n")  # a partial [eval] table fills in from EvalConfig's defaults,
    cfg = load_baseline_config(p)  # but its length is the run's generation length (96), not EvalConfig's 256
    assert cfg.eval.n == 2 and cfg.eval.seed == 1234 and cfg.eval.max_new_tokens == cfg.max_new_tokens == 96
    with pytest.raises(ReasonMaxxerError, match="method: expected one of grpo"):
        load_baseline_config(None, method="ppo")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SamplingConfig(top_p=1.5), "sampling top_p: must be <= 1, got 1.5"),
        (lambda: SamplingConfig(n=0), "sampling n: must be >= 1, got 0"),
        (lambda: TrainConfig(gate="both"), 'train gate: expected one of entropy, random; got "both"'),
        (lambda: TrainConfig(variant="nope"), "train variant: expected one of reasonmaxxer, "),
        (lambda: TrainConfig(micro_batch=0), "train micro_batch: must be >= 1, got 0"),
        (lambda: EvalConfig(n=-1), "eval n: must be >= 0, got -1"),
        (lambda: VLLMOptions(gpu_memory_utilization=0), "vllm gpu_memory_utilization: must be > 0, got 0"),
        (
            lambda: SelectionConfig(order="random"),
            'SelectionConfig order: expected one of shuffle, clarity, none; got "random"',
        ),
    ],
)
def test_configs_built_in_code_are_checked_by_the_same_field_metadata(make, message):
    with pytest.raises(ReasonMaxxerError) as e:
        make()
    assert str(e.value).startswith(message)


def test_stop_flags():
    """--stop on sample/eval; on run/demo the generated --sampling-stop (alias --stop) and --eval-stop."""
    from reasonmaxxer.cli.options import sampling_config

    a = build_parser().parse_args(["demo", "--stop", "Problem:", "Human:", "--eval-stop", "###"])
    assert config_overrides(a) == {"sampling.stop": ["Problem:", "Human:"], "eval.stop": ["###"]}
    c = load_run_config(None, **config_overrides(a))
    assert (c.sampling.stop, c.eval.stop) == (("Problem:", "Human:"), ("###",))
    for cmd in (["sample", "--out", "o"], ["eval"]):
        a = build_parser().parse_args([*cmd, "--stop", "Q:", "A:"])
        assert sampling_config(a).stop == ("Q:", "A:")
        assert sampling_config(build_parser().parse_args(cmd)).stop == ()  # the template's


PAPER = Path(reasonmaxxer.__file__).parent / "configs" / "paper"


@pytest.mark.parametrize("path", sorted(PAPER.glob("*.toml")), ids=lambda p: p.name)
def test_paper_configs_load_through_the_typed_loader(path):
    cfg = load_run_config(path)  # every key type- and range-checked; nothing runs
    assert cfg.backend == "vllm" and cfg.train_problems == "simplerl:train:levels=3,4,5:per_level=100:seed=42"
    assert (cfg.sampling.n, cfg.sampling.temperature, cfg.sampling.top_p) == (20, 0.6, 0.95)
    assert cfg.sampling.max_new_tokens == 8192 and cfg.eval.max_new_tokens == 8192
    assert (cfg.train.tau, cfg.train.lr, cfg.train.warmup_steps) == (1.4, 1e-4, 50)
    assert (cfg.train.schedule_steps, cfg.train.max_steps, cfg.train.checkpoint_every) == (200, 149, 15)
    assert cfg.train.micro_batch * cfg.train.grad_accum == 8
    assert (cfg.selection.max_problems, cfg.selection.keep_shortest) == (50, 0.8)
    assert cfg.validation_problems == "math500:test:n=60:seed=42" and cfg.test_problems == "math500"
    assert (cfg.eval.n, cfg.eval.temperature, cfg.eval.top_p, cfg.validation_temperature) == (4, 0.6, 0.95, 0.6)
    assert "{question}" in cfg.template and "\\boxed{}" in cfg.template


def test_paper_configs_are_there():
    assert sorted(p.name for p in PAPER.glob("*.toml")) == ["qwen2.5-math-1.5b.toml", "qwen3-0.6b.toml"]
    assert load_run_config(PAPER / "qwen3-0.6b.toml").model == "Qwen/Qwen3-0.6B"


def test_calibrate_table_and_flags_are_typed(tmp_path):
    """[calibrate] taus: floats from TOML and from --calibrate-taus; a wrong type is one line."""
    from reasonmaxxer.cli import build_parser
    from reasonmaxxer.config import config_overrides, load_run_config

    c = tmp_path / "c.toml"
    c.write_text('extends = "' + str(Path("configs/demo.toml").resolve()) + '"\n[calibrate]\ntaus = [1.0, 2]\n')
    assert load_run_config(c).calibrate.taus == (1.0, 2)
    a = build_parser().parse_args(["run", str(c), "--calibrate-taus", "0.5", "1.5", "--calibrate-max-steps", "3"])
    cfg = load_run_config(c, **config_overrides(a))
    assert cfg.calibrate.taus == (0.5, 1.5) and cfg.calibrate.max_steps == 3
    c.write_text('[calibrate]\ntaus = ["low"]\n')
    with pytest.raises(ReasonMaxxerError, match=r"\[calibrate\] taus\[0\]: expected a float"):
        load_run_config(c)


def test_report_to_and_push_to_hub_flags(tmp_path, capsys):
    """run/demo: generated from RunConfig (report_to, push_to_hub); train: its own flags. Not TrainConfig fields."""
    from dataclasses import fields

    from reasonmaxxer.cli import build_parser
    from reasonmaxxer.config import RunConfig, config_overrides, load_run_config
    from reasonmaxxer.stages.train import TrainConfig

    assert not {"report_to", "push_to_hub"} & {f.name for f in fields(TrainConfig)}
    a = build_parser().parse_args(["demo", "--report-to", "wandb", "--push-to-hub", "me/tiny"])
    assert config_overrides(a) == {"report_to": "wandb", "push_to_hub": "me/tiny"}
    c = load_run_config(None, **config_overrides(a))
    assert (c.report_to, c.push_to_hub) == ("wandb", "me/tiny")
    assert (RunConfig().report_to, RunConfig().push_to_hub) == ("none", "")
    p = tmp_path / "c.toml"
    p.write_text('report_to = "mlflow"\n')
    with pytest.raises(ReasonMaxxerError, match="report_to"):
        load_run_config(p)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "c.toml", "--report-to", "mlflow"])
    assert "{none,tensorboard,wandb}" in capsys.readouterr().err
    t = build_parser().parse_args(["train", "--rollouts", "r", "--out", "o", "--report-to", "tensorboard"])
    assert (t.report_to, t.push_to_hub) == ("tensorboard", "")
    t = build_parser().parse_args(["train", "--rollouts", "r", "--out", "o", "--push-to-hub", "me/x"])
    assert (t.report_to, t.push_to_hub) == ("none", "me/x")
    from reasonmaxxer.stages.tracking import REPORT_TO

    for kind in REPORT_TO:  # train's choices (written out in cli/parser.py) are the tracker registry's
        assert (
            build_parser().parse_args(["train", "--rollouts", "r", "--out", "o", "--report-to", kind]).report_to == kind
        )
