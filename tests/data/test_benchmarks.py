"""Tests for reasonmaxxer.data: every shared benchmark file, gold normalisation, the generic
file loader, malformed-input errors (``path:line: reason``), the Hub path and spec dispatch."""

import json
import os
import sys
import types
from pathlib import Path

import pytest

from reasonmaxxer.data.benchmarks import BENCHMARKS, default_data_dir, load_benchmark, load_problems
from reasonmaxxer.data.problems import Problem, load_problem_file, normalise_answer, problems_hash
from reasonmaxxer.errors import ReasonMaxxerError

# ../shared/data beside the checkout (or $REASONMAXXER_DATA_DIR); tests that need it skip without it
DATA = Path(os.environ.get("REASONMAXXER_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared benchmark data not present")

COUNTS = [
    ("gsm8k", "train", 7473),
    ("gsm8k", "test", 1319),
    ("math500", "test", 500),
    ("aime24", "test", 30),
    ("aime25", "test", 30),
    ("amc23", "test", 40),
    ("olympiadbench", "test", 675),
    ("minerva", "test", 272),
]


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv("REASONMAXXER_DATA_DIR", raising=False)


@pytest.fixture(scope="module")
def loaded():
    """Every shared benchmark split, loaded once: {(name, split): [Problem]}."""
    return {(n, s): load_benchmark(n, s, data_dir=DATA) for n, s, _ in COUNTS}


# ----------------------------------------------------------------------------- shared data


@needs_data
@pytest.mark.parametrize("name,split,count", COUNTS)
def test_every_shared_file_loads(loaded, name, split, count):
    problems = loaded[(name, split)]
    assert len(problems) == count
    assert all(p.question.strip() and p.answer.strip() for p in problems)
    assert all(p.question == p.question.strip() and p.answer == p.answer.strip() for p in problems)
    assert len({p.id for p in problems}) == count
    assert problems[0].id == f"{name}/{split}/0" and problems[-1].id == f"{name}/{split}/{count - 1}"
    assert all(p.metadata["source"] == name for p in problems)
    json.dumps([p.to_dict() for p in problems])  # metadata is JSON-serialisable


def test_benchmarks_tuple():
    assert BENCHMARKS == ("gsm8k", "math500", "aime24", "aime25", "amc23", "olympiadbench", "minerva")


@needs_data
def test_gsm8k_golds_drop_commas(loaded):
    train, test = loaded[("gsm8k", "train")], loaded[("gsm8k", "test")]
    assert train[0].answer == "72"
    assert train[345].answer == "1080"  # "#### 1,080"
    assert test[146].answer == "2125"  # "#### 2,125"
    assert test[0].answer == "18"
    assert test[0].question.startswith("Janet’s ducks lay 16 eggs per day.")
    assert all(p.answer.lstrip("-").isdigit() for p in train + test)
    assert train[5715].answer == "-7"  # GSM8K has a few negative answers


@needs_data
def test_aime_amc_numeric_golds(loaded):
    aime24 = loaded[("aime24", "test")]
    assert aime24[0].answer == "204"
    assert aime24[7].answer == "25"  # published as "025"
    assert aime24[15].answer == "73"  # "073"
    assert aime24[0].metadata["source_id"] == "60"
    assert all(p.answer.isdigit() and 0 <= int(p.answer) <= 999 for p in aime24)
    assert not any(p.answer.startswith("0") and p.answer != "0" for p in aime24)
    assert loaded[("aime25", "test")][0].answer == "70"
    amc = loaded[("amc23", "test")]
    assert amc[0].answer == "27"  # 27.0
    assert amc[3].answer == "3159"  # 3159.0
    assert amc[15].answer == "-1"  # -1.0
    assert not any("." in p.answer for p in amc)


@needs_data
def test_math500_fields(loaded):
    p = loaded[("math500", "test")][0]
    assert p.question.startswith("Convert the point $(0,3)$ in rectangular coordinates")
    assert p.answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert p.metadata == {
        "source": "math500",
        "subject": "Precalculus",
        "unique_id": "test/precalculus/807.json",
        "level": 2,
    }


@needs_data
def test_minerva_last_boxed_with_nested_braces(loaded):
    mv = loaded[("minerva", "test")]
    assert mv[0].answer == "1.6"
    assert mv[12].answer == (
        r"\frac{2 \pi c^{2} R^{2}}{\lambda^{5}\left[e^{h c /(\lambda k T)}-1"
        r"\right] d^{2}}"
    )
    assert mv[28].answer == r"\left[P_{0}^{2 / 5}-\frac{2}{5} g K^{-3 / 5} z\right]^{5 / 2}"
    assert mv[30].answer == r"\sqrt{4 \pi G \rho_{0} r_{0}^{2}}"
    assert all(p.answer.count("{") == p.answer.count("}") for p in mv)


@needs_data
def test_olympiadbench_answers(loaded):
    ob = {p.metadata["source_id"]: p for p in loaded[("olympiadbench", "test")]}
    assert ob["1606"].answer == "2"  # ['2']
    assert ob["1664"].answer == "69, 84"  # ['$69$,$84$']
    assert ob["2254"].answer == r"\frac{32}{9}, \frac{1}{2}"
    assert ob["2338"].answer == "-1, 2, -2"  # ['$-1$,$2$,$-2$']
    assert ob["1618"].answer == "(1,8,19), (2,7,13), (4,5,7)"  # one $..$ holding a list
    assert ob["2349"].answer == "221, 8"  # unbalanced '$221,$8$'
    assert ob["1760"].metadata["unit"] == "^{\\circ}"
    assert not any("$" in p.answer for p in ob.values())
    assert ob["1606"].question.startswith("Xenia and Sergey play the following game.")


# ----------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "raw,gold",
    [
        ("025", "25"),
        ("0", "0"),
        ("+7", "7"),
        ("-3", "-3"),
        (27.0, "27"),
        (-1.0, "-1"),
        (2.5, "2.5"),
        ("27.0", "27"),
        (12, "12"),
        ([1, "$x$"], "1, $x$"),
        ("  \\frac{1}{2} ", "\\frac{1}{2}"),
        ("1,080", "1,080"),  # commas are only dropped for GSM8K "#### N" golds
    ],
)
def test_normalise_answer(raw, gold):
    assert normalise_answer(raw) == gold


