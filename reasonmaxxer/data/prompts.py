"""Prompt templates: how a problem's question becomes the text a model continues.

Kinds:
- ``raw``/``custom``: a completion prompt; ``{question}`` is replaced by the question text.
  Only that placeholder is substituted (``str.replace``, not ``str.format``), so questions
  with LaTeX braces such as ``\\frac{1}{2}`` are safe.
- ``chat``: one user message (the template applied to the question), rendered with the
  tokenizer's chat template and a generation prompt.
- ``fewshot``: like ``chat``, preceded by worked examples as earlier user/assistant turns.
A tokenizer without a chat template (or no tokenizer) renders chat kinds as a plain
``User: ...\\nAssistant:`` transcript instead.

Built-in templates (`TEMPLATES`): ``raw`` and ``mistral`` are the paper's completion
prompts for base models; ``chat`` is the paper's instruction for chat models; ``fewshot``
adds three short arithmetic examples that end ``The answer is \\boxed{N}.``, the format we
want a small instruct model (SmolLM2-135M-Instruct) to copy. Each shows one step: a
two-step arithmetic example made SmolLM2-135M-Instruct append a spurious second step to
one-step sums. The example names (Mia, Sam) are not used by `reasonmaxxer.arith` and it
never writes a three-digit operand, so an example is never also a generated problem.
``verbose`` works the same three problems at length (restate, compute, check; ~95-120
tokens each): SmolLM2-135M-Instruct's completions then average ~90 tokens instead of ~26
(the method study's ``long`` regime). ``paper`` is the official code's base-model prompt
(``qwen_boxed``), line breaks included.
``raw``, ``paper`` and ``mistral`` declare stop strings (``Problem:``/``Question:``, ``Human:``,
``Assistant:``); the chat kinds and custom templates declare none.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ReasonMaxxerError

__all__ = [
    "PromptTemplate",
    "TEMPLATES",
    "KINDS",
    "get_template",
    "render_prompt",
    "build_messages",
    "template_fingerprint",
    "RAW_STOP",
]


KINDS = ("raw", "chat", "fewshot", "custom")


PLACEHOLDER = "{question}"


@dataclass(frozen=True)
class PromptTemplate:
    """A named prompt format; ``template`` contains ``{question}``.

    ``fewshot`` holds (question, worked answer) pairs shown before the real question (chat
    kinds only); ``system`` is an optional system message (chat kinds), or a preamble followed
    by a blank line (raw kinds). ``stop``: the template's stop strings, the default of the
    sampling/eval ``stop`` (a completion prompt runs on into the next "Problem:" or a
    "Human:" turn; a chat template ends its turn with an EOS token and needs none).
    """

    name: str
    kind: str
    template: str
    fewshot: tuple[tuple[str, str], ...] = ()
    system: str | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ReasonMaxxerError(
                f"prompt template {self.name!r}: unknown kind {self.kind!r}; valid: {', '.join(KINDS)}"
            )
        if PLACEHOLDER not in self.template:
            raise ReasonMaxxerError(f"prompt template {self.name!r} has no {PLACEHOLDER} placeholder")
        if self.fewshot and self.kind not in ("chat", "fewshot"):
            raise ReasonMaxxerError(f"prompt template {self.name!r}: few-shot examples need kind 'chat' or 'fewshot'")


_CHAT_INSTRUCTION = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."


FEWSHOT_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "Mia has 15 stickers. She gives 8 stickers to her brother. How many stickers does Mia have left?",
        "Mia has 15 - 8 = 7 stickers left. The answer is \\boxed{7}.",
    ),
    ("What is 125 + 14?", "125 + 14 = 139. The answer is \\boxed{139}."),
    (
        "Sam packs 4 boxes with 6 apples in each box. How many apples does Sam pack?",
        "Sam packs 4 * 6 = 24 apples. The answer is \\boxed{24}.",
    ),
)


# the same three problems worked verbosely (~95-120 tokens each: restate, compute, check): the
# method study's `long` regime, whose base completions are ~3.5x the terse template's
VERBOSE_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        FEWSHOT_EXAMPLES[0][0],
        "Let's work through this step by step. Mia starts with 15 stickers. She gives 8 of them to her brother, "
        "so she has fewer than before, and we subtract. We compute 15 - 8. Counting down 8 from 15 gives 7, "
        "so 15 - 8 = 7. Let's check: 7 + 8 = 15, which is the number she started with. So Mia has 7 stickers "
        "left. The answer is \\boxed{7}.",
    ),
    (
        FEWSHOT_EXAMPLES[1][0],
        "Let's work through this step by step. We need to add 125 and 14. We split 14 into 10 and 4. First, "
        "125 + 10 = 135. Then, 135 + 4 = 139. So 125 + 14 = 139. Let's check: 139 - 14 = 125, which is the "
        "number we started with. The answer is \\boxed{139}.",
    ),
    (
        FEWSHOT_EXAMPLES[2][0],
        "Let's work through this step by step. Sam packs 4 boxes, and each box holds 6 apples. To find the "
        "total, we multiply the number of boxes by the apples in each box. We compute 4 * 6 = 24. Let's check: "
        "6 + 6 + 6 + 6 = 24, which matches. So Sam packs 24 apples. The answer is \\boxed{24}.",
    ),
)


# where a completion prompt's continuation starts a new problem or a dialogue turn
RAW_STOP: tuple[str, ...] = ("Problem:", "Human:", "Assistant:")


TEMPLATES: dict[str, PromptTemplate] = {
    "raw": PromptTemplate(
        "raw",
        "raw",
        "Solve the following math problem step by step. Put your final answer in \\boxed{}. "
        "Problem: {question} Solution:",
        stop=RAW_STOP,
    ),
    # chat kinds: no stop strings (the turn ends with an EOS token). The demo's template is
    # `fewshot`; it must keep stop=() so the demo's completions (and figures) do not change.
    "chat": PromptTemplate("chat", "chat", _CHAT_INSTRUCTION),
    "fewshot": PromptTemplate("fewshot", "fewshot", _CHAT_INSTRUCTION, fewshot=FEWSHOT_EXAMPLES),
    "verbose": PromptTemplate("verbose", "fewshot", _CHAT_INSTRUCTION, fewshot=VERBOSE_EXAMPLES),
    "mistral": PromptTemplate(
        "mistral", "raw", "Question: {question} Answer: Let's think step by step.", stop=("Question:",) + RAW_STOP[1:]
    ),
    # the official prompt for base models: prompt_style "qwen_boxed" of the official
    # reasonmaxxer/eval_lib.py (build_prompt, l. 258-269) with its "legacy" stop profile
    # (reasonmaxxer/config.py l. 44-51: "Human:"/"Assistant:", each also after 1-2 newlines,
    # which these substrings cover). `raw` above is the same words on one line.
    "paper": PromptTemplate(
        "paper",
        "raw",
        "Solve the following math problem step by step. Put your final answer in \\boxed{}.\n\n"
        "Problem: {question}\n\nSolution:",
        stop=("Human:", "Assistant:"),
    ),
}


def get_template(spec: str | PromptTemplate) -> PromptTemplate:
    """A template from a name in TEMPLATES, a file path, or a literal string with ``{question}``.

    A file's whole text (trailing newline removed) becomes a ``custom`` completion template
    named ``file:<name>``; it must contain ``{question}``. A literal is named ``custom``.
    """
    if isinstance(spec, PromptTemplate):
        return spec
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if PLACEHOLDER in spec:
        return PromptTemplate("custom", "custom", spec)
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ReasonMaxxerError(f"{path}: cannot read prompt template: {exc}") from None
        if PLACEHOLDER not in text:
            raise ReasonMaxxerError(f"{path}:1: prompt template file has no {PLACEHOLDER} placeholder")
        return PromptTemplate(f"file:{path.name}", "custom", text.removesuffix("\n"))
    looks_like_path = path.suffix != "" or "/" in spec or "\\" in spec
    reason = "no such prompt template file" if looks_like_path else "unknown prompt template"
    raise ReasonMaxxerError(
        f"{spec}: {reason}; use one of {', '.join(TEMPLATES)}, a .txt file containing "
        f"{PLACEHOLDER}, or a literal string containing {PLACEHOLDER}"
    )


def _fill(template: str, question: str) -> str:
    return template.replace(PLACEHOLDER, question)


def build_messages(template: PromptTemplate, question: str) -> list[dict[str, str]]:
    """Chat messages (role, content) for a chat/fewshot template: system, examples, question."""
    messages = [{"role": "system", "content": template.system}] if template.system else []
    for q, a in template.fewshot:
        messages += [{"role": "user", "content": _fill(template.template, q)}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": _fill(template.template, question)})
    return messages


def _transcript(messages: list[dict[str, str]]) -> str:
    """Plain ``System:/User:/Assistant:`` transcript ending with an open ``Assistant:`` turn."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines + ["Assistant:"])


def render_prompt(template: PromptTemplate, question: str, tokenizer=None) -> str:
    """The prompt text for one question.

    raw/custom: the template with ``{question}`` replaced (the tokenizer is unused).
    chat/fewshot: ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True)``; a tokenizer without a chat template, or None, gives the
    `_transcript` fallback. The result may start with the tokenizer's BOS text; tokenize it
    without adding special tokens again.
    """
    if template.kind in ("raw", "custom"):
        if template.system:
            return template.system + "\n\n" + _fill(template.template, question)
        return _fill(template.template, question)
    messages = build_messages(template, question)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return _transcript(messages)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a malformed Jinja template in a user's tokenizer
        raise ReasonMaxxerError(
            f"prompt template {template.name!r}: the tokenizer's chat template failed: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(text, str):
        raise ReasonMaxxerError(
            f"prompt template {template.name!r}: apply_chat_template returned {type(text).__name__}, not text"
        )
    return text


def template_fingerprint(t: PromptTemplate) -> str:
    """sha256 hex digest of what shapes the prompt (kind, template, examples, system); not the
    name, nor the stop strings (the resolved stop is part of the sampling config's hash)."""
    payload = {k: v for k, v in asdict(t).items() if k not in ("name", "stop")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
