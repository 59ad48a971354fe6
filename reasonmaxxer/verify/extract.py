"""Answer extraction: the final answer of a completion, in linear time (see `reasonmaxxer.verify`).

strict: the last closed ``\\boxed{...}``/``\\fbox{...}``, else the text after the last "answer is";
lenient: as strict, else the last number.
"""

from __future__ import annotations

import collections
import re

from ..errors import ReasonMaxxerError

MAX_ANSWER_CHARS = 512
"""Longest extracted answer or gold (characters) that is handed to math-verify."""

_BOX_TOKEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
_ANSWER_IS_RE = re.compile(r"answer\s+is\b", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")
_COMMA_WORD_RE = re.compile(r",\s+(?=[A-Za-z]{2})")
_NUMBER_RE = re.compile(
    r"\\[dt]?frac\{-?\d+\}\{\d+\}"
    r"|(?:(?<![\w)\]}])-)?(?<![\w.])\d+(?:,\d{3}(?!\d))*(?:\.\d+)?(?:/\d+)?"
)
UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def last_boxed(text: str) -> str | None:
    """Content (stripped) of the last-closing non-empty ``\\boxed{...}``/``\\fbox{...}``; None if none.

    Braces are balanced; escaped ``\\{``/``\\}`` are literal. With nested boxes the outer one
    closes last and wins. A box whose brace never closes is ignored. Used both to grade
    completions and to read benchmark reference solutions. One pass over the brace tokens
    with a stack: O(len(text)) time and memory.
    """
    stack: list[int] = []  # content start for a box opening, -1 for a plain "{"
    best = None
    for m in _BOX_TOKEN_RE.finditer(text):
        tok = m.group()
        if tok[0] == "\\":
            if len(tok) == 2:  # \{ or \}: a literal brace
                continue
            stack.append(m.end())
        elif tok == "{":
            stack.append(-1)
        elif stack:
            start = stack.pop()
            end = m.start()
            # Only short spans are sliced, so nested boxes cannot make this quadratic.
            if start >= 0 and (end - start > MAX_ANSWER_CHARS or text[start:end].strip()):
                best = (start, end)
    return None if best is None else text[best[0] : best[1]].strip()


def _clean(answer: str) -> str:
    """Strip delimiters a model puts around an answer: whitespace, $, \\( \\), **, trailing '.'."""
    a = answer.strip()
    if a.startswith(":"):
        a = a[1:]
    a = UNESCAPED_DOLLAR_RE.sub("", a).replace("**", "").strip()
    if a.startswith("\\(") and a.endswith("\\)") or a.startswith("\\[") and a.endswith("\\]"):
        a = a[2:-2].strip()
    return a.rstrip(".").strip()


def _answer_is(text: str) -> str | None:
    """The X of the last "answer is X", or None. Looks at most MAX_ANSWER_CHARS + 1 chars ahead."""
    last = collections.deque(_ANSWER_IS_RE.finditer(text), maxlen=1)
    if not last:
        return None
    start = last[0].end()
    seg = text[start : start + MAX_ANSWER_CHARS + 8].lstrip(" \t:")
    seg = seg.split("\n", 1)[0]
    m = _SENTENCE_END_RE.search(seg)
    if m:
        seg = seg[: m.start()]
    m = _COMMA_WORD_RE.search(seg)
    if m:
        seg = seg[: m.start()]
    answer = _clean(seg)
    return answer or None


def _last_number(text: str) -> str | None:
    last = collections.deque(_NUMBER_RE.finditer(text), maxlen=1)  # the deque runs in C
    return last[0].group() if last else None


def extract_answer(completion: str, mode: str = "strict") -> tuple[str | None, str | None]:
    """(answer text, source) from a completion; (None, None) when nothing is found.

    ``mode``: "strict" (last box, else "answer is X") or "lenient" (strict, else the last
    number). The text is returned in full (it may exceed MAX_ANSWER_CHARS). Linear time.
    """
    if mode not in ("strict", "lenient"):
        raise ReasonMaxxerError(f"extract_answer: mode must be 'strict' or 'lenient', got {mode!r}")
    if not isinstance(completion, str):
        raise ReasonMaxxerError(f"extract_answer: completion must be str, got {type(completion).__name__}")
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed, "boxed"
    answer = _answer_is(completion)
    if answer is not None:
        return answer, "answer_is"
    if mode == "lenient":
        number = _last_number(completion)
        if number is not None:
            return number, "last_number"
    return None, None