# ----------------------------------------------------------------------------- generic files


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_with_field_mapping(tmp_path):
    f = _write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"q": "What is 1+1?", "a": 2, "uid": "x1"},
            "",  # blank lines are skipped
            {"q": "Pad?", "a": "007", "uid": "x2"},
            {"q": "Gsm?", "a": "so 1,000 + 80\n#### 1,080", "uid": "x3"},
        ],
    )
    probs = load_problem_file(f, question_field="q", answer_field="a", id_field="uid")
    assert [(p.id, p.question, p.answer) for p in probs] == [
        ("x1", "What is 1+1?", "2"),
        ("x2", "Pad?", "7"),
        ("x3", "Gsm?", "1080"),
    ]
    no_ids = load_problem_file(f, question_field="q", answer_field="a", limit=2)
    assert [p.id for p in no_ids] == ["mine/0", "mine/1"]
    assert load_problem_file(f.rename(tmp_path / "mine.json"), "q", "a")[0].answer == "2"


def test_parquet_with_field_mapping(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"problem": ["A?", "B?"], "solution": [3.0, 2.5]}), path)
    probs = load_problem_file(path, question_field="problem", answer_field="solution")
    assert [(p.id, p.question, p.answer) for p in probs] == [("p/0", "A?", "3"), ("p/1", "B?", "2.5")]


def _err(tmp_path, lines, **kw) -> str:
    f = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ReasonMaxxerError) as e:
        load_problem_file(f, **kw)
    return str(e.value)


def test_bad_json_line(tmp_path):
    msg = _err(tmp_path, [{"question": "a", "answer": "1"}, '{"question": "b", '])
    assert msg.startswith(f"{tmp_path / 'bad.jsonl'}:2: invalid JSON")


def test_line_not_an_object(tmp_path):
    msg = _err(tmp_path, [{"question": "a", "answer": "1"}, "", "[1, 2]"])
    assert msg.startswith(f"{tmp_path / 'bad.jsonl'}:3: expected a JSON object, got list")


def test_problem_file_not_utf8_is_one_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"question": "caf\xe9", "answer": "1"}\n')  # latin-1, not UTF-8
    with pytest.raises(ReasonMaxxerError) as e:
        load_problem_file(f)
    assert str(e.value) == f"{f}: not UTF-8 text (byte 0xe9 at byte offset 17, line 1)"


