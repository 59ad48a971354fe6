"""The vLLM backend against a fake `vllm` module: what we pass in, how we convert what comes back.

vLLM cannot run here (no GPU), so these tests pin the contract with vLLM's API
(>= 0.8): `LLM(**engine kwargs)`, `SamplingParams(...)` per request, `TokensPrompt`,
`LoRARequest(name, int_id, path)`, and RequestOutput-shaped results.
"""

import json
import random
import sys
import types
from pathlib import Path

import pytest
import tomllib
from conftest import make_tiny_model

from reasonmaxxer.backends import vllm as vllm_backend
from reasonmaxxer.backends.hf import Request, SamplingConfig, request_seed
from reasonmaxxer.backends.vllm import VLLMOptions, VLLMSampler
from reasonmaxxer.data.problems import Problem
from reasonmaxxer.data.prompts import get_template
from reasonmaxxer.errors import ReasonMaxxerError

EOS = 2
STOP_PROMPT_TOKEN = 99  # a prompt ending in this token makes the fake engine emit "...###..." and stop on "###"


# -- the fake vllm module -------------------------------------------------------------------
class FakeLogprob:
    def __init__(self, logprob, rank):
        self.logprob, self.rank, self.decoded_token = logprob, rank, None


class FakeSamplingParams:
    """vLLM's SamplingParams signature (the fields we use); top_k=0 is rejected as vLLM 0.8 does."""

    def __init__(
        self,
        *,
        n=1,
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        seed=None,
        max_tokens=16,
        logprobs=None,
        stop=None,
        stop_token_ids=None,
        skip_special_tokens=True,
    ):
        if top_k == 0 or top_k < -1:
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {top_k}.")
        self.__dict__.update(
            n=n,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            max_tokens=max_tokens,
            logprobs=logprobs,
            stop=stop,
            stop_token_ids=stop_token_ids,
            skip_special_tokens=skip_special_tokens,
        )


class FakeLoRARequest:
    def __init__(self, lora_name, lora_int_id, lora_path):
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


class FakeLLM:
    """vllm.LLM: records its kwargs, generate calls, and sleep / wake_up / generate in `log` (shared)."""

    instances: list = []
    stop_tokens: tuple = ()
    log: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []
        self.asleep = False
        FakeLLM.instances.append(self)
        FakeLLM.log.append("start")

    def sleep(self, level=1):
        assert self.kwargs.get("enable_sleep_mode"), "vLLM: sleep mode is not enabled"
        self.asleep = True
        FakeLLM.log.append(f"sleep:{level}")

    def wake_up(self, tags=None):
        self.asleep = False
        FakeLLM.log.append("wake")

    def generate(self, prompts, sampling_params=None, use_tqdm=True, lora_request=None):
        assert not self.asleep, "vLLM: generate on a sleeping engine"
        FakeLLM.log.append("generate")
        self.calls.append({"prompts": prompts, "params": sampling_params, "lora": lora_request})
        return [self._one(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, sampling_params))]

    @staticmethod
    def _one(i, prompt, sp):
        """Tokens drawn from the request's seed: a printable-character id per step, EOS or max_tokens ends it."""
        rng = random.Random(sp.seed)
        stop_reason, finish = None, "length"
        if prompt["prompt_token_ids"][-1] == STOP_PROMPT_TOKEN:
            toks = list(FakeLLM.stop_tokens)  # text "ab###c": vLLM keeps the tokens and cuts the text
            finish, stop_reason = "stop", "###"
        else:
            length = rng.randint(1, sp.max_tokens + 3)
            toks = [rng.randint(10, 60) for _ in range(min(length, sp.max_tokens))]
            if length <= sp.max_tokens:
                toks[-1] = sp.stop_token_ids[0]
                finish, stop_reason = "stop", sp.stop_token_ids[0]
        # logprobs=0: the sampled token; a second entry checks that we pick the sampled one
        lps = [{t: FakeLogprob(-0.01 * (k + 1), 2), 3: FakeLogprob(-0.001, 1)} for k, t in enumerate(toks)]
        out = types.SimpleNamespace(
            index=0,
            text="(vllm's text)",
            token_ids=tuple(toks),
            logprobs=lps,
            cumulative_logprob=sum(d[t].logprob for d, t in zip(lps, toks)),
            finish_reason=finish,
            stop_reason=stop_reason,
        )
        return types.SimpleNamespace(
            request_id=str(i), prompt_token_ids=prompt["prompt_token_ids"], outputs=[out], finished=True
        )


