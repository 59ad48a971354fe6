"""Token-level analysis (method.md section 2): hand-computed values and known-answer model pairs.

The known-answer "tuned" model is the base wrapped by `EditedLogits`, which returns the base
logits except at chosen absolute sequence positions, where it swaps the base argmax with the
base's rank-r token: r <= 5 makes that position "reranked" (tuned rank r), r > 5 "shifted".
"""

import copy
import json
import math

import pytest
import torch
from conftest import EditedLogits, make_tiny_model

from reasonmaxxer.analysis.tokens import (
    PROMPT_TAIL,
    TOP_N,
    analyze,
    check_same_tokenizer,
    compare_distributions,
    run_analyze,
    summarize,
)
from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.stages.batch_loss import shared_prefix_logits

LN2 = math.log(2)


# -- compare_distributions on hand-computed V=4 rows ----------------------------------------
def test_compare_distributions_hand_values():
    l = torch.log(torch.tensor([4.0, 2.0, 1.0, 1.0]))  # p = [.5, .25, .125, .125]
    swapped = torch.log(torch.tensor([2.0, 4.0, 1.0, 1.0]))  # q = [.25, .5, .125, .125]
    base = torch.stack([l, l, l])
    tuned = torch.stack([swapped, l, torch.log(torch.tensor([1.0, 2.0, 4.0, 1.0]))])
    d = compare_distributions(base, tuned, k=5)
    # H(p) = .5 ln2 + .25 ln4 + 2 * .125 ln8 = 1.75 ln2
    assert torch.allclose(d["base_entropy"], torch.full((3,), 1.75 * LN2), atol=1e-6)
    assert d["base_argmax"].tolist() == [0, 0, 0]
    assert d["tuned_argmax"].tolist() == [1, 0, 2]
    assert d["tuned_rank_in_base"].tolist() == [2, 1, 3]
    assert d["cls"].tolist() == [1, 0, 1]
    # row 0: KL(p||q) = .5 ln(.5/.25) + .25 ln(.25/.5) = .25 ln2; symmetric here
    assert d["kl_base_tuned"][0].item() == pytest.approx(0.25 * LN2, abs=1e-6)
    assert d["kl_tuned_base"][0].item() == pytest.approx(0.25 * LN2, abs=1e-6)
    # m = [.375, .375, .125, .125]: JS = .5 [.5 ln(.5/.375) + .25 ln(.25/.375)] * 2
    assert d["js"][0].item() == pytest.approx(0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3), abs=1e-6)
    # identical row: exactly zero
    assert d["kl_base_tuned"][1].item() == 0 and d["kl_tuned_base"][1].item() == 0 and d["js"][1].item() == 0
    # row 2 (q = [1,2,4,1]/8 -> tuned argmax = base rank 3): shifted when k = 2, reranked at k = 3
    assert compare_distributions(base, tuned, k=2)["cls"].tolist() == [1, 0, 2]
    assert compare_distributions(base, tuned, k=1)["cls"].tolist() == [2, 0, 2]


def test_compare_distributions_ties_and_bounds():
    base = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # tie: base argmax is index 0 (first)
    tuned = torch.tensor([[0.0, 2.0, 0.0, 0.0]])
    d = compare_distributions(base, tuned)
    assert d["tuned_rank_in_base"].item() == 2 and d["cls"].item() == 1
    # disjoint-ish distributions: JS approaches ln 2 from below
    d = compare_distributions(torch.tensor([[50.0, 0, 0, 0]]), torch.tensor([[0, 50.0, 0, 0]]))
    assert 0.69 < d["js"].item() <= LN2 + 1e-6
    with pytest.raises(ReasonMaxxerError):
        compare_distributions(torch.zeros(2, 4), torch.zeros(2, 5))


