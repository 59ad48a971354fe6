"""The "Gated tokens in context" examples of the training report: one rollout with its gated
tokens marked and numbered, and a table of those tokens (base entropy, base top-5), as Markdown
lines (`example_markdown`) and as the context of the ``example`` block of report.html.j2
(`example_html`). Token text is hostile: escaped for each format, whitespace made visible."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import escape

from .format import as_float, fmt_number, fmt_prob, visible_whitespace
from .tables import Raw, Table, md_bold, md_escape

GATED_HEADER = ("#", "token", "H (nats)", "base top-5")


@dataclass(frozen=True)
class Example:
    index: int
    ex: Mapping[str, Any]
    tau: float | None
    scale: tuple[float, float]  # entropy (nats) mapped to the lightest / darkest highlight
    max_tokens: int


def is_gated(tok: Mapping[str, Any], tau: float | None) -> bool:
    g = tok.get("gated")
    if g is None and tau is not None and as_float(tok.get("entropy")) is not None:
        return float(tok["entropy"]) > tau
    return bool(g)


def _top5(tok: Mapping[str, Any]) -> list[tuple[str, float | None]]:
    """The token's base top-5 as [(text, prob)], accepting [text, prob] pairs or {text, prob} dicts."""
    out = []
    for alt in tok.get("top5") or []:
        if isinstance(alt, Mapping):
            out.append((str(alt.get("text", alt.get("token", ""))), as_float(alt.get("prob"))))
        else:
            out.append((str(alt[0]), as_float(alt[1]) if len(alt) > 1 else None))
    return out


_LINE_START = re.compile(r"^(\d{1,9})([.)])")


def _md_rollout_line(line: str) -> str:
    """One line of a rollout, safe to put after '> ': no accidental list/heading/code block."""
    stripped = line.lstrip(" ")
    line = "&nbsp;" * (len(line) - len(stripped)) + stripped
    if _LINE_START.match(line):
        line = _LINE_START.sub(lambda m: m.group(1) + "\\" + m.group(2), line, count=1)
    elif line[:1] in ("#", "-", "+", "=", ":"):
        line = "\\" + line
    return line


def _example_header(e: Example, tokens: Sequence[Mapping[str, Any]], n_gated: int) -> str:
    ex = e.ex
    correct = ex.get("correct")
    parts = [("correct" if correct else "incorrect") if correct is not None else "correctness unknown"]
    if as_float(ex.get("advantage")) is not None:
        parts.append(f"advantage {float(ex['advantage']):+.2f}")
    parts.append(f"{len(tokens)} tokens")
    parts.append(f"{n_gated} gated ({100 * n_gated / max(len(tokens), 1):.1f}%)")
    return f"Example {e.index}: problem {ex.get('problem_id', '?')}; " + ", ".join(parts)


def _gated_rows(gated: Sequence[Mapping[str, Any]], bold: Callable[[str], str], esc: Callable[[str], str]):
    """Rows [#, token, H, top-5] for the table under a rollout."""
    rows = []
    for k, tok in enumerate(gated, 1):
        text = str(tok.get("text", ""))
        alts = _top5(tok)
        top = (
            " · ".join(
                (bold(esc(visible_whitespace(t))) if t == text else esc(visible_whitespace(t))) + f" {fmt_prob(p)}"
                for t, p in alts
            )
            if alts
            else "not recorded"
        )
        rows.append([str(k), esc(visible_whitespace(text)), fmt_number(tok.get("entropy"), 3), top])
    return rows


def example_markdown(e: Example) -> list[str]:
    tokens = list(e.ex.get("tokens") or [])
    shown = tokens[: e.max_tokens]
    out: list[str] = []
    gated: list[Mapping[str, Any]] = []
    prev = ""  # last character emitted so far: decides whether ** can open
    for tok in shown:
        text = str(tok.get("text", "")).replace("\t", "    ")
        if not is_gated(tok, e.tau):
            piece = md_escape(text)
        else:
            gated.append(tok)
            core = text.strip()
            if core:
                lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
                core_md = md_escape(core.replace("\r", "").replace("\n", "↵"))
            else:  # whitespace-only token: a visible marker, then its newlines as line breaks
                lead, trail, core_md = "", text.replace(" ", ""), visible_whitespace(text)
            piece = lead + md_bold(core_md, (lead or prev)[-1:]) + f"<sup>{len(gated)}</sup>" + trail
        out.append(piece)
        prev = piece[-1:] or prev
    body = "".join(out).replace("\r", "").split("\n")
    lines = [f"**{md_escape(_example_header(e, tokens, len(gated)))}**", ""]
    lines += ["> " + _md_rollout_line(ln) + "  " for ln in body]
    if len(tokens) > len(shown):
        lines += [">", f"> _… {len(tokens) - len(shown)} more tokens not shown._"]
    lines.append("")
    if gated:
        rows = _gated_rows(gated, lambda s: f"**{s}**", md_escape)
        lines += Table(GATED_HEADER, [[r[0], Raw(r[1]), r[2], Raw(r[3])] for r in rows], "rlrl").markdown()
    else:
        lines.append("_No gated tokens in the part shown._")
    return lines


def _tooltip(k: int, tok: Mapping[str, Any], tau: float | None) -> str:
    h = as_float(tok.get("entropy"))
    lines = [
        f"#{k}  H = {h:.3f} nats" + (f" (tau {tau:.3g})" if tau is not None else "")
        if h is not None
        else f"#{k}  H not recorded"
    ]
    alts = _top5(tok)
    if alts:
        lines.append("base top-5:")
        lines += [f"  {fmt_prob(p):>7}  {visible_whitespace(t)}" for t, p in alts]
    else:
        lines.append("top-5 not recorded")
    return "\n".join(lines)


def _html_escape(s: str) -> str:
    return str(escape(s))


def example_html(e: Example) -> dict[str, Any]:
    """Context of one example for report.html.j2: header, pieces of the rollout (plain text, or a
    gated token with its highlight style, tooltip, number k and the newlines after it), the count
    of tokens not shown, and the table of gated tokens (None when there are none)."""
    tokens = list(e.ex.get("tokens") or [])
    shown = tokens[: e.max_tokens]
    lo, hi = e.scale
    pieces: list[dict[str, Any]] = []
    gated: list[Mapping[str, Any]] = []
    for tok in shown:
        text = str(tok.get("text", ""))
        if not is_gated(tok, e.tau):
            pieces.append({"text": text, "k": 0})
            continue
        gated.append(tok)
        h = as_float(tok.get("entropy"))
        frac = 0.5 if h is None or hi <= lo else min(max((h - lo) / (hi - lo), 0.0), 1.0)
        pieces.append(
            {
                "text": text if text.strip() else visible_whitespace(text),
                "k": len(gated),
                "style": f"background:rgba(255,{int(200 - 110 * frac)},0,{0.25 + 0.6 * frac:.2f})",
                "title": _tooltip(len(gated), tok, e.tau),
                "after": "" if text.strip() else text.replace(" ", ""),  # keep the token's newlines as line breaks
            }
        )
    table = None
    if gated:
        rows = _gated_rows(gated, lambda s: f"<b>{s}</b>", _html_escape)
        table = Table(
            GATED_HEADER, [[r[0], Raw(r[1]), r[2], Raw(r[3])] for r in rows], "rlrl", classes=["r", "tok", "r", "alts"]
        )
    return {
        "header": _example_header(e, tokens, len(gated)),
        "pieces": pieces,
        "more": len(tokens) - len(shown),
        "table": table,
    }