@pytest.fixture
def fake_vllm(monkeypatch):
    """A fake `vllm` (version 0.19.1); `vllm.teardown` records vllm.distributed.parallel_state's destroy calls."""
    FakeLLM.instances, FakeLLM.log = [], []
    vllm = types.ModuleType("vllm")
    vllm.__version__ = "0.19.1"
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeSamplingParams
    vllm.teardown = []
    dist = types.ModuleType("vllm.distributed")
    ps = types.ModuleType("vllm.distributed.parallel_state")
    ps.destroy_model_parallel = lambda: vllm.teardown.append("destroy_model_parallel")
    ps.destroy_distributed_environment = lambda: vllm.teardown.append("destroy_distributed_environment")
    dist.parallel_state = ps
    monkeypatch.setitem(sys.modules, "vllm.distributed", dist)
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", ps)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: dict(kw)  # a TypedDict in vLLM
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest
    vllm.inputs, vllm.lora, lora.request = inputs, lora, request
    for name, mod in (("vllm", vllm), ("vllm.inputs", inputs), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    return vllm


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, ckpt):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("adapter")
    pm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(ckpt), LoraConfig(r=12, target_modules=["q_proj", "v_proj"])
    )
    pm.save_pretrained(d)
    c = json.loads((d / "adapter_config.json").read_text())
    c["base_model_name_or_path"] = str(ckpt)
    (d / "adapter_config.json").write_text(json.dumps(c))
    return d


def _requests(tok, n=3):
    return [Request((f"p{i}", s), tuple(tok(f"Q{i}: 1+{i}=")["input_ids"])) for i in range(n) for s in range(2)]


# -- what we pass in --------------------------------------------------------------------------
def test_engine_and_sampling_params(fake_vllm, ckpt, tiny_tokenizer):
    opts = VLLMOptions(tensor_parallel_size=2, gpu_memory_utilization=0.7, max_model_len=1024, seed=5)
    s = VLLMSampler(str(ckpt), opts)
    assert FakeLLM.instances == []  # the engine starts on first use
    reqs = _requests(tiny_tokenizer)
    cfg = SamplingConfig(n=2, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=12, seed=11)
    s.generate(reqs, cfg)
    (llm,) = FakeLLM.instances
    assert llm.kwargs == {
        "model": str(ckpt),
        "tokenizer": str(ckpt),
        "dtype": "bfloat16",
        "seed": 5,
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.7,
        "enforce_eager": False,
        "max_model_len": 1024,
    }
    (call,) = llm.calls
    assert call["lora"] is None
    assert [p["prompt_token_ids"] for p in call["prompts"]] == [list(r.prompt_ids) for r in reqs]
    for r, sp in zip(reqs, call["params"]):
        assert sp.seed == request_seed(11, r.key[0], r.key[1])
        assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.logprobs) == (1, 0.7, 0.9, -1, 12, 0)
        assert sp.stop_token_ids == [EOS] and sp.stop is None
    assert len({sp.seed for sp in call["params"]}) == len(reqs)
    s.generate(reqs[:1], SamplingConfig(n=1, temperature=0, top_k=5, max_new_tokens=4, stop=("###",)))
    sp = llm.calls[-1]["params"][0]
    assert (sp.temperature, sp.top_p, sp.top_k, sp.stop) == (0.0, 1.0, -1, ["###"])  # greedy: filters off
    assert len(FakeLLM.instances) == 1  # one engine for every call


