"""The run pipeline's config handling, its early stop when nothing can be selected, and the
lifecycle of its vLLM engine (a fake `vllm`, the one of tests/backends/test_vllm.py)."""

import importlib.util
import json
import types
import weakref
from pathlib import Path

import pytest
from conftest import make_tiny_model

from reasonmaxxer.backends.hf import Request, SamplingConfig
from reasonmaxxer.config import load_run_config
from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.recipes.run import run_pipeline
from reasonmaxxer.stages.select import SelectionConfig


def _tiny_checkpoint(tmp_path, tiny_tokenizer) -> Path:
    """A tiny random model and its tokenizer, saved as the checkpoint dir tmp_path/tiny."""
    ckpt = tmp_path / "tiny"
    make_tiny_model(len(tiny_tokenizer), seed=3, init_std=0.2).save_pretrained(ckpt)
    tiny_tokenizer.save_pretrained(ckpt)
    return ckpt


def _tiny_run_toml(tmp_path, tiny_tokenizer, rest: str) -> Path:
    """tmp_path/c.toml: a run of `_tiny_checkpoint` (raw template) on arith:train:3 into
    tmp_path/run; `rest`: the config's other keys and tables."""
    p = tmp_path / "c.toml"
    head = f'model = "{_tiny_checkpoint(tmp_path, tiny_tokenizer)}"\ntemplate = "raw"\nout = "{tmp_path / "run"}"\n'
    p.write_text(head + 'train_problems = "arith:train:3"\n' + rest)
    return p


def _train_call(monkeypatch, cfg) -> tuple[tuple, dict]:
    """Run the pipeline of `cfg` up to `stages.train.train` (rollouts sampled, no training data
    prepared) and stop there; returns train()'s (args, kwargs)."""
    from reasonmaxxer.recipes import run
    from reasonmaxxer.stages import train as train_mod

    call = {}

    def train(*args, **kwargs):
        call["args"], call["kwargs"] = args, kwargs
        raise RuntimeError("stop after training starts")

    monkeypatch.setattr(run, "prepare_training_data", lambda *a, **k: (types.SimpleNamespace(stats={}), [], {}))
    monkeypatch.setattr(train_mod, "train", train)
    with pytest.raises(RuntimeError, match="stop after"):
        run_pipeline(cfg, progress=False)
    return call["args"], call["kwargs"]


def test_config_file_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(
        'model = "m"\n[train]\nlr = 3e-4\ntarget_modules = ["q_proj"]\n[sampling]\nn = 3\n[selection]\nmax_problems = 5\n'
    )
    cfg = load_run_config(p, **{"train.tau": 1.5, "out": "x"})
    assert cfg.model == "m" and cfg.out == "x" and cfg.sampling.n == 3
    assert cfg.train.lr == 3e-4 and cfg.train.tau == 1.5 and cfg.train.target_modules == ("q_proj",)
    # a table overrides the defaults (the demo's) key by key
    assert cfg.selection == SelectionConfig(max_problems=5, truncated="drop", order="clarity")


