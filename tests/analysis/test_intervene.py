"""Oracle interventions (method.md section 2, causal checks): known-answer model pairs.

The "tuned" model is the base wrapped by `EditedLogits` (the `EditedLogits` idea of
test_analysis.py): base logits, except at chosen absolute positions, where the base argmax is
swapped with the base's rank-r token. So the tuned argmax differs from the base argmax exactly
at the edited positions, whatever the prefix. The wrapper reads absolute positions from
`position_ids` and handles `logits_to_keep`, so it works on the KV-cached decode path.
A generated token j of a prompt of length L is predicted at position L - 1 + j.
"""

import json
import math

import pytest
import torch
from conftest import EditedLogits, make_tiny_model

from reasonmaxxer.analysis.intervene import (
    Rule,
    base_greedy,
    cross_forward,
    cross_reverse,
    entropy_gated,
    mixed_decode,
    oracle,
    random_control,
    run_intervene,
    tuned_greedy,
)
from reasonmaxxer.errors import ReasonMaxxerError

N_NEW = 10


@pytest.fixture(scope="module")
def base_model(tiny_tokenizer):
    return make_tiny_model(len(tiny_tokenizer), seed=3, init_std=0.2)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    qs = ["Q: 1+2=", "Q: 17+5=?", "3", "Q: 40+41+42="]
    return [tiny_tokenizer(q, add_special_tokens=False)["input_ids"] for q in qs]


@pytest.fixture(scope="module")
def edits(prompts):
    lens = sorted(len(p) for p in prompts)
    # reached by every row, by some rows only, and by none (beyond every completion)
    return {lens[-1] + 1: 2, lens[-1] + 4: 8, lens[0] + 2: 3, lens[0]: 2, lens[-1] + N_NEW + 3: 2}


def _reached(prompts, records, edits):
    """{row: sorted token indices j where an edit sits}, j = pos - (L - 1)."""
    return {
        i: sorted(pos - (len(p) - 1) for pos in edits if 0 <= pos - (len(p) - 1) < len(r["token_ids"]))
        for i, (p, r) in enumerate(zip(prompts, records))
    }


def _touched(records):
    return {i: [j for j, t in enumerate(r["touched"]) if t] for i, r in enumerate(records)}


def _decode(base, tuned, prompts, rule, eos=frozenset(), **kw):
    return mixed_decode(base, tuned, prompts, rule, max_new_tokens=N_NEW, eos_ids=set(eos), batch_size=3, **kw)


@pytest.fixture(scope="module")
def runs(base_model, prompts, edits, tiny_tokenizer):
    tuned = EditedLogits(base_model, edits)
    out = {
        r.label: _decode(base_model, tuned, prompts, r, tokenizer=tiny_tokenizer)
        for r in (
            base_greedy(),
            tuned_greedy(),
            oracle(),
            random_control(0),
            random_control(1),
            entropy_gated(math.inf),
            entropy_gated(-1.0),
            cross_forward(-1.0),
            cross_reverse(-1.0),
            cross_reverse(math.inf),
        )
    }
    return out


def test_rules_by_hand():
    base = torch.log(torch.tensor([[4.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [8.0, 1.0, 1.0, 1.0]]))
    tuned = torch.log(torch.tensor([[2.0, 4.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 8.0, 1.0]]))
    # base argmax [0, 0, 0]; tuned argmax [1, 0, 2]; base entropy row 1 = ln 4 = 1.386 nats (max)
    tok, hit = oracle()(0, base, tuned)
    assert tok.tolist() == [1, 0, 2] and hit.tolist() == [True, False, True]
    tok, hit = base_greedy()(0, base, tuned)
    assert tok.tolist() == [0, 0, 0] and not hit.any()
    # row 0 entropy 1.75 ln2 = 1.213 > 1.2 -> tuned; row 2: p = [8,1,1,1]/11, H = 0.75 < 1.2 -> base
    tok, hit = entropy_gated(1.2)(0, base, tuned)
    assert tok.tolist() == [1, 0, 0] and hit.tolist() == [True, False, False]
    # JS row 0 = 0.5 ln(4/3) + 0.25 ln(2/3) = 0.0425 nats; row 1 = 0; row 2 larger
    tok, _ = cross_forward(0.05)(0, base, tuned)
    assert tok.tolist() == [0, 0, 2]
    tok, hit = cross_reverse(0.05)(0, base, tuned)
    assert tok.tolist() == [1, 0, 0] and hit.tolist() == [True, False, False]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    tok, hit = random_control(0)(0, base, tuned, gens)
    assert tok[1] == 0 and tok[0] != 0 and tok[2] != 0 and hit.tolist() == [True, False, True]
    with pytest.raises(ReasonMaxxerError, match="unknown rule"):
        Rule("nope")(0, base, tuned)


def test_oracle_reproduces_tuned_greedy(runs, prompts, edits):
    assert [r["token_ids"] for r in runs["oracle"]] == [r["token_ids"] for r in runs["tuned_greedy"]]
    assert [r["token_ids"] for r in runs["oracle"]] != [r["token_ids"] for r in runs["base_greedy"]]
    reached = _reached(prompts, runs["oracle"], edits)
    assert sum(map(len, reached.values())) >= 6  # every row length, several per row
    assert _touched(runs["oracle"]) == reached == _touched(runs["tuned_greedy"])
    assert all(len(r["token_ids"]) == N_NEW and r["finish_reason"] == "length" for r in runs["oracle"])
    assert all(isinstance(r["text"], str) for r in runs["oracle"])


def test_base_greedy_matches_hf_generate(base_model, prompts, tiny_tokenizer):
    tuned = EditedLogits(base_model, {})
    eos = {tiny_tokenizer.eos_token_id}
    recs = mixed_decode(base_model, tuned, prompts, base_greedy(), max_new_tokens=N_NEW, eos_ids=eos, batch_size=3)
    assert not any(any(r["touched"]) for r in recs)
    for p, r in zip(prompts, recs):  # one row at a time: no padding
        g = base_model.generate(
            torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            do_sample=False,
            max_new_tokens=N_NEW,
            eos_token_id=2,
            pad_token_id=0,
        )
        assert r["token_ids"] == g[0, len(p) :].tolist()
        assert r["finish_reason"] == ("eos" if r["token_ids"][-1] == 2 else "length")


def test_random_control_touches_oracle_positions(runs, prompts, edits):
    reached = _reached(prompts, runs["oracle"], edits)
    for label in ("random_control(seed=0)", "random_control(seed=1)"):
        recs = runs[label]
        assert _touched(recs) == reached
        # never the base argmax: replay base greedy on the emitted prefix at each touched position
        assert [r["token_ids"] for r in recs] != [r["token_ids"] for r in runs["oracle"]]
    assert [r["token_ids"] for r in runs["random_control(seed=0)"]] != [
        r["token_ids"] for r in runs["random_control(seed=1)"]
    ]


def test_random_control_never_emits_base_argmax(base_model, prompts, edits):
    tuned = EditedLogits(base_model, edits)
    recs = _decode(base_model, tuned, prompts, random_control(7))
    checked = 0
    for p, r in zip(prompts, recs):
        for j, t in enumerate(r["touched"]):
            if t:
                ids = torch.tensor([p + r["token_ids"][:j]])
                logits = base_model(input_ids=ids).logits[0, -1]  # [V]
                assert r["token_ids"][j] != int(logits.argmax())
                assert r["token_ids"][j] in torch.topk(logits, 20).indices.tolist()
                checked += 1
    assert checked >= 6
    again = _decode(base_model, tuned, prompts, random_control(7))
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in recs]  # seeded per row


