"""Tests for reasonmaxxer.explorer on hand-built analysis out_dirs (same schema as analysis.run_analyze).

Trajectories are written by hand so that the reranked / shifted positions, the nasty tokens and
the fork contexts are known; no model is loaded.
"""

import json
import re
import shutil
import subprocess
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.reports.explorer import (
    PLOT_NAMES,
    TOP5_NOTE,
    analysis_plots,
    fork_atlas,
    load_analysis,
    plot_names,
    roc_curve,
    write_explorer,
    write_fork_atlas,
)
from reasonmaxxer.reports.fork_atlas import ATLAS_HEADER

PNG_SIG = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")


def _rec(index, ids, tokens, ent, cls, tuned=None, rank=None):
    n = len(ids)
    tuned = tuned or [i if c == 0 else 100 + i for i, c in zip(ids, cls)]
    rank = rank or [1 if c == 0 else (2 if c == 1 else 9) for c in cls]
    return {
        "index": index,
        "prompt_len": 7,
        "token_ids": ids,
        "tokens": tokens,
        "text": "".join(tokens),
        "finish_reason": "eos",
        "base_entropy": ent,
        "base_argmax": list(ids),
        "tuned_argmax": tuned,
        "tuned_rank_in_base": rank,
        "kl_base_tuned": [0.01] * n,
        "kl_tuned_base": [0.02] * n,
        "js": [0.005] * n,
        "cls": cls,
        "problem_id": f"p{index}",
    }