def test_parquet_problem_file_not_utf8_names_row_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"ok", b"bad\xff"], type=pa.binary())
    questions = pa.Array.from_buffers(pa.string(), 2, raw.buffers())  # unvalidated: invalid UTF-8
    f = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question": questions, "answer": ["1", "2"]}), f)
    with pytest.raises(ReasonMaxxerError) as e:
        load_problem_file(f)
    assert str(e.value) == f"{f}:row 1: field 'question' is not UTF-8 text (byte 0xff at offset 3 of the value)"


def test_missing_question_field_lists_available(tmp_path):
    msg = _err(tmp_path, [{"problem": "a", "answer": "1"}])
    assert msg == f"{tmp_path / 'bad.jsonl'}:1: missing field 'question' (available: answer, problem)"


def test_missing_answer_field_with_mapping(tmp_path):
    msg = _err(tmp_path, [{"q": "a", "a": 1}, {"q": "b", "gold": 2}], question_field="q", answer_field="a")
    assert msg == f"{tmp_path / 'bad.jsonl'}:2: missing field 'a' (available: gold, q)"


def test_null_answer(tmp_path):
    msg = _err(tmp_path, [{"question": "a", "answer": None}])
    assert msg.startswith(f"{tmp_path / 'bad.jsonl'}:1: null field 'answer'")


def test_empty_file(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    with pytest.raises(ReasonMaxxerError, match=r"empty\.jsonl:1: empty file"):
        load_problem_file(f)


@pytest.mark.parametrize("question", ["", "   \n "])
def test_empty_question(tmp_path, question):
    msg = _err(tmp_path, [{"question": "ok", "answer": "1"}, {"question": question, "answer": "1"}])
    assert msg.startswith(f"{tmp_path / 'bad.jsonl'}:2: empty question")


def test_empty_answer(tmp_path):
    msg = _err(tmp_path, [{"question": "ok", "answer": " "}])
    assert msg.startswith(f"{tmp_path / 'bad.jsonl'}:1: empty answer")


def test_duplicate_id(tmp_path):
    msg = _err(
        tmp_path, [{"question": "a", "answer": "1", "k": 1}, {"question": "b", "answer": "2", "k": 1}], id_field="k"
    )
    assert msg == f"{tmp_path / 'bad.jsonl'}:2: duplicate id '1' (first at {tmp_path / 'bad.jsonl'}:1)"


def test_missing_file(tmp_path):
    with pytest.raises(ReasonMaxxerError, match=r"nope\.jsonl: no such file"):
        load_problem_file(tmp_path / "nope.jsonl")


def test_parquet_errors_use_row_index(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["A?", " "], "answer": ["1", "2"]}), path)
    with pytest.raises(ReasonMaxxerError) as e:
        load_problem_file(path)
    assert str(e.value).startswith(f"{path}:row 1: empty question")
    with pytest.raises(ReasonMaxxerError) as e:
        load_problem_file(path, answer_field="gold")
    assert str(e.value) == f"{path}:row 0: missing field 'gold' (available: answer, question)"
    empty = tmp_path / "e.parquet"
    pq.write_table(pa.table({"question": pa.array([], pa.string())}), empty)
    with pytest.raises(ReasonMaxxerError, match=r"e\.parquet:row 0: empty file"):
        load_problem_file(empty)


# ----------------------------------------------------------------------------- benchmark errors


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(ReasonMaxxerError, match=r"unknown benchmark 'math5000'; valid names: gsm8k, math500,"):
        load_benchmark("math5000", data_dir=DATA)


def test_bad_split():
    with pytest.raises(ReasonMaxxerError, match=r"benchmark 'aime24' has no split 'train'; available: test"):
        load_benchmark("aime24", "train", data_dir=DATA)


def test_missing_local_file_names_path_and_flag(tmp_path):
    with pytest.raises(ReasonMaxxerError) as e:
        load_benchmark("math500", data_dir=tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'math500' / 'test.jsonl'}: no such file")
    assert "--data-dir" in msg and "REASONMAXXER_DATA_DIR" in msg


