"""Tests for reasonmaxxer.prompts: built-in templates, chat rendering and its fallback, braces
in questions, file/literal templates, fingerprints and errors."""

import copy
import re

import pytest

from reasonmaxxer.data import arith, arith_words
from reasonmaxxer.data.prompts import (
    FEWSHOT_EXAMPLES,
    TEMPLATES,
    PromptTemplate,
    build_messages,
    get_template,
    render_prompt,
    template_fingerprint,
)
from reasonmaxxer.errors import ReasonMaxxerError

INSTR = "Please reason step by step, and put your final answer within \\boxed{}."
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BRACES = r"Simplify \frac{1}{2} + {x} + {0} + {} + {question}."


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)  # do not touch the shared session fixture
    tok.chat_template = CHATML
    return tok


def test_builtin_names_and_kinds():
    assert {n: t.kind for n, t in TEMPLATES.items()} == {
        "raw": "raw",
        "chat": "chat",
        "fewshot": "fewshot",
        "mistral": "raw",
        "paper": "raw",
        "verbose": "fewshot",
    }
    assert all(t.name == n for n, t in TEMPLATES.items())


def test_raw_and_mistral_render_exactly(tiny_tokenizer):
    assert render_prompt(TEMPLATES["raw"], "What is 2 + 2?", tiny_tokenizer) == (
        "Solve the following math problem step by step. Put your final answer in \\boxed{}. "
        "Problem: What is 2 + 2? Solution:"
    )
    assert render_prompt(TEMPLATES["mistral"], "What is 2 + 2?") == (
        "Question: What is 2 + 2? Answer: Let's think step by step."
    )


def test_paper_template_is_the_official_qwen_boxed_prompt():
    # the official reasonmaxxer/eval_lib.py build_prompt(prompt_style="qwen_boxed"), verbatim,
    # and its "legacy" stops (reasonmaxxer/config.py STOP_SEQUENCES, newline variants covered)
    assert render_prompt(TEMPLATES["paper"], "What is $\\frac{1}{2}$?") == (
        "Solve the following math problem step by step. Put your final answer in \\boxed{}.\n\n"
        "Problem: What is $\\frac{1}{2}$?\n\nSolution:"
    )
    assert TEMPLATES["paper"].stop == ("Human:", "Assistant:")


def test_chat_without_chat_template_falls_back_to_transcript(tiny_tokenizer):
    assert not tiny_tokenizer.chat_template
    text = render_prompt(TEMPLATES["chat"], "What is 2 + 2?", tiny_tokenizer)
    assert text == f"User: What is 2 + 2?\n{INSTR}\nAssistant:"
    assert render_prompt(TEMPLATES["chat"], "What is 2 + 2?") == text  # no tokenizer: same fallback


def test_fewshot_fallback_transcript(tiny_tokenizer):
    text = render_prompt(TEMPLATES["fewshot"], "What is 2 + 2?", tiny_tokenizer)
    assert text.count("User: ") == 4 and text.count("Assistant:") == 4
    assert text.endswith(f"User: What is 2 + 2?\n{INSTR}\nAssistant:")
    for q, a in FEWSHOT_EXAMPLES:
        assert f"User: {q}\n{INSTR}\nAssistant: {a}\n" in text
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text  # renders to text the tokenizer round-trips


def test_verbose_works_the_fewshot_problems_at_length(tiny_tokenizer):
    verbose = TEMPLATES["verbose"]
    assert verbose.stop == () and [q for q, _ in verbose.fewshot] == [q for q, _ in FEWSHOT_EXAMPLES]
    for (_, long), (_, short) in zip(verbose.fewshot, FEWSHOT_EXAMPLES, strict=True):
        assert long.endswith(short.rsplit(" ", 2)[-1]) and "Let's check:" in long  # same boxed answer
        assert len(long.split()) > 3 * len(short.split())
    text = render_prompt(verbose, "What is 2 + 2?", tiny_tokenizer)
    assert text.count("Let's work through this step by step.") == 3 and text.endswith(f"{INSTR}\nAssistant:")


def test_chat_with_chat_template(chat_tokenizer):
    text = render_prompt(TEMPLATES["chat"], "What is 2 + 2?", chat_tokenizer)
    assert text == f"<|im_start|>user\nWhat is 2 + 2?\n{INSTR}<|im_end|>\n<|im_start|>assistant\n"


def test_fewshot_with_chat_template(chat_tokenizer):
    text = render_prompt(TEMPLATES["fewshot"], "What is 2 + 2?", chat_tokenizer)
    assert text.count("<|im_start|>user") == 4 and text.count("<|im_start|>assistant") == 4
    assert text.endswith(f"<|im_start|>user\nWhat is 2 + 2?\n{INSTR}<|im_end|>\n<|im_start|>assistant\n")
    q0, a0 = FEWSHOT_EXAMPLES[0]
    assert text.startswith(f"<|im_start|>user\n{q0}\n{INSTR}<|im_end|>\n<|im_start|>assistant\n{a0}<|im_end|>\n")


def test_system_message(chat_tokenizer):
    t = PromptTemplate("sys", "chat", "{question}", system="Be brief.")
    assert build_messages(t, "Q") == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}]
    assert render_prompt(t, "Q", chat_tokenizer).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert render_prompt(t, "Q") == "System: Be brief.\nUser: Q\nAssistant:"
    assert render_prompt(PromptTemplate("r", "raw", "Q: {question}", system="Pre."), "x") == "Pre.\n\nQ: x"


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_braces_in_questions(name, tiny_tokenizer, chat_tokenizer):
    for tok in (tiny_tokenizer, chat_tokenizer):
        text = render_prompt(TEMPLATES[name], BRACES, tok)
        assert BRACES in text
        assert text.count(BRACES) == 1


