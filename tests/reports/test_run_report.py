"""Tests for reasonmaxxer.report: files, self-containment, escaping, numbers, missing sections.

The full report is written once per module (plots take ~1 s); small cases get their own dirs.
"""

import base64
import re
import warnings
from html.parser import HTMLParser

import numpy as np
import pytest

from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.reports.run_report import PLOT_NAMES, write_train_report

PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _tok(text, h, tau=1.4, top5=None):
    t = {"text": text, "entropy": h, "gated": h > tau}
    if top5 is not None:
        t["top5"] = top5
    return t


def _examples():
    """Two rollouts' tokens: a correct one (gated tokens with top-5s, HTML and markdown in the
    text) and a wrong one."""
    ex_correct = [
        _tok("Let", 0.1),
        _tok(" x", 0.3),
        _tok(" =", 0.05),
        _tok(" 3", 2.31, top5=[[" 3", 0.41], [" 4", 0.22], [" <", 0.1], [" &", 0.05], ["\n", 0.01]]),
        _tok(".\n", 0.2),
        _tok("1.", 1.9, top5=[["1.", 0.5], ["So", 0.3]]),  # gated token at a line start
        _tok(" Then", 0.1),
        _tok(" <script>alert(1)</script>", 3.2, top5=[[" <script>", 0.3], [" So", 0.2]]),
        _tok(" a & b", 0.4),
        _tok("\n\n", 1.7, top5=[["\n\n", 0.6], [" ", 0.2]]),
        _tok("# not a heading", 0.1),
        _tok(" \\boxed{3}", 0.1),
        _tok("x", 0.1),
        _tok("(", 1.5),  # gated punctuation right after a letter
    ]
    ex_wrong = [
        _tok("The", 0.2),
        _tok(" answer", 1.6, top5=[[" answer", 0.45], [" result", 0.3]]),
        _tok(" is", 0.1),
        _tok(" 5", 0.2),
    ]
    return [
        {"problem_id": "math/algebra/17", "correct": True, "advantage": 1.22, "tokens": ex_correct},
        {"problem_id": "math/geometry/<3>", "correct": False, "advantage": -0.81, "tokens": ex_wrong},
    ]


def _curves():
    return [
        {
            "step": s,
            "loss": 1.0 / s - 0.1,
            "decision": -0.05 * s / 10,
            "anchor": 0.01 * s,
            "gated_fraction": 0.052 + 0.001 * (s % 3),
            "grad_norm": 0.8,
            "lr": 1e-4 * min(1, s / 5),
            "tokens_per_s": 5000.0,
            "val_accuracy": (0.40 + 0.005 * s if s % 5 == 0 else None),
            "dlogp_pos": 0.01 * s,
            "dlogp_neg": -0.02 * s,
            "pressure_ratio": 0.9 - 0.01 * s,
        }
        for s in range(1, 21)
    ]


def _data():
    rng = np.random.default_rng(0)
    # 100k entropies: most tokens near 0, a tail past tau (as in real rollouts)
    values = np.concatenate([rng.exponential(0.15, 95_000), rng.uniform(1.0, 4.0, 5_000)]).tolist()
    return {
        "title": "Qwen3-0.6B on MATH | <reasonmaxxer> run",
        "summary": {
            "model": "Qwen/Qwen3-0.6B",
            "problems": "MATH L3-5 (300)",
            "template": "qwen_boxed",
            "method": "reasonmaxxer",
            "lam": 0.2,
            "tau": 1.4,
            "tau_source": "held-out sweep",
            "steps": 149,
            "lora": {"r": 32, "alpha": 64},
            "note": "a|b",
        },
        "accuracy": {
            "base": {"greedy": 0.298, "avg_at_n": 0.2871, "n_problems": 500, "n_samples": 16},
            "trained": {"greedy": 0.502, "avg_at_n": 0.4912, "n_problems": 500, "n_samples": 16},
            "paired": {
                "metric": "greedy",
                "n": 500,
                "mean_diff": 0.204,
                "low": 0.15,
                "high": 0.26,
                "wins": 130,
                "losses": 28,
                "ties": 342,
            },
        },
        "entropy": {"values": values, "tau": 1.4, "gated_fraction": 0.052},
        "examples": _examples(),
        "curves": _curves(),
        "timings": {"sample": 1234.5, "score": 321.0, "train": 3600.0, "evaluate": 444.4},
        "selection": {
            "problems_total": 300,
            "problems_mixed": 142,
            "problems_kept": 50,
            "rollouts_kept": 1000,
            "pass_rate_histogram": [80, 12, 15, 20, 18, 17, 25, 20, 15, 78],
        },
        "artifacts": {"adapter": "adapter/", "merged checkpoint": "merged/model.safetensors"},
    }