def test_gated_and_cross_limits(runs):
    ids = {k: [r["token_ids"] for r in v] for k, v in runs.items()}
    assert ids["entropy_gated(inf)"] == ids["base_greedy"]
    assert ids["entropy_gated(-1)"] == ids["tuned_greedy"]
    assert ids["cross_forward(-1)"] == ids["tuned_greedy"]
    assert ids["cross_reverse(inf)"] == ids["tuned_greedy"]  # never inject: the tuned model decodes
    assert ids["cross_reverse(-1)"] == ids["base_greedy"]  # always inject base tokens
    assert not any(any(r["touched"]) for r in runs["entropy_gated(inf)"])


def test_eos_stops_rows(base_model, prompts):
    # make the base's first generated token of the shortest prompt EOS (rank-r swap to id 2 is not
    # controllable, so declare whatever base greedy emits first as the EOS id)
    first = _decode(base_model, base_model, prompts, base_greedy())
    eos = {first[0]["token_ids"][0]}
    recs = _decode(base_model, base_model, prompts, base_greedy(), eos=eos)
    assert recs[0]["token_ids"] == first[0]["token_ids"][:1] and recs[0]["finish_reason"] == "eos"
    for a, b in zip(first, recs):  # other rows: prefix until their EOS
        assert a["token_ids"][: len(b["token_ids"])] == b["token_ids"]
    with pytest.raises(ReasonMaxxerError, match="positions"):
        mixed_decode(base_model, base_model, [[5] * 600], base_greedy(), eos_ids=set())


def test_run_intervene_writes_files(tmp_path, model_dirs, monkeypatch):
    d = model_dirs["good"]
    monkeypatch.setenv("REASONMAXXER_DEVICE", "cpu")
    out = tmp_path / "out"
    res = run_intervene(
        str(d), str(d), "arith:test:2", out, template="mistral", max_new_tokens=4, taus=(0.5, 2.0), random_seeds=(0, 1)
    )
    js = json.loads((out / "intervene.json").read_text())
    conds = [r["condition"] for r in js["rows"]]
    assert conds[:3] == ["base (greedy)", "tuned (greedy)", "oracle"] and len(conds) == 4 + 2 + 2
    assert js["config"]["template"] == "mistral" and len(js["tau_sweep"]) == 2
    # same model twice: nothing is ever touched, every condition decodes the same
    assert all(r["touched_pct"] == 0 for r in js["tau_sweep"]) and js["rows"][2]["touched_pct"] == 0
    assert js["rows"][3]["pass_at_1"]["mean"] == js["rows"][0]["pass_at_1"]
    md = (out / "intervene.md").read_text()
    assert "| oracle |" in md and "= tuned" in md and "<= base" in md
    for name in ("tau_sweep.png", "intervene_bars.png"):  # both plots, beside each other
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["paths"]["plot"].endswith("tau_sweep.png") and res["paths"]["bars"].endswith("intervene_bars.png")
    with pytest.raises(ReasonMaxxerError, match="empty") as e:
        run_intervene(str(d), str(d), "arith:test:2", tmp_path / "o2", limit=0)
    assert "\n" not in str(e.value)