def test_adapter_is_served_as_lora(fake_vllm, ckpt, adapter, tiny_tokenizer):
    s = VLLMSampler(str(adapter))
    reqs = _requests(tiny_tokenizer, 1)
    s.generate(reqs, SamplingConfig(n=1, max_new_tokens=4))
    (llm,) = FakeLLM.instances
    assert llm.kwargs["model"] == str(ckpt) and llm.kwargs["enable_lora"] is True
    assert llm.kwargs["max_lora_rank"] == 16 and llm.kwargs["max_loras"] == 1  # rank 12 -> vLLM's bucket 16
    lr = llm.calls[0]["lora"]
    assert (lr.lora_name, lr.lora_int_id, lr.lora_path) == ("adapter-1", 1, str(adapter))
    base = s.for_model(str(ckpt))  # the base, from the same engine
    base.generate(reqs, SamplingConfig(n=1, max_new_tokens=4))
    assert llm.calls[-1]["lora"] is None and len(FakeLLM.instances) == 1
    s.generate(reqs, SamplingConfig(n=1, max_new_tokens=4))
    assert llm.calls[-1]["lora"].lora_int_id == 1  # the same adapter keeps its id
    with pytest.raises(ReasonMaxxerError, match="without enable_lora"):
        VLLMSampler(str(ckpt)).for_model(str(adapter))


def test_data_parallel_replicas_split_requests(fake_vllm, ckpt, tiny_tokenizer, monkeypatch):
    started, events = [], []

    class InProcess(vllm_backend.LocalEngine):  # stands in for the spawned replica process
        def __init__(self, llm_kwargs, gpus):
            super().__init__(llm_kwargs)
            started.append(list(gpus))
            self.gpus = gpus
            events.append(("start", gpus[0]))

        def wait_ready(self):
            events.append(("ready", self.gpus[0]))

    monkeypatch.setattr(vllm_backend, "ProcessEngine", InProcess)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4")
    reqs = _requests(tiny_tokenizer, 4)  # 8 requests
    cfg = SamplingConfig(n=2, max_new_tokens=6, seed=1)
    out = VLLMSampler(str(ckpt), VLLMOptions(tensor_parallel_size=2, data_parallel_size=2)).generate(reqs, cfg)
    assert started == [["0", "1"], ["2", "3"]]
    # every replica starts loading before we wait for any: they load side by side
    assert events == [("start", "0"), ("start", "2"), ("ready", "0"), ("ready", "2")]
    assert [len(llm.calls[0]["prompts"]) for llm in FakeLLM.instances] == [4, 4]  # contiguous blocks
    assert [c.key for c in out] == [r.key for r in reqs]
    single = VLLMSampler(str(ckpt)).generate(reqs, cfg)  # seeds per request: the split does not change samples
    assert [c.token_ids for c in out] == [c.token_ids for c in single]
    with pytest.raises(ReasonMaxxerError, match="needs 6 GPUs; 5 visible"):
        VLLMSampler(str(ckpt), VLLMOptions(tensor_parallel_size=2, data_parallel_size=3)).generate(reqs, cfg)


# -- how we convert what comes back ---------------------------------------------------------
def test_outputs_become_completions(fake_vllm, ckpt, tiny_tokenizer):
    s = VLLMSampler(str(ckpt))
    reqs = _requests(tiny_tokenizer, 6)
    stop_req = Request(("stop", 0), tuple(tiny_tokenizer("Q: ")["input_ids"]) + (STOP_PROMPT_TOKEN,))
    FakeLLM.stop_tokens = tuple(tiny_tokenizer("ab###c", add_special_tokens=False)["input_ids"])
    done = []
    ntok = []
    out = s.generate(
        reqs + [stop_req],
        SamplingConfig(n=2, max_new_tokens=5, stop=("###",)),
        on_done=done.append,
        progress=ntok.append,
    )
    reasons = {c.finish_reason for c in out}
    assert reasons == {"eos", "length", "stop"}  # the fake's seeds give all three
    for c in out:
        assert c.entropies is None  # vLLM gives no full-vocabulary entropy
        assert c.logprobs == pytest.approx([-0.01 * (k + 1) for k in range(len(c.token_ids))])  # the sampled token's
        assert c.truncated == (c.finish_reason == "length")
        if c.finish_reason == "eos":
            assert c.token_ids[-1] == EOS and c.text == tiny_tokenizer.decode(c.token_ids, skip_special_tokens=True)
        if c.finish_reason == "length":
            assert len(c.token_ids) == 5
    stop = out[-1]
    assert stop.finish_reason == "stop" and stop.token_ids == list(FakeLLM.stop_tokens)
    assert stop.text == "ab"  # cut before the stop string, as the HF backend does
    assert [c.key for c in done] == [c.key for c in out] and ntok == [sum(len(c.token_ids) for c in out)]