def test_malformed_benchmark_rows(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "q", "answer": "no final line"}])
    with pytest.raises(ReasonMaxxerError) as e:
        load_benchmark("gsm8k", data_dir=tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'gsm8k' / 'test.jsonl'}:1: GSM8K answer has no '#### N'")
    (tmp_path / "minerva_math").mkdir()
    _write_jsonl(
        tmp_path / "minerva_math" / "test.jsonl",
        [{"problem": "p", "solution": r"\boxed{1}"}, {"problem": "p", "solution": "none"}],
    )
    with pytest.raises(ReasonMaxxerError) as e:
        load_benchmark("minerva", data_dir=tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'minerva_math' / 'test.jsonl'}:2: no \\boxed")


@needs_data
def test_env_data_dir_and_limit(monkeypatch):
    assert default_data_dir() is None
    monkeypatch.setenv("REASONMAXXER_DATA_DIR", str(DATA))
    assert default_data_dir() == DATA
    probs = load_benchmark("aime25", limit=3)
    assert [p.id for p in probs] == ["aime25/test/0", "aime25/test/1", "aime25/test/2"]
    assert load_benchmark("minerva_math", limit=1)[0].id == "minerva/test/0"  # folder-name alias


def test_hub_without_datasets_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ReasonMaxxerError, match=r"pip install datasets"):
        load_benchmark("gsm8k")


def test_hub_rows_use_the_same_normalisation(monkeypatch):
    calls = []
    rows = {
        "openai/gsm8k": [{"question": "Q1", "answer": "work\n#### 1,080"}],
        "AI-MO/aimo-validation-amc": [
            {"id": 0, "problem": "old", "answer": 5.0, "url": "https://x/2022_AMC_12A_Problems/Problem_1"},
            {"id": 1, "problem": "new", "answer": 27.0, "url": "https://x/2023_AMC_12A_Problems/Problem_1"},
        ],
        "math-ai/minervamath": [{"question": "M", "answer": " 4.5e33 "}],
        "Hothan/OlympiadBench": [{"id": 7, "question": "O", "context": "Ctx", "final_answer": ["$1$,$2$"]}],
        "HuggingFaceH4/aime_2024": [{"id": 60, "problem": "A", "answer": "025"}],
    }

    def load_dataset(path, config=None, split=None):
        calls.append((path, config, split))
        return rows[path]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_benchmark("gsm8k", "train")[0].answer == "1080"
    amc = load_benchmark("amc23")
    assert [(p.id, p.question, p.answer) for p in amc] == [("amc23/test/0", "new", "27")]
    assert load_benchmark("minerva")[0].answer == "4.5e33"
    ob = load_benchmark("olympiadbench")[0]
    assert (ob.question, ob.answer) == ("Ctx\nO", "1, 2")
    assert load_benchmark("aime24")[0].answer == "25"
    assert calls == [
        ("openai/gsm8k", "main", "train"),
        ("AI-MO/aimo-validation-amc", None, "train"),
        ("math-ai/minervamath", None, "test"),
        ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"),
        ("HuggingFaceH4/aime_2024", None, "train"),
    ]


def test_hub_failure_is_one_line(monkeypatch):
    def load_dataset(*a, **k):
        raise ConnectionError("no network\nlong traceback text")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(ReasonMaxxerError) as e:
        load_benchmark("math500")
    assert "\n" not in str(e.value) and "HuggingFaceH4/MATH-500" in str(e.value)


# ----------------------------------------------------------------------------- specs, hashing


@needs_data
def test_load_problems_dispatch(tmp_path):
    assert [p.id for p in load_problems("gsm8k:train", data_dir=DATA, limit=2)] == ["gsm8k/train/0", "gsm8k/train/1"]
    assert len(load_problems("amc23", data_dir=DATA)) == 40
    arith = load_problems("arith:validation:12:add1,word1", seed=3)
    assert len(arith) == 12 and {p.metadata["tier"] for p in arith} == {"add1", "word1"}
    assert arith == load_problems("arith:validation:12:add1,word1", seed=3)
    assert arith != load_problems("arith:validation:12:add1,word1", seed=4)
    assert len(load_problems("arith:train:5")) == 5
    f = _write_jsonl(tmp_path / "f.jsonl", [{"prompt": "P", "gold": 1}])
    assert load_problems(str(f), question_field="prompt", answer_field="gold")[0].answer == "1"