def test_fewshot_examples_are_short_and_correct():
    assert len(FEWSHOT_EXAMPLES) == 3
    for _q, a in FEWSHOT_EXAMPLES:
        m = re.fullmatch(r"(.*) The answer is \\boxed\{(\d+)\}\.", a)
        assert m, a
        assert len(re.findall(r"[.!?](\s|$)", a)) <= 2  # one or two sentences
        work = m.group(1)
        for lhs, rhs in re.findall(r"([\d\s+\-*]+?)\s*=\s*(\d+)", work):  # every step is right
            assert eval(lhs, {"__builtins__": {}}) == int(rhs)
        assert work.rstrip(".").endswith(m.group(2)) or f"= {m.group(2)}" in work


def test_fewshot_examples_never_collide_with_arith():
    names = {n for n, _, _ in arith_words.NAMES}
    assert not {"Mia", "Sam"} & names
    example_questions = {q for q, _ in FEWSHOT_EXAMPLES}
    generated = {p.question for s in arith.SPLITS for p in arith.generate(s, 300, seed=0)}
    assert not example_questions & generated


def test_literal_template():
    t = get_template("Q: {question}\nA:")
    assert (t.kind, t.name) == ("custom", "custom")
    assert render_prompt(t, BRACES) == f"Q: {BRACES}\nA:"


def test_file_template(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("Problem:\n{question}\nSolution:\n")
    t = get_template(str(f))
    assert (t.kind, t.name, t.template) == ("custom", "file:mine.txt", "Problem:\n{question}\nSolution:")
    assert render_prompt(t, "1+1?") == "Problem:\n1+1?\nSolution:"


def test_file_without_placeholder(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("no placeholder here\n")
    with pytest.raises(ReasonMaxxerError) as e:
        get_template(str(f))
    assert str(e.value) == f"{f}:1: prompt template file has no {{question}} placeholder"


@pytest.mark.parametrize(
    "spec,match",
    [
        ("nonsense", r"^nonsense: unknown prompt template; use one of raw, chat, fewshot, verbose, mistral, paper"),
        ("missing.txt", r"^missing\.txt: no such prompt template file"),
        ("dir/missing", r"^dir/missing: no such prompt template file"),
        ("Question: {problem}", r"unknown prompt template"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ReasonMaxxerError, match=match):
        get_template(spec)


def test_template_validation():
    with pytest.raises(ReasonMaxxerError, match=r"has no \{question\} placeholder"):
        PromptTemplate("x", "raw", "no placeholder")
    with pytest.raises(ReasonMaxxerError, match=r"unknown kind 'jinja'"):
        PromptTemplate("x", "jinja", "{question}")
    with pytest.raises(ReasonMaxxerError, match=r"few-shot examples need kind"):
        PromptTemplate("x", "raw", "{question}", fewshot=(("q", "a"),))
    assert get_template(TEMPLATES["raw"]) is TEMPLATES["raw"]
    assert get_template("raw") is TEMPLATES["raw"]


def test_broken_chat_template_is_a_user_error(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% if %}"
    with pytest.raises(ReasonMaxxerError, match=r"chat template failed"):
        render_prompt(TEMPLATES["chat"], "Q", tok)


def test_fingerprint():
    fps = {n: template_fingerprint(t) for n, t in TEMPLATES.items()}
    assert len(set(fps.values())) == len(fps)
    assert all(re.fullmatch(r"[0-9a-f]{64}", f) for f in fps.values())
    raw = TEMPLATES["raw"]
    same = PromptTemplate("renamed", raw.kind, raw.template)
    assert template_fingerprint(same) == fps["raw"]  # the name does not shape the prompt
    assert template_fingerprint(PromptTemplate("raw", "raw", raw.template + " ")) != fps["raw"]
    assert template_fingerprint(PromptTemplate("c", "chat", TEMPLATES["chat"].template, system="s")) != fps["chat"]


def test_template_stops():
    """Completion prompts stop where a new problem or a dialogue turn would start; chat kinds
    (the demo's `fewshot` included: its completions and figures must not change) stop at nothing."""
    from dataclasses import replace

    from reasonmaxxer.config import load_run_config
    from reasonmaxxer.data.prompts import RAW_STOP

    assert TEMPLATES["raw"].stop == RAW_STOP == ("Problem:", "Human:", "Assistant:")
    assert TEMPLATES["mistral"].stop == ("Question:", "Human:", "Assistant:")
    assert TEMPLATES["chat"].stop == TEMPLATES["fewshot"].stop == get_template("Q: {question} A:").stop == ()
    demo = load_run_config(None)  # the defaults are the demo's (tests/test_config.py)
    assert get_template(demo.template).stop == () and demo.sampling.stop == demo.eval.stop == ()
    # the stop strings are not part of the prompt's fingerprint (stores keep their hashes; the
    # resolved stop is in the sampling config's hash instead): these are the values before stops existed
    for name, t in TEMPLATES.items():
        assert template_fingerprint(replace(t, stop=("x",))) == template_fingerprint(t), name
    assert template_fingerprint(TEMPLATES["fewshot"]).startswith("9f9e2da9328e114f")
    assert template_fingerprint(TEMPLATES["raw"]).startswith("ce44f787cfa144f9")


def test_resolve_stop():
    from reasonmaxxer.stages.sample import resolve_stop

    raw = TEMPLATES["raw"]
    assert resolve_stop((), raw) == raw.stop  # default: the template's
    assert resolve_stop(("###",), raw) == ("###",)  # given: replaces them
    assert resolve_stop(("",), raw) == ()  # --stop '': none
    assert resolve_stop((), TEMPLATES["fewshot"]) == ()