def test_abort_is_an_error():
    with pytest.raises(ReasonMaxxerError, match="finish_reason='abort'"):
        vllm_backend.finish_reason({"finish_reason": "abort", "stop_reason": None}, ("p", 0))


# -- the pipeline: a vLLM store is rescored, never reused ---------------------------------------
def test_vllm_store_is_rescored(fake_vllm, ckpt, tiny_tokenizer, tmp_path):
    from reasonmaxxer.stages.sample import sample_stage
    from reasonmaxxer.stages.score import attach_scores

    problems = [Problem(id=f"q{i}", question=f"{i}+1", answer=str(i + 1)) for i in range(2)]
    cfg = SamplingConfig(n=2, max_new_tokens=6)
    tmpl = get_template("raw")
    spec = str(ckpt)
    vstore = sample_stage(
        tmp_path / "v", spec, problems, tmpl, cfg, sampler=VLLMSampler(spec), progress=False, grade_workers=0
    )
    man = vstore.manifest()
    assert man["config"]["backend"] == "vllm" and man["backend"]["options"]["tensor_parallel_size"] == 1
    rows = vstore.read_rows()
    assert all(r["entropies"] is None and len(r["logprobs"]) == len(r["token_ids"]) for r in rows)
    model = make_tiny_model(len(tiny_tokenizer), seed=3, init_std=0.2)
    rows, info = attach_scores(vstore, rows, tmp_path / "scores.parquet", spec, model, tiny_tokenizer, progress=False)
    assert info["reused_sampler_entropies"] is False and info["score_seconds"] >= 0
    assert all(len(r["base_entropies"]) == len(r["token_ids"]) for r in rows)
    # the HF backend, same model: its entropies are reused; the backend is part of the config hash
    hstore = sample_stage(
        tmp_path / "h",
        spec,
        problems,
        tmpl,
        cfg,
        model=model,
        tokenizer=tiny_tokenizer,
        progress=False,
        grade_workers=0,
    )
    assert "backend" not in hstore.manifest()["config"]
    assert hstore.manifest()["config_hash"] != man["config_hash"]
    _, hinfo = attach_scores(
        hstore, hstore.read_rows(), tmp_path / "h.parquet", spec, model, tiny_tokenizer, progress=False
    )
    assert hinfo["reused_sampler_entropies"] is True
    with pytest.raises(ReasonMaxxerError, match="different inputs"):
        sample_stage(tmp_path / "v", spec, problems, tmpl, cfg, model=model, tokenizer=tiny_tokenizer, progress=False)


def test_evaluate_model_with_a_vllm_sampler(fake_vllm, ckpt, tmp_path):
    from reasonmaxxer.stages.evaluate import EvalConfig, evaluate_model

    problems = [Problem(id=f"q{i}", question=f"{i}+1", answer=str(i + 1)) for i in range(2)]
    spec = str(ckpt)
    rep, (s_store, g_store) = evaluate_model(
        None,
        None,
        spec,
        problems,
        get_template("raw"),
        EvalConfig(n=2, max_new_tokens=6),
        tmp_path / "e",
        sampler=VLLMSampler(spec),
        progress=False,
    )
    assert rep.n_problems == 2 and len(FakeLLM.instances) == 1  # no HF model loaded, one engine for both passes
    for st, n in ((s_store, 4), (g_store, 2)):
        assert st.manifest()["config"]["backend"] == "vllm" and len(st.read_rows()) == n
    assert (tmp_path / "e" / "eval.json").is_file()