def test_summarize_by_hand():
    per = {
        "cls": torch.tensor([0, 0, 1, 1, 2, 0]),
        "base_entropy": torch.tensor([0.5, 1.0, 3.0, 6.0, 2.0, 1.5]),
        "tuned_rank_in_base": torch.tensor([1, 1, 2, 3, 8, 1]),
        "js": torch.tensor([0.0, 0.0, 0.2, 0.05, 0.3, 0.0]),
        "kl_base_tuned": torch.zeros(6),
        "kl_tuned_base": torch.zeros(6),
    }
    frac = torch.tensor([0.0, 0.5, 0.55, 0.99, 0.05, 0.3])
    s = summarize(per, frac, js_threshold=0.1, k=5)
    assert (s["n_unshifted"], s["n_reranked"], s["n_shifted"]) == (3, 2, 1)
    assert s["reranked_pct"] == pytest.approx(100 * 2 / 6)
    assert s["shifted_pct"] == pytest.approx(100 / 6)
    assert s["rank_hist"] == {"1": 3, "2": 1, "3": 1, "4": 0, "5": 0, ">5": 1}
    assert s["mean_tuned_rank_changed"] == pytest.approx(13 / 3)
    # reranked mean (3 + 6) / 2 = 4.5; unshifted mean (0.5 + 1 + 1.5) / 3 = 1.0; ratio 4.5
    assert s["entropy_reranked"] == pytest.approx(4.5)
    assert s["entropy_unshifted"] == pytest.approx(1.0)
    assert s["entropy_ratio"] == pytest.approx(4.5)
    # positives {3, 6} above every negative {0.5, 1, 2, 1.5}
    assert s["auroc_entropy_reranked"] == 1.0
    assert s["js_frac_above"] == pytest.approx(2 / 6)
    assert s["js_quantiles"]["max"] == pytest.approx(0.3)
    # changes at fractions .55, .99, .05 -> bins 5, 9, 0
    assert s["change_position_hist"] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert sum(s["position_hist"]) == 6
    empty = summarize({k: torch.zeros(0) for k in per}, torch.zeros(0))
    assert empty["n_positions"] == 0 and math.isnan(empty["reranked_pct"])


# -- tokenizer check -----------------------------------------------------------------------
def _word_tokenizer(words):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_check_same_tokenizer(tiny_tokenizer):
    check_same_tokenizer(tiny_tokenizer, copy.deepcopy(tiny_tokenizer))
    bigger = copy.deepcopy(tiny_tokenizer)
    bigger.add_tokens(["<extra>"])
    n = len(tiny_tokenizer)
    with pytest.raises(ReasonMaxxerError, match=f"{n} vs {n + 1}"):
        check_same_tokenizer(tiny_tokenizer, bigger)
    a = _word_tokenizer(["<unk>", "a", "b", "c"])
    b = _word_tokenizer(["<unk>", "a", "c", "b"])
    with pytest.raises(ReasonMaxxerError, match=r"token id 2 \('b' vs 'c'\)"):
        check_same_tokenizer(a, b)


# -- known-answer model pairs ----------------------------------------------------------------
@pytest.fixture(scope="module")
def base_model(tiny_tokenizer):
    return make_tiny_model(len(tiny_tokenizer), seed=3, init_std=0.2)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    shared = "Q: add the numbers. "  # shared prefix -> split_prefix_logits path
    qs = ["1+2=", "17+5=?", "3", "40+41+42="]
    return [tiny_tokenizer(shared + q, add_special_tokens=False)["input_ids"] for q in qs]


def test_wrapper_matches_split_prefix(base_model):
    """The wrapper with edits gives the same logits through the shared-prefix path as in one pass."""
    w = EditedLogits(base_model, {5: 2, 9: 8})
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [5, 6, 7, 8, 20, 21, 22, 23, 24, 25, 26, 27]])
    att = torch.ones_like(ids)
    full = w(input_ids=ids, attention_mask=att).logits
    split = shared_prefix_logits(w, ids, att, 4)
    assert torch.allclose(full, split, atol=1e-4)
    base = base_model(input_ids=ids, attention_mask=att).logits
    assert (full[:, 5].argmax(-1) != base[:, 5].argmax(-1)).all()
    assert torch.equal(full[:, :5], base[:, :5])


def _expected(records, edits):
    """Count of edited positions of each rank that fall on generated positions (logits row p-1+j)."""
    counts = {}
    for r in records:
        p, c = r["prompt_len"], len(r["token_ids"])
        for pos, rank in edits.items():
            if p - 1 <= pos <= p + c - 2:
                counts[rank] = counts.get(rank, 0) + 1
    return counts


def test_analyze_known_answer(base_model, tiny_tokenizer, prompts):
    lens = sorted(len(p) for p in prompts)
    # positions inside every completion (all prompts + >= 1 token) and some only inside some
    edits = {lens[-1] + 1: 2, lens[-1] + 3: 8, lens[0] + 2: 2, lens[-1] + 5: 3, lens[0]: 8}
    tuned = EditedLogits(base_model, edits)
    records, s = analyze(base_model, tuned, tiny_tokenizer, prompts, max_new_tokens=12, batch_size=3)
    assert len(records) == len(prompts) and s["n_trajectories"] == 4
    exp = _expected(records, edits)
    n_rr = exp.get(2, 0) + exp.get(3, 0)
    n_sh = exp.get(8, 0)
    assert n_rr >= 3 and n_sh >= 2  # the test exercises both classes
    assert s["n_reranked"] == n_rr and s["n_shifted"] == n_sh
    assert s["n_positions"] == sum(len(r["token_ids"]) for r in records)
    assert s["rank_hist"]["2"] == exp.get(2, 0) and s["rank_hist"]["3"] == exp.get(3, 0)
    assert s["rank_hist"][">5"] == n_sh
    assert s["rank_hist"]["1"] == s["n_positions"] - n_rr - n_sh
    for r in records:
        p = r["prompt_len"]
        assert len(r["cls"]) == len(r["token_ids"]) == len(r["tokens"]) == len(r["js"])
        for j, c in enumerate(r["cls"]):
            rank = edits.get(p - 1 + j)
            if rank is None:
                assert c == 0 and r["kl_base_tuned"][j] == 0 and r["kl_tuned_base"][j] == 0 and r["js"][j] == 0
                assert r["tuned_argmax"][j] == r["base_argmax"][j]
            else:
                assert c == (1 if rank <= 5 else 2) and r["tuned_rank_in_base"][j] == rank
                assert r["js"][j] > 0 and r["kl_base_tuned"][j] > 0
    assert s["teacher_forced_argmax_mismatch"] <= 0.05
    # no edits: everything unshifted, zero divergence
    _, s0 = analyze(base_model, EditedLogits(base_model, {}), tiny_tokenizer, prompts[:2], max_new_tokens=6)
    assert s0["n_unshifted"] == s0["n_positions"] > 0 and s0["js_quantiles"]["max"] == 0