@pytest.mark.parametrize(
    "text,msg",
    [
        ("[train]\nlrr = 1\n", "unknown key(s) ['lrr']"),
        ("[selection]\norder = 'bogus'\n", "order"),
        ("model = \n", "invalid TOML"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, msg):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(
        ReasonMaxxerError, match=msg.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
    ):
        load_run_config(p)


def test_pipeline_stops_with_advice_when_no_problem_has_mixed_success(tmp_path, tiny_tokenizer):
    p = _tiny_run_toml(
        tmp_path,
        tiny_tokenizer,
        'validation_problems = ""\ntest_problems = "arith:test:2"\n[sampling]\nn = 2\nmax_new_tokens = 8\n',
    )
    with pytest.raises(ReasonMaxxerError, match="(?s)mixed success.*--n.*temperature"):
        run_pipeline(load_run_config(p), progress=False)
    # the sampled rollouts are kept for the next attempt
    assert (tmp_path / "run" / "rollouts" / "manifest.json").is_file()


def test_reuse_copies_the_rollouts_only_when_made_with_the_same_inputs(tmp_path, tiny_tokenizer):
    """`reuse` of a run whose rollouts match: copied, not sampled again (the manifest's creation
    time is the source's and it generated nothing); of a run with other training problems:
    sampled here, no error."""
    ckpt = _tiny_checkpoint(tmp_path, tiny_tokenizer)

    def run_to_select(name, train, reuse=""):
        p = tmp_path / f"{name}.toml"
        p.write_text(
            f'model = "{ckpt}"\ntemplate = "raw"\nout = "{tmp_path / name}"\ntrain_problems = "{train}"\n'
            f'validation_problems = ""\ntest_problems = "arith:test:2"\n{reuse}[sampling]\nn = 2\nmax_new_tokens = 8\n'
        )
        with pytest.raises(ReasonMaxxerError, match="mixed success"):  # stops after sampling
            run_pipeline(load_run_config(p), progress=False)
        return json.loads((tmp_path / name / "rollouts" / "manifest.json").read_text())

    src = run_to_select("src", "arith:train:3")
    same = run_to_select("same", "arith:train:3", f'reuse = "{tmp_path / "src"}"\n')
    assert same["config_hash"] == src["config_hash"] and same["created"] == src["created"]
    assert src["generated_tokens_last_run"] > 0 and same["generated_tokens_last_run"] == 0
    other = run_to_select("other", "arith:train:4", f'reuse = "{tmp_path / "src"}"\n')
    assert other["config_hash"] != src["config_hash"] and other["config"]["n_problems"] == 4


def test_extends_merges_tables_and_ships_the_ablations(tmp_path):
    (tmp_path / "base.toml").write_text('out = "a"\nmodel = "m"\n[train]\nlr = 1e-3\nlam = 0.5\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\nout = "b"\n[train]\nvariant = "rft"\n')
    c = load_run_config(tmp_path / "child.toml")
    assert (c.out, c.model, c.train.lr, c.train.lam, c.train.variant) == ("b", "m", 1e-3, 0.5, "rft")
    (tmp_path / "loop.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(ReasonMaxxerError, match="too deep"):
        load_run_config(tmp_path / "loop.toml")
    from pathlib import Path

    import reasonmaxxer

    shipped = Path(reasonmaxxer.__file__).parent / "configs" / "ablations"
    demo = load_run_config(shipped.parent / "arith.toml")
    for f in sorted(shipped.glob("*.toml")):
        a = load_run_config(f)
        assert a.reuse == "runs/arith" and a.out == f"runs/ablation-{f.stem}"
        # the same data, sampling and budget as the reference run; only the loss variant or the gate differs
        assert (a.sampling, a.selection, a.eval, a.train_problems) == (
            demo.sampling,
            demo.selection,
            demo.eval,
            demo.train_problems,
        )
        diff = {k for k in a.train.__dataclass_fields__ if getattr(a.train, k) != getattr(demo.train, k)}
        assert diff in ({"variant"}, {"gate"})


def test_reuse_of_a_missing_run_dir_says_to_run_its_config_first(tmp_path):
    from reasonmaxxer.config import RunConfig
    from reasonmaxxer.recipes.run import reuse_dir

    assert reuse_dir(RunConfig()) is None
    assert reuse_dir(RunConfig(reuse=str(tmp_path))) == tmp_path
    with pytest.raises(ReasonMaxxerError, match="not a run dir .run the config that writes it first") as e:
        reuse_dir(RunConfig(reuse=str(tmp_path / "nope")))
    assert "\n" not in str(e.value)


def test_fork_changes_counts_argmax_differences_exactly(tiny_tokenizer):
    """fork_changes against a plain per-example forward: the same changed positions, top-5 hits
    and gated hits; a model against itself changes nothing."""
    import torch
    from conftest import random_train_examples

    from reasonmaxxer.analysis.forks import fork_changes, report_examples

    vocab = len(tiny_tokenizer)
    base, tuned = make_tiny_model(vocab, seed=0, init_std=0.2), make_tiny_model(vocab, seed=1, init_std=0.2)
    exs = random_train_examples(6, vocab=vocab)
    gates = [torch.arange(len(e.completion_ids)) % 2 == 0 for e in exs]
    same = fork_changes(base, base, tiny_tokenizer, exs, gates, batch=4)
    n_pos = sum(len(e.completion_ids) for e in exs)
    assert same["positions"] == n_pos and same["changed"] == 0
    want = top5 = gated = 0
    with torch.no_grad():
        for e, g in zip(exs, gates):
            ids = torch.tensor([list(e.prompt_ids) + list(e.completion_ids)])
            p = len(e.prompt_ids)
            bl = base(input_ids=ids).logits[0, p - 1 : -1]
            tl = tuned(input_ids=ids).logits[0, p - 1 : -1]
            diff = bl.argmax(-1) != tl.argmax(-1)
            want += int(diff.sum())
            top5 += int(((bl.topk(5, -1).indices == tl.argmax(-1)[:, None]).any(-1) & diff).sum())
            gated += int((diff & g).sum())
    got = fork_changes(base, tuned, tiny_tokenizer, exs, gates, batch=4)
    assert want > 0
    assert (got["changed"], got["changed_in_base_top5"], got["changed_at_gated"]) == (want, top5, gated)
    rep = report_examples(base, tiny_tokenizer, exs, gates, k=2)
    assert len(rep) == 2 and all(len(r["tokens"]) > 0 for r in rep)
    assert all(("top5" in t) == t["gated"] for r in rep for t in r["tokens"])


# -- the vLLM engine of a run: asleep while the HF model scores and trains, closed on any failure --
_spec = importlib.util.spec_from_file_location("vllm_fakes", Path(__file__).parents[1] / "backends" / "test_vllm.py")
_fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fakes)
fake_vllm = _fakes.fake_vllm  # the fixture
FakeLLM = _fakes.FakeLLM


def _vllm_config(tmp_path, tiny_tokenizer, between="sleep"):
    p = _tiny_run_toml(
        tmp_path,
        tiny_tokenizer,
        'validation_problems = ""\ntest_problems = "arith:test:2"\nbackend = "vllm"\n'
        f'[sampling]\nn = 2\nmax_new_tokens = 8\n[vllm]\nbetween_stages = "{between}"\n',
    )
    return load_run_config(p)


def _closed(fake_vllm):
    """The run's one engine was closed: vLLM's groups destroyed and the LLM object collected."""
    import gc

    (llm,) = FakeLLM.instances
    ref = weakref.ref(llm)
    del llm
    FakeLLM.instances.clear()
    gc.collect()
    return ref() is None and fake_vllm.teardown == ["destroy_model_parallel", "destroy_distributed_environment"]


def test_a_failing_stage_closes_the_vllm_engine(fake_vllm, tmp_path, tiny_tokenizer):
    cfg = _vllm_config(tmp_path, tiny_tokenizer)
    with pytest.raises(ReasonMaxxerError, match="mixed success"):  # the select stage fails
        run_pipeline(cfg, progress=False)
    assert FakeLLM.log[-1] == "sleep:1" and "generate" in FakeLLM.log  # sampled, then asleep for scoring
    assert FakeLLM.instances[0].kwargs["enable_sleep_mode"] is True
    assert _closed(fake_vllm)


def test_engine_sleeps_for_scoring_and_training_and_wakes_for_eval(fake_vllm, tmp_path, tiny_tokenizer, monkeypatch):
    from reasonmaxxer.recipes import run
    from reasonmaxxer.stages import train as train_mod

    def prepare(*a, **k):
        FakeLLM.log.append("score")
        return types.SimpleNamespace(stats={}), [], {}

    def train(*a, **k):
        FakeLLM.log.append("train")
        return {"tau": 1.0}

    def evaluate(*a, sampler=None, **k):
        FakeLLM.log.append("eval")
        sampler.generate([Request(("q", 0), (1, 2))], SamplingConfig(n=1, max_new_tokens=2))
        raise RuntimeError("stop after the base evaluation")

    monkeypatch.setattr(run, "prepare_training_data", prepare)
    monkeypatch.setattr(train_mod, "train", train)
    monkeypatch.setattr(run, "evaluate_model", evaluate)
    with pytest.raises(RuntimeError, match="stop after"):
        run_pipeline(_vllm_config(tmp_path, tiny_tokenizer), progress=False)
    log = [e for i, e in enumerate(FakeLLM.log) if e != "generate" or FakeLLM.log[i - 1] != "generate"]
    assert log == ["start", "generate", "sleep:1", "score", "train", "wake", "eval", "generate"]
    assert _closed(fake_vllm)


def test_auto_keeps_the_engine_when_the_hf_model_is_on_the_cpu(fake_vllm, tmp_path, tiny_tokenizer):
    with pytest.raises(ReasonMaxxerError, match="mixed success"):
        run_pipeline(_vllm_config(tmp_path, tiny_tokenizer, between="auto"), progress=False)
    assert "enable_sleep_mode" not in FakeLLM.instances[0].kwargs and "sleep:1" not in FakeLLM.log
    assert _closed(fake_vllm)


def test_out_of_memory_in_a_stage_is_one_line_and_closes_the_engine(fake_vllm, tmp_path, tiny_tokenizer, monkeypatch):
    import torch

    from reasonmaxxer.recipes import run

    def prepare(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has 1 GiB free")

    monkeypatch.setattr(run, "prepare_training_data", prepare)
    with pytest.raises(ReasonMaxxerError) as ei:
        run_pipeline(_vllm_config(tmp_path, tiny_tokenizer), progress=False)
    msg = str(ei.value)
    assert msg.startswith("select + score: out of memory (CUDA out of memory)") and "\n" not in msg
    assert (tmp_path / "run" / "rollouts" / "manifest.json").is_file()  # the sampled rollouts are kept
    assert _closed(fake_vllm)


def test_calibrate_table_chooses_tau_on_validation_before_training(tmp_path, tiny_tokenizer, monkeypatch):
    """[calibrate] taus: the sweep scores with the validation that picks the checkpoint (built
    from the validation problems, never the test ones, at validation_temperature); its best tau
    is what training gets and what run_config.json records."""
    from reasonmaxxer.recipes import run as run_mod
    from reasonmaxxer.recipes import tau_sweep

    p = _tiny_run_toml(
        tmp_path,
        tiny_tokenizer,
        'validation_problems = "arith:validation:4"\ntest_problems = "arith:test:2"\nvalidation_temperature = 0.6\n'
        "[sampling]\nn = 2\nmax_new_tokens = 4\n[eval]\ntop_p = 0.95\n[calibrate]\ntaus = [0.5, 1.5]\nmax_steps = 2\n",
    )
    seen = {}

    def validation_accuracy_fn(problems, *args, **kw):
        seen["validation"], seen["validation_kw"] = [q.id for q in problems], kw

        def validate(model):
            raise AssertionError("not called in this test")

        return validate

    def sweep(examples, spec, model, tok, validate, **kw):
        seen["sweep_validate"], seen["taus"] = validate, kw["taus"]
        seen["overwrite"] = kw["overwrite"]  # run's --overwrite reaches the candidates' training dirs
        return {"best_tau": 1.5}

    monkeypatch.setattr(run_mod, "validation_accuracy_fn", validation_accuracy_fn)
    monkeypatch.setattr(tau_sweep, "sweep_tau", sweep)
    (_, train_cfg, *_), train_kw = _train_call(monkeypatch, load_run_config(p))
    assert seen["taus"] == (0.5, 1.5) and train_cfg.tau == 1.5
    assert len(seen["validation"]) == 4 and all("test" not in q for q in seen["validation"])
    assert seen["sweep_validate"] is train_kw["validate"]
    assert seen["overwrite"] is False is train_kw["overwrite"]
    assert seen["validation_kw"]["temperature"] == 0.6 and seen["validation_kw"]["top_p"] == 0.95
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["train"]["tau"] == 1.5


def test_report_to_and_push_to_hub_are_checked_up_front_and_the_tracker_reaches_train(
    tmp_path, tiny_tokenizer, monkeypatch
):
    """A missing tracker package or HF_HUB_OFFLINE with push_to_hub: one line before the run dir
    is made; otherwise train() gets the tracker (logging under out/train)."""
    import sys

    from huggingface_hub import constants

    from reasonmaxxer.config import RunConfig

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ReasonMaxxerError, match=r"pip install wandb"):
        run_pipeline(RunConfig(out=str(tmp_path / "a"), report_to="wandb"), progress=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ReasonMaxxerError, match=r"--push-to-hub me/x: HF_HUB_OFFLINE is set"):
        run_pipeline(RunConfig(out=str(tmp_path / "b"), push_to_hub="me/x"), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    made = []
    writer = types.SimpleNamespace(
        add_text=lambda *a, **k: None, add_scalar=lambda *a, **k: None, flush=lambda: None, close=lambda: None
    )
    fake_tb = types.SimpleNamespace(SummaryWriter=lambda log_dir=None, **k: made.append(log_dir) or writer)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_tb)

    ckpt = _tiny_checkpoint(tmp_path, tiny_tokenizer)
    cfg = RunConfig(
        model=str(ckpt), template="raw", out=str(tmp_path / "run"), train_problems="arith:train:2",
        validation_problems="", test_problems="arith:test:2", report_to="tensorboard",
        sampling=SamplingConfig(n=2, max_new_tokens=4),
    )  # fmt: skip
    _, kwargs = _train_call(monkeypatch, cfg)
    assert made == [str(tmp_path / "run" / "train" / "tb")] and kwargs["tracker"].writer is writer


def test_validation_temperature_samples_the_checkpoint_choice_with_evals_top_p_and_seed(
    tmp_path, tiny_tokenizer, monkeypatch
):
    """validation_temperature > 0 (the paper's 0.6): the validation completions that pick the
    checkpoint are sampled at it, with [eval] top_p and seed; train() gets that validate."""
    from reasonmaxxer.recipes import run

    p = _tiny_run_toml(
        tmp_path,
        tiny_tokenizer,
        'validation_problems = "arith:validation:4"\ntest_problems = "arith:test:2"\nvalidation_temperature = 0.6\n'
        "[sampling]\nn = 2\nmax_new_tokens = 4\n[eval]\ntop_p = 0.9\nseed = 7\n",
    )
    seen = {}

    def validation_fn(problems, *args, **kw):
        seen["problems"], seen["kw"] = len(problems), kw
        return "the validate"

    monkeypatch.setattr(run, "validation_accuracy_fn", validation_fn)
    _, kwargs = _train_call(monkeypatch, load_run_config(p))
    assert seen == {"problems": 4, "kw": {"temperature": 0.6, "top_p": 0.9, "seed": 7}}
    assert kwargs["validate"] == "the validate"