def test_template_stops_reach_sampling_params(fake_vllm, ckpt, tmp_path):
    """`stop` defaults to the template's (raw: Problem:/Human:/Assistant:; chat kinds: none)."""
    from reasonmaxxer.data.prompts import RAW_STOP
    from reasonmaxxer.stages.evaluate import EvalConfig, evaluate_model

    problems = [Problem(id=f"q{i}", question=f"{i}+1", answer=str(i + 1)) for i in range(2)]
    spec = str(ckpt)
    cases = (("raw", (), list(RAW_STOP)), ("raw", ("###",), ["###"]), ("raw", ("",), None), ("fewshot", (), None))
    for i, (name, stop, want) in enumerate(cases):
        FakeLLM.instances = []
        ecfg = EvalConfig(n=1, greedy=False, max_new_tokens=4, stop=stop)
        evaluate_model(
            None,
            None,
            spec,
            problems,
            get_template(name),
            ecfg,
            tmp_path / str(i),
            sampler=VLLMSampler(spec),
            progress=False,
        )
        params = [sp for call in FakeLLM.instances[0].calls for sp in call["params"]]
        assert len(params) == 2 and all(sp.stop == want for sp in params), (name, stop)
    direct = vllm_backend.sampling_params_kwargs(Request(("p", 0), (5,)), SamplingConfig(stop=("", "###")), [EOS])
    assert direct["stop"] == ["###"]  # an empty string never reaches vLLM (it would stop at once)


def test_stop_tokens_are_cut_in_the_store(fake_vllm, ckpt, tiny_tokenizer, tmp_path):
    """vLLM keeps a stop string's tokens (it cuts only the text); the sample stage cuts them too."""
    from reasonmaxxer.data.prompts import PromptTemplate
    from reasonmaxxer.stages.sample import sample_stage

    assert tiny_tokenizer.convert_ids_to_tokens(STOP_PROMPT_TOKEN) == "\t"
    FakeLLM.stop_tokens = tuple(tiny_tokenizer("ab###c", add_special_tokens=False)["input_ids"])
    tmpl = PromptTemplate("tab", "custom", "{question}\t")  # its prompts end in the fake's stop trigger
    problems = [Problem(id="q0", question="1+1", answer="2")]
    cfg = SamplingConfig(n=1, max_new_tokens=8, stop=("###",))
    store = sample_stage(tmp_path / "s", str(ckpt), problems, tmpl, cfg, sampler=VLLMSampler(str(ckpt)), progress=False)
    (row,) = store.read_rows()
    assert row["finish_reason"] == "stop" and not row["truncated"] and row["completion"] == "ab"
    assert row["token_ids"] == list(tiny_tokenizer("ab", add_special_tokens=False)["input_ids"])
    assert len(row["logprobs"]) == 2