def test_run_analyze_writes_files(tmp_path, model_dirs, monkeypatch):
    d = model_dirs["good"]
    monkeypatch.setenv("REASONMAXXER_DEVICE", "cpu")
    out = tmp_path / "out"
    res = run_analyze(str(d), str(d), "arith:test:2", out, template="mistral", max_new_tokens=4)
    js = json.loads((out / "analysis.json").read_text())
    assert js["summary"]["n_reranked"] == 0 and js["summary"]["n_positions"] > 0
    assert js["config"]["template"] == "mistral" and res["summary"]["n_trajectories"] == 2
    md = (out / "analysis.md").read_text()
    assert "| reranked |" in md and "1.0-4.1%" in md and "5-12x" in md
    assert len((out / "trajectories.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ReasonMaxxerError, match="empty"):
        run_analyze(str(d), str(d), "arith:test:2", tmp_path / "o2", limit=0)


# -- along the tuned model's own trajectories ------------------------------------------------
def test_analyze_tuned_trajectories_known_answer(base_model, tiny_tokenizer, prompts):
    """The tuned model decodes; at an edited position it emits the base's rank-r token, so there
    (and only there) the base argmax differs from the emitted token, with tuned rank r."""
    lens = sorted(len(p) for p in prompts)
    edits = {lens[-1] + 1: 2, lens[-1] + 3: 8, lens[0] + 2: 3, lens[0]: 2}
    tuned = EditedLogits(base_model, edits)
    recs_b, _ = analyze(base_model, tuned, tiny_tokenizer, prompts, max_new_tokens=10, batch_size=3)
    recs, s = analyze(base_model, tuned, tiny_tokenizer, prompts, source="tuned", max_new_tokens=10, batch_size=3)
    assert s["source"] == "tuned" and all(r["source"] == "tuned" for r in recs)
    assert [r["token_ids"] for r in recs] != [r["token_ids"] for r in recs_b]  # other trajectories
    exp = _expected(recs, edits)
    assert s["n_reranked"] == exp.get(2, 0) + exp.get(3, 0) >= 3 and s["n_shifted"] == exp.get(8, 0) >= 2
    assert s["teacher_forced_argmax_mismatch"] == 0
    for rb, r in zip(recs_b, recs):
        p = r["prompt_len"]
        assert r["tuned_argmax"] == r["token_ids"]  # the tuned model's own greedy tokens
        first = min([pos - (p - 1) for pos in edits if pos >= p - 1] + [len(r["token_ids"])])
        assert r["token_ids"][:first] == rb["token_ids"][:first]  # identical up to the first edit
        for j, c in enumerate(r["cls"]):
            rank = edits.get(p - 1 + j)
            assert c == (0 if rank is None else 1 if rank <= 5 else 2)
            assert (r["base_argmax"][j] != r["token_ids"][j]) == (rank is not None)
            if rank is not None:
                assert r["tuned_rank_in_base"][j] == rank


def test_top5_and_prompt_tail(base_model, tiny_tokenizer, prompts):
    """Stored top-5: the tuned list is the base list with ranks 1 and r swapped at an edit (r <= 5),
    the same list elsewhere; probabilities descend; the prompt tail is the prompt's last tokens."""
    p0 = len(prompts[0])
    edits = {p0 + 1: 3, p0 + 2: 8}
    recs, _ = analyze(base_model, EditedLogits(base_model, edits), tiny_tokenizer, prompts[:2], max_new_tokens=6)
    seen = []
    for prompt, r in zip(prompts, recs):
        assert r["prompt_tail_ids"] == prompt[-PROMPT_TAIL:]
        assert len(r["base_top_ids"]) == len(r["tuned_top_p"]) == len(r["token_ids"])
        for j in range(len(r["token_ids"])):
            b, t = r["base_top_ids"][j], r["tuned_top_ids"][j]
            bp, tp = r["base_top_p"][j], r["tuned_top_p"][j]
            assert len(b) == TOP_N and b[0] == r["base_argmax"][j] and t[0] == r["tuned_argmax"][j]
            assert bp == sorted(bp, reverse=True) and 0 < sum(bp) <= 1 + 1e-4
            rank = edits.get(r["prompt_len"] - 1 + j)
            if rank is None:
                assert t == b and tp == bp
            elif rank <= TOP_N:  # swap of ranks 1 and r
                sw = list(b)
                sw[0], sw[rank - 1] = sw[rank - 1], sw[0]
                assert t == sw and tp == bp
                seen.append("swap")
            else:  # the rank-8 token jumps to the top
                assert t[0] not in b and t[1:] == b[1:]
                seen.append("shift")
    assert "swap" in seen and "shift" in seen
    with pytest.raises(ReasonMaxxerError, match="trajectory source"):
        analyze(base_model, base_model, tiny_tokenizer, prompts, source="both")


def test_run_analyze_both_sources(tmp_path, model_dirs, monkeypatch):
    d = model_dirs["good"]
    monkeypatch.setenv("REASONMAXXER_DEVICE", "cpu")
    out = tmp_path / "out"
    res = run_analyze(str(d), str(d), "arith:test:2", out, template="mistral", max_new_tokens=4, trajectories="both")
    js = json.loads((out / "analysis.json").read_text())
    assert list(js["summaries"]) == ["base", "tuned"] and js["summary"] == js["summaries"]["base"]
    assert js["summaries"]["tuned"]["source"] == "tuned" and js["config"]["trajectories"] == "both"
    recs = [json.loads(l) for l in (out / "trajectories.jsonl").read_text().splitlines()]
    assert [r["source"] for r in recs] == ["base", "base", "tuned", "tuned"]
    assert [r["token_ids"] for r in recs[:2]] == [r["token_ids"] for r in recs[2:]]  # same model twice
    ids = {str(i) for r in recs for k in ("token_ids", "prompt_tail_ids") for i in r[k]}
    ids |= {str(i) for r in recs for row in r["tuned_top_ids"] for i in row}
    assert ids <= set(js["token_text"]) and js["token_text"][str(recs[0]["token_ids"][0])] == recs[0]["tokens"][0]
    md = (out / "analysis.md").read_text()
    assert "| metric | base trajectories | tuned trajectories | paper |" in md
    assert res["summaries"]["tuned"]["n_positions"] == res["summary"]["n_positions"]
    with pytest.raises(ReasonMaxxerError, match="--trajectories"):
        run_analyze(str(d), str(d), "arith:test:2", tmp_path / "o3", trajectories="mine")


# -- CLI: bad input is one line on stderr and exit status 2 (analyze and intervene) ------------
@pytest.mark.parametrize("cmd", ["analyze", "intervene"])
@pytest.mark.parametrize(
    "case, expected",
    [
        ("bigtok", "tokenizers differ in size"),
        ("wide", "different output vocabularies"),
        ("corrupt_tuned", "could not load the tuned model"),
        ("corrupt_base", "could not load the base model"),
        ("missing", "no such model"),
        ("empty", "is empty"),
    ],
)
def test_cli_bad_input_one_line(cmd, case, expected, model_dirs, tmp_path, monkeypatch, capsys):
    from reasonmaxxer.cli import main

    monkeypatch.setenv("REASONMAXXER_DEVICE", "cpu")
    monkeypatch.delenv("REASONMAXXER_DEBUG", raising=False)
    base, tuned, extra = model_dirs["good"], model_dirs["good"], []
    if case in ("bigtok", "wide"):
        tuned = model_dirs[case]
    elif case == "corrupt_tuned":
        tuned = model_dirs["corrupt"]
    elif case == "corrupt_base":
        base = model_dirs["corrupt"]
    elif case == "missing":
        tuned = str(tmp_path / "nope")
    else:
        extra = ["--limit", "0"]
    argv = [
        cmd,
        "--base",
        base,
        "--tuned",
        tuned,
        "--problems",
        "arith:test:2",
        "--max-new-tokens",
        "2",
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]
    assert main(argv) == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.strip()]
    # one error line, the last; anything before it is transformers' "Loading weights" progress bar
    assert [l for l in err if "error" in l.lower() or "Traceback" in l] == err[-1:], err
    assert err[-1].startswith("reasonmaxxer: error: ") and expected in err[-1], err
    assert all(l.startswith("Loading weights") for l in err[:-1]), err
    if case in ("missing", "empty", "corrupt_base"):
        assert len(err) == 1  # failed before any model was loaded
    assert not (tmp_path / "out").exists()  # nothing written