@pytest.mark.parametrize(
    "spec,match",
    [
        ("nonsense", r"nonsense: not a benchmark \(gsm8k, .*\), not arith"),
        ("arith:train", r"bad arith spec"),
        ("arith:train:ten", r"bad arith spec"),
        ("arith:train:3:add9", r"unknown arith tier 'add9'"),
        ("arith:dev:3", r"unknown arith split 'dev'"),
    ],
)
def test_load_problems_bad_specs(spec, match):
    with pytest.raises(ReasonMaxxerError, match=match):
        load_problems(spec)


def test_problems_hash_and_problem_dataclass():
    a = [Problem("x/0", "Q0", "1", {"k": [1]}), Problem("x/1", "Q1", "2")]
    h = problems_hash(a)
    assert len(h) == 64 and h == problems_hash(list(a))
    assert h == problems_hash([Problem("x/0", "Q0", "1"), Problem("x/1", "Q1", "2")])  # metadata ignored
    assert h != problems_hash(a[::-1])
    assert h != problems_hash([a[0], Problem("x/1", "Q1", "3")])
    assert h != problems_hash([Problem("x/0", "Q0", "1"), Problem("x/1", "Q1", "2"), Problem("x/2", "", "")])
    assert len({a[0], a[0], a[1]}) == 2  # hashable despite the metadata dict
    assert Problem.from_dict(json.loads(json.dumps(a[0].to_dict()))) == a[0]
    with pytest.raises(AttributeError):
        a[0].answer = "5"


# ----------------------------------------------------------------- SimpleRL pool, level picks
def _simplerl_dir(tmp_path, per_level=5):
    d = tmp_path / "simplerl"
    d.mkdir()
    rows = [
        {"question": f"L{lv} q{i}", "gt_answer": str(10 * lv + i), "level": lv}
        for lv in (1, 3, 4, 5)
        for i in range(per_level)
    ]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_level_filter_and_per_level_sample_keep_row_ids(tmp_path):
    root = _simplerl_dir(tmp_path)
    every = load_problems("simplerl:train", data_dir=root)
    assert len(every) == 20 and every[5].id == "simplerl/train/5" and every[5].answer == "30"
    assert every[5].metadata == {"source": "simplerl", "level": 3}
    lv = load_problems("simplerl:train:levels=3-5", data_dir=root)
    assert [p.metadata["level"] for p in lv] == [3] * 5 + [4] * 5 + [5] * 5
    assert [p.id for p in lv] == [f"simplerl/train/{i}" for i in range(5, 20)]  # row ids, not positions
    pick = load_problems("simplerl:train:levels=3,4,5:per_level=2:seed=42", data_dir=root)
    assert [p.metadata["level"] for p in pick] == [3, 3, 4, 4, 5, 5]
    assert pick == load_problems("simplerl:train:levels=3,4,5:per_level=2", data_dir=root)  # seed 42 default
    assert pick != load_problems("simplerl:train:levels=3,4,5:per_level=2:seed=1", data_dir=root)
    n = load_problems("simplerl:train:levels=3-5:n=4:seed=7", data_dir=root)
    assert len(n) == 4 and [p.id for p in n] == sorted((p.id for p in n), key=lambda s: int(s.rsplit("/", 1)[1]))


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("simplerl:train:level=3", r"bad option 'level=3'"),
        ("simplerl:train:levels=a", r"levels='a' is not a list"),
        ("simplerl:train:per_level=2", r"per_level needs levels"),
        ("simplerl:train:levels=3:per_level=9", r"level 3 has 5 problems, fewer than 9"),
        ("simplerl:train:n=x", r"n='x' is not a non-negative integer"),
    ],
)
def test_bad_pick_options_are_one_line(tmp_path, spec, msg):
    with pytest.raises(ReasonMaxxerError, match=msg):
        load_problems(spec, data_dir=_simplerl_dir(tmp_path))


def test_simplerl_from_the_hub_names_the_parquet_file(monkeypatch):
    calls = []

    def load_dataset(path, config=None, split=None, data_files=None):
        calls.append((path, config, split, data_files))
        return [{"question": "Q", "gt_answer": "2", "level": 4}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_problems("simplerl:train:levels=4")[0].answer == "2"
    assert calls == [("hkust-nlp/SimpleRL-Zoo-Data", None, "train", {"train": "simplelr_abel_level3to5/train.parquet"})]