def _write(out: Path, records, summary=None):
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "k": 5,
        "n_positions": sum(len(r["cls"]) for r in records),
        "reranked_pct": 30.0,
        "shifted_pct": 10.0,
        "entropy_ratio": 4.5,
        "auroc_entropy_reranked": 0.875,
        "entropy_reranked": 1.8,
        "entropy_unshifted": 0.4,
        "mean_tuned_rank_changed": 2.5,
        **(summary or {}),
    }
    meta = {
        "config": {"base": "base-m", "tuned": "tuned-m", "problems": "arith:test:3", "k": 5},
        "summary": summary,
        "paper": {},
    }
    (out / "analysis.json").write_text(json.dumps(meta))
    (out / "trajectories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


# 10 tokens: reranked at (0,1), (0,5), (1,2) -> 3; shifted at (0,3) -> 1
NASTY = [
    _rec(
        0,
        [1, 2, 3, 4, 5, 6],
        ["The", " ", "<script>alert(1)</script>", "&amp;", "\n", " x"],
        [0.05, 1.5, 0.2, 3.0, 0.7, 2.5],
        [0, 1, 0, 2, 0, 1],
    ),
    _rec(1, [7, 8, 9, 10], ["a", " & b", "\n\n", "</pre>"], [0.3, 0.01, 1.2, None], [0, 0, 1, 0]),
]


@pytest.fixture(scope="module")
def nasty_dir(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("nasty"), NASTY)


TOP_P = [0.6, 0.2, 0.1, 0.05, 0.03]
TOKEN_TEXT = {"11": "alt11", "12": "alt12", "13": "alt13", "14": "alt14", "200": "User: Q?", "201": " A:"}


def _rich(r, source):
    """A NASTY record as run_analyze writes it now: source, prompt tail, both models' top-5."""
    base_top = [[a, 11, 12, 13, 14] for a in r["base_argmax"]]
    tuned_top = [
        [t, a, 12, 13, 14] if t != a else [a, 11, 12, 13, 14] for a, t in zip(r["base_argmax"], r["tuned_argmax"])
    ]
    return dict(
        r,
        source=source,
        prompt_tail_ids=[200, 201],
        base_top_ids=base_top,
        tuned_top_ids=tuned_top,
        base_top_p=[TOP_P] * len(base_top),
        tuned_top_p=[TOP_P] * len(base_top),
    )


def _write_rich(out: Path):
    _write(out, [_rich(r, "base") for r in NASTY] + [_rich(r, "tuned") for r in NASTY])
    meta = json.loads((out / "analysis.json").read_text())
    meta.update(
        token_text=TOKEN_TEXT,
        summaries={
            "base": dict(meta["summary"], source="base"),
            "tuned": dict(meta["summary"], reranked_pct=12.5, source="tuned"),
        },
    )
    (out / "analysis.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def rich_dir(tmp_path_factory):
    return _write_rich(tmp_path_factory.mktemp("rich"))


class _Spans(HTMLParser):
    """Collects each span.tok's classes and text, and the application/json block."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.spans, self.cur, self.json, self.in_json, self.tags = [], None, None, False, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "span" and "tok" in (a.get("class") or "").split():
            self.cur = {"cls": a["class"].split(), "text": "", "t": a.get("data-t"), "p": a.get("data-p")}
        if tag == "script" and a.get("type") == "application/json":
            self.in_json, self.json = True, ""

    def handle_endtag(self, tag):
        if tag == "span" and self.cur is not None:
            self.spans.append(self.cur)
            self.cur = None
        if tag == "script":
            self.in_json = False

    def handle_data(self, data):
        if self.cur is not None:
            self.cur["text"] += data
        if self.in_json:
            self.json += data


def _parse(html: str) -> _Spans:
    p = _Spans()
    p.feed(html)
    p.close()
    return p


def test_plots_are_pngs(nasty_dir):
    paths = analysis_plots(nasty_dir)
    assert [p.name for p in paths] == list(PLOT_NAMES)
    for p in paths:
        assert p.parent == nasty_dir / "plots" and p.read_bytes().startswith(PNG_SIG)
    assert not list((nasty_dir / "plots").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_roc_matches_mann_whitney():
    # scores 0.1 0.4 0.35 0.8, labels 0 0 1 1: pairs (pos > neg) = 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3/4
    fpr, tpr, auc = roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool))
    assert auc == pytest.approx(0.75)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    # all tied: one diagonal step -> 0.5 (ties count 1/2)
    assert roc_curve(np.ones(4), np.array([0, 1, 0, 1], bool))[2] == pytest.approx(0.5)
    assert np.isnan(roc_curve(np.ones(3), np.zeros(3, bool))[2])


def test_explorer_counts_marks_and_escaping(nasty_dir):
    html = write_explorer(nasty_dir).read_text(encoding="utf-8")
    assert not re.search(r"https?://", html, re.IGNORECASE)
    assert "<link" not in html and ' src="http' not in html
    p = _parse(html)
    assert len(p.spans) == 10
    assert sum("reranked" in s["cls"] for s in p.spans) == 3
    assert sum("shifted" in s["cls"] for s in p.spans) == 1
    marked = {(s["t"], s["p"]) for s in p.spans if "reranked" in s["cls"] or "shifted" in s["cls"]}
    assert marked == {("0", "1"), ("0", "3"), ("0", "5"), ("1", "2")}
    # entropy colour bins: 0.05 -> h0, 1.5 -> h3, 3.0 -> h4, missing (None) -> h0
    assert [next(c for c in s["cls"] if re.fullmatch(r"h\d", c)) for s in p.spans[:4]] == ["h0", "h3", "h1", "h4"]
    assert "h0" in p.spans[-1]["cls"]
    texts = [s["text"] for s in p.spans]
    assert texts[2] == "<script>alert(1)</script>" and texts[3] == "&amp;" and texts[7] == " & b"
    assert texts[1] == "␣" and texts[4] == "↵" and texts[8] == "↵↵"  # whitespace-only tokens made visible
    # the hostile strings never appear unescaped, neither in the markup nor in the JSON block
    assert "<script>alert" not in html and html.count("</pre>") == 2  # one per trajectory, none from tokens
    assert html.count("<script") == 2 and html.count("</script>") == 2
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&amp;amp;" in html
    # the JSON block parses and carries one entry per trajectory / position
    data = json.loads(p.json)
    assert [len(t["cls"]) for t in data["traj"]] == [6, 4]
    assert data["vocab"]["3"] == "<script>alert(1)</script>"
    assert data["traj"][1]["H"][3] is None
    assert "document.body.dataset.ready" in html
    # header numbers
    assert "30.00%" in html and "10.00%" in html and "4.5x" in html and "0.875" in html
    assert "top-5" in html  # the note that top-5 is not stored


def test_explorer_top5_sources_and_prompt_tail(rich_dir):
    html = write_explorer(rich_dir).read_text(encoding="utf-8")
    p = _parse(html)
    assert len(p.spans) == 20 and [s["t"] for s in p.spans[:6]] == ["0"] * 6 and p.spans[10]["t"] == "2"
    assert "Along the base model" in html and "Along the tuned model" in html
    assert "12.50%" in html and "30.00%" in html  # one summary column per source
    assert html.count('<span class="ctx" title="end of the prompt">…User: Q? A:</span>') == 4
    assert f'<p class="note">{TOP5_NOTE}' not in html  # the top-5 are stored
    data = json.loads(p.json)
    assert [t["source"] for t in data["traj"]] == ["base", "base", "tuned", "tuned"]
    t0 = data["traj"][0]
    assert t0["bt"][3] == [4, 11, 12, 13, 14] and t0["tt"][3] == [104, 4, 12, 13, 14] and t0["bp"][3] == TOP_P
    assert data["vocab"]["11"] == "alt11" and data["vocab"]["200"] == "User: Q?"
    # without the top-5 fields: the note says what is missing
    assert f'<p class="note">{TOP5_NOTE}' in write_explorer(_write(rich_dir.parent / "old", NASTY)).read_text(
        encoding="utf-8"
    )


def test_plots_per_source(rich_dir):
    paths = analysis_plots(rich_dir)
    assert [p.name for p in paths] == list(PLOT_NAMES) + list(plot_names("tuned"))
    assert plot_names("tuned")[0] == "entropy_reranked_vs_unshifted_tuned.png"
    assert all(p.read_bytes().startswith(PNG_SIG) for p in paths)
    assert write_explorer(rich_dir).read_text(encoding="utf-8").count('src="data:image/png;base64,') == 6


def test_explorer_max_trajectories(nasty_dir, tmp_path):
    out = _write(tmp_path / "a", NASTY)
    p = _parse(write_explorer(out, max_trajectories=1).read_text(encoding="utf-8"))
    assert len(p.spans) == 6 and len(json.loads(p.json)["traj"]) == 1


def test_missing_inputs_raise(tmp_path):
    with pytest.raises(ReasonMaxxerError, match="trajectories.jsonl|analysis.json"):
        write_explorer(tmp_path)
    bad = dict(NASTY[0], cls=[0])
    _write(tmp_path / "bad", [bad])
    with pytest.raises(ReasonMaxxerError, match="trajectories.jsonl:1: .*cls"):
        load_analysis(tmp_path / "bad")


FORK_RECS = [
    # high entropy (> 1.0) at position 3 everywhere; contexts (1,2,3) twice, (9,2,3) once; base token 4
    _rec(0, [1, 2, 3, 4], ["a", "b", "c", "D"], [0.1, 0.1, 0.1, 2.0], [0, 0, 0, 1]),
    _rec(1, [1, 2, 3, 4, 5], ["a", "b", "c", "D", "e"], [1.5, 0.1, 0.1, 2.2, 0.1], [0, 0, 0, 0, 0]),
    _rec(2, [9, 2, 3, 4], ["z", "b", "c", "D"], [0.1, 0.1, 0.1, 1.8], [0, 0, 0, 1]),
]


def test_fork_atlas_counts(tmp_path):
    a = load_analysis(_write(tmp_path, FORK_RECS))
    forks, _tau = fork_atlas(a, context_tokens=3, tau=1.0)
    got = [(f.context, f.base_token, f.count, f.n_problems, f.n_reranked, f.rate) for f in forks]
    assert got == [
        (("a", "b", "c"), "D", 2, 2, 1, 0.5),
        (("z", "b", "c"), "D", 1, 1, 1, 1.0),  # same count: higher rate first
        ((), "a", 1, 1, 0, 0.0),
    ]  # traj 1 position 0: empty context
    assert forks[0].tuned_tokens == (("⟨id=104⟩", 1),)  # tuned argmax never emitted: shown by id
    forks2, _ = fork_atlas(a, context_tokens=2, tau=1.0)
    assert (forks2[0].context, forks2[0].count, forks2[0].n_reranked) == (("b", "c"), 3, 2)
    # default tau = median base entropy at reranked positions = median(2.0, 1.8) = 1.9 -> only 2.0, 2.2 pass
    forks3, tau3 = fork_atlas(a, context_tokens=3)
    assert tau3 == pytest.approx(1.9) and sum(f.count for f in forks3) == 2
    with pytest.raises(ReasonMaxxerError, match="pass tau"):
        fork_atlas(load_analysis(_write(tmp_path / "none", [FORK_RECS[1]])))


PROMPT_FORKS = [
    # prompt tail (7, 8) before every completion; high entropy (> 1) at the first completion token
    # and again after "7 8" inside a completion (traj 1): the same tokens, but not the same fork
    dict(_rec(0, [1, 2], ["a", "b"], [2.0, 0.1], [1, 0]), prompt_tail_ids=[6, 7, 8]),
    dict(_rec(1, [1, 7, 8, 1], ["a", "x", "y", "a"], [1.5, 0.1, 0.1, 3.0], [0, 0, 0, 2]), prompt_tail_ids=[6, 7, 8]),
]


def test_fork_atlas_reaches_into_the_prompt(tmp_path):
    out = _write(tmp_path, PROMPT_FORKS)
    meta = json.loads((out / "analysis.json").read_text())
    (out / "analysis.json").write_text(json.dumps(dict(meta, token_text={"6": "Q", "7": "x", "8": "y"})))
    forks, _ = fork_atlas(load_analysis(out), context_tokens=2, tau=1.0)
    got = [(f.context, f.prompt_context, f.base_token, f.count, f.n_reranked, f.n_shifted) for f in forks]
    assert got == [
        (("x", "y"), 2, "a", 2, 1, 0),  # first completion token, both trajectories
        (("x", "y"), 0, "a", 1, 0, 1),
    ]  # the same tokens inside traj 1's completion
    forks3, _ = fork_atlas(load_analysis(out), context_tokens=3, tau=1.0)
    assert forks3[0].context == ("Q", "x", "y") and forks3[0].prompt_context == 3
    write_fork_atlas(out, context_tokens=2, tau=1.0)
    md = (out / "fork_atlas.md").read_text(encoding="utf-8")
    assert "| 1 | `x` `y` ‖ | `a` | 2 |" in md and "| 2 | `x` `y` | `a` | 1 |" in md
    assert "(start)" not in md


def test_fork_atlas_files(tmp_path):
    out = _write(tmp_path, FORK_RECS + [_rec(3, [50, 51], ["<b>", "|`x"], [0.1, 5.0], [0, 1])])
    html = write_fork_atlas(out, context_tokens=3, top=2, tau=1.0).read_text(encoding="utf-8")
    md = (out / "fork_atlas.md").read_text(encoding="utf-8")
    assert not re.search(r"https?://", html, re.IGNORECASE)
    # two tables (most frequent; most changed), each a header row + the top 2, the same in HTML and Markdown
    html_rows = [
        [unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", html)
    ]
    md_rows = [
        [c.strip() for c in l.strip("|").split(" | ")]
        for l in md.splitlines()
        if l.startswith("| ") and not l.startswith("| ---")
    ]
    assert len(html_rows) == len(md_rows) == 2 * (1 + 2)
    assert html_rows[0] == md_rows[0] == list(ATLAS_HEADER)
    # 3 forks with a change, 1 each; ties go by count (("a","b","c") has 2 positions), then context
    assert "top 2 of 3 forks" in md.split("### Where the tuned model changes")[1]
    assert md_rows[4] == ["1", "`a` `b` `c`", "`D`", "2", "2", "1", "0", "0.50", "`⟨id=104⟩`×1"]
    assert html_rows[4] == ["1", "a b c", "D", "2", "2", "1", "0", "0.50", "⟨id=104⟩×1"]
    html_all = write_fork_atlas(out, context_tokens=3, top=50, tau=1.0).read_text(encoding="utf-8")
    assert "&lt;b&gt;" in html_all and "<b>" not in html_all
    md_all = (out / "fork_atlas.md").read_text(encoding="utf-8")
    assert "`<b>`" in md_all and "`\\|ˋx`" in md_all  # inline code: pipe escaped, backtick replaced


# Injected into a copy of the page for the browser test only: record uncaught errors (before the
# page's script runs), then hover the first shifted token and copy the panel text into the DOM.
_ERR_HOOK = "<script>window.__errs=[];addEventListener('error',function(e){__errs.push(String(e.message))});</script>"
_HOVER = (
    "<script>var el=document.querySelector('span.tok.shifted');"
    "el.dispatchEvent(new MouseEvent('mouseover',{bubbles:true}));"
    "document.body.setAttribute('data-panel',document.getElementById('panel').textContent);"
    "document.body.setAttribute('data-errors',JSON.stringify(window.__errs));</script>"
)


def _chromium(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """(DOM after load, console lines) of `page` in headless Chromium: no network, throwaway profile."""
    r = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, [l for l in r.stderr.splitlines() if "CONSOLE" in l]


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs /usr/bin/chromium (Debian package `chromium`; .ci/run installs it with apt-get where it can)",
)
def test_explorer_in_headless_chromium(rich_dir, tmp_path):
    # the console capture works: a page with an uncaught error logs it
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>noSuchFunction();</script></body></html>")
    assert any("noSuchFunction" in l for l in _chromium(bad, tmp_path)[1])

    html = write_explorer(rich_dir).read_text(encoding="utf-8")
    dom, console = _chromium(write_explorer(rich_dir), tmp_path)
    assert console == [] and 'data-ready="1"' in dom
    p = _parse(dom)
    assert len(p.spans) == 2 * 10  # base and tuned trajectories, 10 tokens each
    assert sum("reranked" in s["cls"] for s in p.spans) == 2 * 3 and sum("shifted" in s["cls"] for s in p.spans) == 2
    assert dom.count('class="ctx"') == 4  # the end of each prompt, greyed

    page = tmp_path / "hover.html"  # hover in the browser: the panel's text
    page.write_text(html.replace("<head>", "<head>" + _ERR_HOOK, 1).replace("</body>", _HOVER + "</body>", 1))
    dom, console = _chromium(page, tmp_path)
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-errors="[]"' in body and console == []
    panel = unescape(re.search(r'data-panel="([^"]*)"', body).group(1))
    assert "position 3: shifted" in panel and "base top-5 (p)" in panel and "tuned top-5 (p)" in panel
    assert "*1 &amp;" in panel and "0.600" in panel and "alt11" in panel  # emitted token starred, probabilities


NODE_STUB = """
const fs=require('fs'); const html=fs.readFileSync(process.argv[2],'utf8');
const data=html.match(/<script type="application\\/json" id="data">([\\s\\S]*?)<\\/script>/)[1];
const js=html.match(/<script>([\\s\\S]*?)<\\/script>/)[1];
const h={}, panel={textContent:''}, body={dataset:{}};
global.document={body, getElementById:id=>id==='data'?{textContent:data}:panel,
  addEventListener:(ev,f)=>{h[ev]=f;}};
eval(js);
const el={dataset:{t:'0',p:'3'}, classList:{add(){},remove(){}}}; el.closest=()=>el;
h.mouseover({target:el}); const hover=panel.textContent;
h.click({target:el}); h.mouseover({target:{closest:()=>({dataset:{t:'1',p:'0'}})}});
console.log(JSON.stringify({ready:body.dataset.ready, hover, pinned:panel.textContent}));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script against a DOM stub")
def test_explorer_script_runs_in_node(nasty_dir, rich_dir, tmp_path):
    path = write_explorer(nasty_dir)
    stub = tmp_path / "stub.js"
    stub.write_text(NODE_STUB)
    r = subprocess.run(["node", str(stub), str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ready"] == "1"
    # trajectory 0, position 3: shifted, token "&amp;", H = 3.0 nats, tuned argmax id 104 (never emitted), rank 9
    assert "position 3: shifted" in out["hover"] and "&amp;" in out["hover"] and "3.00 nats" in out["hover"]
    assert "\u27e8id=104\u27e9" in out["hover"] and "base rank 9" in out["hover"]
    assert out["pinned"] == out["hover"]  # after a click, hovering another token does not replace the panel
    assert "re-run `reasonmaxxer analyze`" in out["hover"]  # an old file: no top-5, the note says so
    r = subprocess.run(
        ["node", str(stub), str(write_explorer(rich_dir))], capture_output=True, text=True, timeout=30, check=False
    )
    hover = json.loads(r.stdout)["hover"]
    # base top-5 [&amp; alt11 alt12 ...], tuned top-5 [id 104, &amp;, alt12 ...]; the emitted token starred
    lines = hover.splitlines()
    i = lines.index(next(l for l in lines if l.startswith("base top-5 (p)")))
    assert (
        lines[i + 1].startswith("*1 &amp;") and "0.600" in lines[i + 1] and "2 \u27e8id=104\u27e9" not in lines[i + 1]
    )
    assert lines[i + 1][24:].startswith(" 1 \u27e8id=104\u27e9") and lines[i + 2][24:].startswith("*2 &amp;")
    assert lines[i + 2].startswith(" 2 alt11") and lines[-1] == "* = the token emitted here"