class _Doc(HTMLParser):
    """The page's tables (rows of cell texts, header row included), paragraphs, notes and headings."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables, self.paragraphs, self.notes, self.h2 = [], [], [], []
        self.cell = self.text = None
        self.stack = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in ("meta", "img", "br"):  # void elements have no end tag
            self.stack.append((tag, a))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""
        elif tag in ("p", "h2"):
            self.text = ""

    def handle_endtag(self, tag):
        open_tag, a = self.stack.pop()
        assert open_tag == tag, (open_tag, tag)  # well nested
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None
        elif tag == "p" and self.text is not None:
            (self.notes if a.get("class") == "note" else self.paragraphs).append(self.text)
            self.text = None
        elif tag == "h2":
            self.h2.append(self.text)
            self.text = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data
        if self.text is not None:
            self.text += data


def _doc(html: str) -> _Doc:
    d = _Doc()
    d.feed(html)
    d.close()
    return d


def _table(doc: _Doc, first_header: str) -> list[list[str]]:
    """The one table whose first header cell is `first_header`."""
    (t,) = [t for t in doc.tables if t[0][0] == first_header]
    return t


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # well-formed data renders without any warning
        md_path, html_path = write_train_report(out, _data())
    return out, md_path, html_path, md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")


def test_files_and_pngs(full):
    out, md_path, html_path, _, _ = full
    assert md_path == out / "report.md" and html_path == out / "report.html"
    assert md_path.is_file() and html_path.is_file()
    for name in PLOT_NAMES:
        assert (out / "plots" / name).read_bytes().startswith(PNG_SIG), name
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # atomic writes left no temp files


def test_html_is_self_contained(full):
    html = full[4]
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower() and "<link" not in html.lower() and "@import" not in html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == len(PLOT_NAMES)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIG)


def test_html_escapes_token_text(full):
    html = full[4]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert " a &amp; b" in html
    assert "&lt;reasonmaxxer&gt;" in html  # title
    assert "math/geometry/&lt;3&gt;" in html  # problem id
    # the rollout keeps its newlines as line breaks (pre-wrap), and a whitespace-only gated token is visible
    rollout = re.search(r'<pre class="rollout">(.*?)</pre>', html, re.S).group(1)
    assert ".\n" in rollout and "↵↵</span>" in rollout
    # the tooltip lists the top-5 with probabilities, escaped inside the attribute
    title = re.search(r'<span class="g"[^>]*title="([^"]*)"[^>]*> 3</span>', html).group(1)
    assert "H = 2.310 nats" in title and "0.410  ␣3" in title and "␣&lt;" in title and "␣&amp;" in title
    assert "0.010  ↵" in title


def test_html_shows_numbers(full):
    doc = _doc(full[4])
    assert _table(doc, "model") == [
        ["model", "greedy", "avg@16", "problems", "samples/problem"],
        ["base", "0.298", "0.287", "500", "16"],
        ["trained", "0.502", "0.491", "500", "16"],
        ["trained − base", "+0.204", "+0.204", "", ""],
    ]
    assert _table(doc, "metric") == [
        ["metric", "problems", "mean difference", "95% interval", "wins", "losses", "ties"],
        ["greedy", "500", "+0.204", "[+0.150, +0.260]", "130", "28", "342"],
    ]
    entropy, selection = [t for t in doc.tables if t[0] == ["quantity", "value"]]
    assert entropy[1:3] == [["tau (nats)", "1.4 (held-out sweep)"], ["gated fraction (training gate)", "5.20%"]]
    assert entropy[3] == ["completion tokens scored", "100000"]
    assert selection[1:] == [
        ["problems total", "300"],
        ["problems mixed", "142"],
        ["problems kept", "50"],
        ["rollouts kept", "1000"],
    ]
    summary = dict(_table(doc, "field")[1:])
    assert summary["model"] == "Qwen/Qwen3-0.6B" and summary["lora"] == '{"r": 32, "alpha": 64}'
    assert summary["note"] == "a|b" and summary["steps"] == "149"
    assert _table(doc, "pass rate")[1] == ["problems", "80", "12", "15", "20", "18", "17", "25", "20", "15", "78"]
    timings = _table(doc, "stage")
    assert timings[3] == ["train", "3,600.0", "1:00:00", "64.3%"]  # 3600 / 5599.9 s
    assert timings[-1] == ["total", "5,599.9", "1:33:20", "100.0%"]
    assert "The interval excludes zero: the trained model is better on this metric." in doc.paragraphs
    assert '<a href="merged/model.safetensors">merged/model.safetensors</a>' in full[4]
    assert doc.h2 == [
        "Run summary",
        "Held-out accuracy",
        "Base-model entropy and the gate",
        "Data selection",
        "Breakdowns",
        "Gated tokens in context",
        "Training curves",
        "Stage timings",
        "Artifacts",
    ]


def test_html_gated_token_table(full):
    doc = _doc(full[4])
    gated = [t for t in doc.tables if t[0] == ["#", "token", "H (nats)", "base top-5"]]
    assert len(gated) == 2
    assert gated[0][1] == ["1", "␣3", "2.31", "␣3 0.410 · ␣4 0.220 · ␣< 0.100 · ␣& 0.050 · ↵ 0.010"]
    assert gated[0][3] == ["3", "␣<script>alert(1)</script>", "3.2", "␣<script> 0.300 · ␣So 0.200"]
    assert gated[0][5] == ["5", "(", "1.5", "not recorded"]
    assert gated[1][1:] == [["1", "␣answer", "1.6", "␣answer 0.450 · ␣result 0.300"]]


def test_markdown_tables(full):
    md = full[3]
    assert md.startswith("# Qwen3-0.6B on MATH \\| &lt;reasonmaxxer&gt; run\n")
    assert "| field | value |" in md and "| lam | 0.2 |" in md and "| note | a\\|b |" in md
    assert "| model | greedy | avg@16 | problems | samples/problem |" in md
    assert "| base | 0.298 | 0.287 | 500 | 16 |" in md
    assert "| trained | 0.502 | 0.491 | 500 | 16 |" in md
    assert "| trained − base | +0.204 | +0.204 |  |  |" in md
    assert "| greedy | 500 | +0.204 | [+0.150, +0.260] | 130 | 28 | 342 |" in md
    assert "| tau (nats) | 1.4 (held-out sweep) |" in md
    assert "| gated fraction (training gate) | 5.20% |" in md
    assert (
        "| problems kept | 50 |" in md and "| tau\\_source | held-out sweep |" in md and "| problems | 80 | 12 |" in md
    )
    assert "| stage | seconds | h:mm:ss | share |" in md and "| train | 3,600.0 | 1:00:00 |" in md
    assert "| adapter | [adapter/](adapter/) |" in md
    assert "| merged checkpoint | [merged/model.safetensors](merged/model.safetensors) |" in md
    for name in PLOT_NAMES:
        assert f"(plots/{name})" in md


def test_markdown_example_rendering(full):
    md = full[3]
    assert "<script" not in md and "&lt;script&gt;alert\\(1\\)" not in md  # ( is not escaped, < is
    assert "**&lt;script&gt;alert(1)&lt;/script&gt;**<sup>3</sup>" in md
    assert " **3**<sup>1</sup>" in md  # leading space kept outside the bold
    assert "> 1\\.<sup>" not in md and "> **1.**<sup>2</sup>" in md  # bold at line start is not a list
    assert "b<b>↵↵</b><sup>4</sup>" in md  # whitespace-only gated token made visible (↵ after a letter: <b>)
    assert "> \\# not a heading" in md  # line-start '#' escaped
    assert "\\\\boxed{3}" in md  # backslash escaped
    assert "x<b>(</b><sup>5</sup>" in md  # ** cannot open between 'x' and '(' in CommonMark
    # the table under the rollout: entropy and top-5 with the sampled token in bold
    assert "| 1 | ␣3 | 2.31 | **␣3** 0.410 · ␣4 0.220 · ␣&lt; 0.100 · ␣&amp; 0.050 · ↵ 0.010 |" in md
    assert "| 5 | ( | 1.5 | not recorded |" in md
    assert "Example 1: problem math/algebra/17; correct, advantage +1.22, 14 tokens, 5 gated (35.7%)" in md
    assert "Example 2: problem math/geometry/&lt;3&gt;; incorrect, advantage -0.81" in md


def test_title_only_gives_not_available_notes(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        md_path, html_path = write_train_report(tmp_path / "r", {"title": "bare"})
    md, html = md_path.read_text(), html_path.read_text()
    for key in ("summary", "accuracy", "entropy", "selection", "examples", "curves", "timings", "artifacts"):
        assert f"Not available: the run data has no '{key}' section." in md
    assert [n for n in _doc(html).notes if n.startswith("Not available")] == [
        f"Not available: the run data has no '{key}' section."
        for key in (
            "summary",
            "accuracy",
            "entropy",
            "selection",
            "tables",
            "examples",
            "curves",
            "timings",
            "artifacts",
        )
    ]
    assert "data:image/png" not in html and not list((tmp_path / "r" / "plots").iterdir())


def test_partial_sections(tmp_path):
    data = {
        "title": "partial",
        "accuracy": {"base": {"greedy": 0.3, "n_problems": 40}},
        "entropy": {"tau": 1.2},
        "curves": [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        md_path, html_path = write_train_report(tmp_path, data)
    md = md_path.read_text()
    assert "| base | 0.300 | — | 40 | — |" in md
    assert "Not available: no paired (per-problem) difference." in md
    assert "Not available: no per-token entropy values for a histogram." in md
    assert "2 logged steps (step 1 to 2); final loss 0.4." in md
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"accuracy.png", "curves.png"}


def test_stale_plots_removed_and_rewrite(tmp_path):
    write_train_report(tmp_path, {"title": "a", "curves": [{"step": 1, "loss": 1.0}]})
    assert (tmp_path / "plots" / "curves.png").exists()
    md_path, _ = write_train_report(tmp_path, {"title": "b"})
    assert not (tmp_path / "plots" / "curves.png").exists()
    assert md_path.read_text().startswith("# b\n")


def test_malformed_section_is_a_note_not_a_crash(tmp_path):
    data = {"title": "bad", "timings": {"train": 10.0}, "accuracy": ["not", "a", "dict"]}
    with pytest.warns(RuntimeWarning, match="section 'accuracy' could not be rendered"):
        md_path, _ = write_train_report(tmp_path, data)
    md = md_path.read_text()
    assert "Not available: the 'accuracy' section could not be rendered (AttributeError" in md
    assert "| train | 10.0 | 0:00:10 | 100.0% |" in md  # the rest of the report is intact


def test_interval_including_zero_and_scheme_links(tmp_path):
    data = {
        "title": "t",
        "accuracy": {
            "paired": {
                "metric": "avg_at_n",
                "n": 50,
                "mean_diff": 0.01,
                "low": -0.03,
                "high": 0.05,
                "wins": 9,
                "losses": 8,
                "ties": 33,
            }
        },
        "artifacts": {"remote": "https://example.org/x", "js": "javascript:alert(1)"},
    }
    md_path, html_path = write_train_report(tmp_path, data)
    md, html = md_path.read_text(), html_path.read_text()
    assert "[-0.030, +0.050]" in md and "The interval includes zero" in md
    assert "<a href" not in html and "](https" not in md and "](javascript" not in md
    assert _table(_doc(html), "artifact")[1:] == [["remote", "https://example.org/x"], ["js", "javascript:alert(1)"]]


def test_autoescape_of_hostile_text(tmp_path):
    # a <script> in a token, the title, a summary value and a header cell comes out as text, never as markup
    evil = "<script>alert('x')</script>"
    data = {
        "title": evil,
        "summary": {evil: evil},
        "tables": [{"title": evil, "header": [evil, "n"], "rows": [[evil, 1]]}],
        "examples": [{"problem_id": evil, "correct": True, "tokens": [{"text": evil, "entropy": 2.0, "gated": True}]}],
    }
    html = write_train_report(tmp_path, data)[1].read_text(encoding="utf-8")
    assert "<script" not in html
    doc = _doc(html)
    assert _table(doc, "field")[1] == [evil, evil] and _table(doc, evil) == [[evil, "n"], [evil, "1"]]
    rollout = re.search(r'<pre class="rollout">(.*?)</pre>', html, re.S).group(1)
    assert rollout.startswith('<span class="g"') and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;</span>" in rollout


@pytest.mark.parametrize("data", [{}, {"title": ""}, {"title": 3}, ["title"]])
def test_bad_title_is_an_error(tmp_path, data):
    with pytest.raises(ReasonMaxxerError, match="title|dict"):
        write_train_report(tmp_path, data)