# -- errors and packaging ------------------------------------------------------------------------
def test_missing_vllm_is_one_clear_error(monkeypatch, ckpt, tmp_path, capsys):
    from reasonmaxxer.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ReasonMaxxerError, match=r"pip install 'reasonmaxxer\[vllm\]'"):
        VLLMSampler(str(ckpt))
    rc = main(
        [
            "sample",
            "--model",
            str(ckpt),
            "--problems",
            "arith:train:2",
            "--backend",
            "vllm",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "reasonmaxxer[vllm]" in err
    rc = main(["eval", "--model", str(ckpt), "--problems", "arith:test:2", "--tensor-parallel-size", "2"])
    assert rc == 2 and "--backend vllm only" in capsys.readouterr().err


def test_ray_engine_with_vllm_backend_is_refused(fake_vllm, ckpt, tmp_path, capsys):
    from reasonmaxxer.backends.engines import EngineConfig
    from reasonmaxxer.cli import main
    from reasonmaxxer.config import RunConfig
    from reasonmaxxer.recipes.run import run_pipeline
    from reasonmaxxer.stages.sample import sample_stage

    for cmd in (["sample", "--out", str(tmp_path / "s")], ["eval", "--out", str(tmp_path / "e")]):
        rc = main(cmd + ["--model", str(ckpt), "--problems", "arith:train:2", "--backend", "vllm", "--engine", "ray"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "--engine ray does not apply to --backend vllm" in err
    assert not (tmp_path / "s").exists() and FakeLLM.instances == []  # refused before anything started
    problems = [Problem(id="q0", question="0+1", answer="1")]
    with pytest.raises(ReasonMaxxerError, match="--engine ray does not apply"):
        sample_stage(
            tmp_path / "v",
            str(ckpt),
            problems,
            get_template("raw"),
            SamplingConfig(n=1, max_new_tokens=4),
            sampler=VLLMSampler(str(ckpt)),
            engine=EngineConfig(engine="ray"),
            progress=False,
        )
    with pytest.raises(ReasonMaxxerError, match="--engine ray does not apply"):
        run_pipeline(RunConfig(out=str(tmp_path / "r"), model=str(ckpt), backend="vllm", engine="ray"), progress=False)
    assert not (tmp_path / "r").exists()


def test_run_config_backend_section(tmp_path):
    from reasonmaxxer.config import load_run_config

    p = tmp_path / "c.toml"
    p.write_text('backend = "vllm"\n[vllm]\ntensor_parallel_size = 2\ngpu_memory_utilization = 0.5\n')
    cfg = load_run_config(p, **{"vllm.data_parallel_size": 4})
    assert cfg.backend == "vllm" and cfg.vllm == VLLMOptions(
        tensor_parallel_size=2, data_parallel_size=4, gpu_memory_utilization=0.5
    )
    p.write_text("[vllm]\ntp = 2\n")
    with pytest.raises(ReasonMaxxerError, match=r"unknown key\(s\) \['tp'\]"):
        load_run_config(p)


def test_vllm_is_an_extra_not_a_dependency():
    py = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert py["optional-dependencies"]["vllm"] == ["vllm>=0.19.1"]  # the first vllm on transformers 5
    from reasonmaxxer.backends.vllm_runtime import MIN_VLLM

    assert py["optional-dependencies"]["vllm"] == ["vllm>=" + ".".join(map(str, MIN_VLLM))]
    assert not any(d.startswith("vllm") for d in py["dependencies"])


FAKE_VLLM_PACKAGE = """
import os, types

class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)

class LLM:
    def __init__(self, **kw):
        if kw["model"] == "boom":
            raise RuntimeError("CUDA out of memory")
        self.gpus = os.environ["CUDA_VISIBLE_DEVICES"]
        if kw.get("rendezvous"):  # wait until every replica has started loading
            import pathlib, time
            d = pathlib.Path(kw["rendezvous"])
            d.mkdir(exist_ok=True)
            (d / self.gpus).write_text("")
            t = time.time()
            while len(list(d.iterdir())) < kw["n_replicas"]:
                if time.time() - t > 60:
                    raise RuntimeError("the other replicas never started loading")
                time.sleep(0.05)

    def generate(self, prompts, sampling_params=None, use_tqdm=True, lora_request=None):
        outs = []
        for p in prompts:
            toks = [int(self.gpus.split(",")[0]) + 10, 2]
            lps = [{t: types.SimpleNamespace(logprob=-1.0, rank=1)} for t in toks]
            o = types.SimpleNamespace(token_ids=toks, logprobs=lps, finish_reason="stop", stop_reason=2)
            outs.append(types.SimpleNamespace(outputs=[o]))
        return outs
"""


def test_replica_processes(tmp_path, monkeypatch, ckpt, tiny_tokenizer):
    """The real spawned replicas (on a fake vllm package on disk): GPU pinning, the pipe protocol, errors."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(FAKE_VLLM_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))  # a spawned child starts with the parent's sys.path
    kw = {"model": str(ckpt)}
    engines = [vllm_backend.ProcessEngine(kw, ["3"]), vllm_backend.ProcessEngine(kw, ["5", "6"])]
    try:
        for e in engines:
            e.wait_ready()
        for e in engines:
            e.submit([[1, 2, 3]], [{"seed": 1}], None)
        assert [e.result()[0]["token_ids"] for e in engines] == [[13, 2], [15, 2]]  # each saw its own GPUs
    finally:
        for e in engines:
            e.close()
    assert all(e.proc.exitcode == 0 for e in engines)
    with pytest.raises(ReasonMaxxerError, match=r"replica on GPUs 0 failed: RuntimeError: CUDA out of memory"):
        vllm_backend.ProcessEngine({"model": "boom"}, ["0"]).wait_ready()


def test_replicas_load_side_by_side(fake_vllm, tmp_path, monkeypatch, ckpt):
    """Each spawned replica's engine waits (up to 60 s) until every replica has started loading:
    started one after another, the first would time out; started together, both load."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(FAKE_VLLM_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))  # the children import this vllm; the parent keeps the fake
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    s = VLLMSampler(str(ckpt), VLLMOptions(data_parallel_size=2))
    s.llm_kwargs = {**s.llm_kwargs, "rendezvous": str(tmp_path / "rv"), "n_replicas": 2}
    try:
        s.generate([Request(("p", 0), (1, 2, 3)), Request(("p", 1), (1, 2, 3))], SamplingConfig(n=1))
        s.suspend()  # "auto" outside `run`: nothing happens
        assert sorted(p.name for p in (tmp_path / "rv").iterdir()) == ["3", "5"]
    finally:
        s.close()


# -- memory: sizing, sleep, close --------------------------------------------------------------
@pytest.fixture
def gpu(monkeypatch):
    """torch.cuda on a fake 100 GB GPU; set `gpu.free` (bytes); `gpu.emptied` counts empty_cache calls."""
    import torch

    state = types.SimpleNamespace(free=99e9, total=100e9, emptied=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (state.free, state.total))

    def empty_cache():
        state.emptied += 1

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    return state


def test_gpu_memory_utilization_is_sized_from_free_memory(fake_vllm, ckpt, tiny_tokenizer, gpu):
    reqs, cfg = _requests(tiny_tokenizer, 1), SamplingConfig(n=1, max_new_tokens=3)
    VLLMSampler(str(ckpt)).generate(reqs, cfg)
    assert FakeLLM.instances[-1].kwargs["gpu_memory_utilization"] == 0.9  # an empty GPU: vLLM's default
    gpu.free = 62.5e9  # an HF model holds the rest
    VLLMSampler(str(ckpt)).generate(reqs, cfg)
    assert FakeLLM.instances[-1].kwargs["gpu_memory_utilization"] == 0.57  # 0.625 - 0.05, rounded down
    VLLMSampler(str(ckpt), VLLMOptions(gpu_memory_utilization=0.8)).generate(reqs, cfg)
    assert FakeLLM.instances[-1].kwargs["gpu_memory_utilization"] == 0.8  # set by the user: as is
    gpu.free = 5e9
    with pytest.raises(ReasonMaxxerError, match="only 5% of the GPU memory is free"):
        VLLMSampler(str(ckpt)).generate(reqs, cfg)


def test_sleep_between_stages_and_close_frees_memory(fake_vllm, ckpt, tiny_tokenizer, gpu):
    import gc
    import weakref

    reqs, cfg = _requests(tiny_tokenizer, 1), SamplingConfig(n=1, max_new_tokens=3)
    s = VLLMSampler(str(ckpt), VLLMOptions(between_stages="sleep"))
    s.suspend()  # no engine yet: nothing to put to sleep
    s.generate(reqs, cfg)
    (llm,) = FakeLLM.instances
    assert llm.kwargs["enable_sleep_mode"] is True
    s.suspend()
    s.suspend()  # already asleep: once
    emptied = gpu.emptied
    s.for_model(str(ckpt)).generate(reqs, cfg)  # a sampler of the same engine wakes it
    assert FakeLLM.log == ["start", "generate", "sleep:1", "wake", "generate"]
    assert gpu.emptied > emptied  # PyTorch's cache emptied before vLLM reallocates
    s.suspend()
    s.resume()
    assert FakeLLM.log[-2:] == ["sleep:1", "wake"]
    ref = weakref.ref(llm)
    del llm
    FakeLLM.instances.clear()  # the test's own reference
    emptied = gpu.emptied
    s.close()
    gc.collect()
    assert ref() is None and gpu.emptied > emptied
    assert fake_vllm.teardown == ["destroy_model_parallel", "destroy_distributed_environment"]
    s.close()  # twice: nothing more
    assert len(fake_vllm.teardown) == 2
    s.generate(reqs, cfg)  # a closed sampler starts a new engine on next use
    assert len(FakeLLM.instances) == 1 and FakeLLM.log[-2:] == ["start", "generate"]


def test_close_between_stages_restarts_the_engine(fake_vllm, ckpt, tiny_tokenizer):
    reqs, cfg = _requests(tiny_tokenizer, 1), SamplingConfig(n=1, max_new_tokens=3)
    s = VLLMSampler(str(ckpt), VLLMOptions(between_stages="close"))
    s.generate(reqs, cfg)
    s.suspend()
    assert "enable_sleep_mode" not in FakeLLM.instances[0].kwargs and len(fake_vllm.teardown) == 2
    s.resume()
    s.generate(reqs, cfg)
    assert FakeLLM.log == ["start", "generate", "start", "generate"]
    for keep in ("keep", "auto"):  # "auto" unresolved (sample / eval commands): keep
        k = VLLMSampler(str(ckpt), VLLMOptions(between_stages=keep))
        k.generate(reqs, cfg)
        k.suspend()
        k.generate(reqs, cfg)
        assert FakeLLM.log[-3:] == ["start", "generate", "generate"]


def test_plan_between_stages(monkeypatch):
    from reasonmaxxer.backends.vllm_runtime import plan_between_stages

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    gb = 10**9
    assert plan_between_stages("auto", 1, 1, "cpu", gb) == "keep"  # the HF model is not on a GPU
    assert plan_between_stages("auto", 1, 1, "cuda:1", gb, cpu_available=100 * gb) == "keep"  # not the engine's
    assert plan_between_stages("auto", 1, 1, "cuda:0", gb, cpu_available=100 * gb) == "sleep"
    assert plan_between_stages("auto", 1, 1, "cuda", gb, cpu_available=gb) == "close"  # weights do not fit in RAM
    assert plan_between_stages("auto", 2, 1, "cuda:1", 30 * gb, cpu_available=100 * gb) == "close"  # 2 copies
    assert plan_between_stages("keep", 1, 1, "cuda:0", gb) == "keep"  # an explicit choice is kept
    with pytest.raises(ReasonMaxxerError, match="between_stages: expected one of auto, sleep, close, keep"):
        VLLMOptions(between_stages="nap")


# -- versions ------------------------------------------------------------------------------------
def test_vllm_and_transformers_versions_are_checked(fake_vllm, ckpt, monkeypatch):
    from importlib import metadata

    import transformers

    fake_vllm.__version__ = "0.10.1"
    with pytest.raises(ReasonMaxxerError, match=r"vllm 0.10.1 needs transformers < 5.*pip install 'vllm>=0.19.1'") as e:
        VLLMSampler(str(ckpt))
    assert len(str(e.value).splitlines()) == 1
    fake_vllm.__version__ = "0.19.1.dev12+gabc"  # a build of 0.19.1: accepted
    declared = {"vllm": ["torch==2.9.0", "transformers >= 4.56.0, < 5", 'transformers<4; python_version < "3"']}

    def requires(name):
        if name not in declared:
            raise metadata.PackageNotFoundError(name)
        return declared[name]

    monkeypatch.setattr(metadata, "requires", requires)
    monkeypatch.setattr(transformers, "__version__", "5.5.1")
    with pytest.raises(ReasonMaxxerError, match=r"declares 'transformers >= 4.56.0, < 5' but transformers 5.5.1"):
        VLLMSampler(str(ckpt))
    declared["vllm"][1] = "transformers>=5.5.1"
    VLLMSampler(str(ckpt))  # the declared range admits the installed transformers
    monkeypatch.setattr(transformers, "__version__", "5.2.0")
    with pytest.raises(ReasonMaxxerError, match="transformers 5.2.0 is installed"):
        VLLMSampler(str(ckpt))


def test_close_keeps_a_process_group_the_caller_created(fake_vllm, ckpt, tiny_tokenizer, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # e.g. an accelerate launch, before the engine
    s = VLLMSampler(str(ckpt))
    s.generate(_requests(tiny_tokenizer, 1), SamplingConfig(n=1, max_new_tokens=3))
    s.close()
    assert fake_vllm.teardown == ["destroy_model_parallel"]  # not destroy_distributed_environment
