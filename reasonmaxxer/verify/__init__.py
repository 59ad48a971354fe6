"""Grading: extract a final answer from a completion and compare it with the gold via math-verify.

Modules: `extract` (answer extraction), `grading` (comparison, `grade`), `pool` (`grade_many`:
worker processes with an outer deadline per item). The public API is re-exported here.

Extraction (our code, linear time in the completion length)
  strict   1. the content of the LAST ``\\boxed{...}`` or ``\\fbox{...}`` that closes (balanced
              braces; escaped ``\\{``/``\\}`` are ignored; an unclosed ``\\boxed{`` is skipped, so an
              earlier closed one still counts; "last" = the one whose closing brace comes last, so
              ``\\boxed{\\boxed{7}}`` gives the outer content). Empty boxes are skipped.
           2. else the text after the LAST "answer is" (case-insensitive; covers "The answer is X",
              "the final answer is: X") up to the end of the line or sentence (a ``.`` followed by
              whitespace or the end), with ``$``, ``\\(``/``\\)``, ``**`` and a trailing ``.`` removed.
  lenient  as strict; only if strict finds nothing, the LAST number in the completion: integers,
           negatives, decimals, thousands separators (``1,080``), fractions (``3/4``,
           ``\\frac{3}{4}``).
  The source is reported as ``"boxed"``, ``"answer_is"`` or ``"last_number"``.

Comparison (math-verify's own ``parse``/``verify``, no symbolic equality of ours)
  The extracted text and the gold are each parsed by math-verify, first as LaTeX wrapped in
  ``$...$`` (``LatexExtractionConfig``); if that yields no sympy object, as a plain expression
  (``ExprExtractionConfig``). A number followed only by words ("18 dollars") is reduced to the
  number first. ``verify(gold, pred)`` is then tried for each pair of parses (gold first: it is
  asymmetric). So ``025`` == ``25``, ``27.0`` == ``27``, ``0.5`` == ``\\frac{1}{2}``, ``1,080`` ==
  ``1080``, ``3, 5`` == ``5, 3`` (a set), tuples/intervals/radicals are compared symbolically.

Limits and guarantees
  * Answers (and golds) longer than ``MAX_ANSWER_CHARS`` characters are never handed to
    math-verify: the verdict is ``correct=False, reason="error: answer too long (N chars > 512)"``
    and ``extracted`` holds the first 512 characters plus "…".
  * math-verify's own timeouts (``signal.alarm``, whole seconds) run inside each call; a call
    that times out gives ``reason="timeout"``, never a silent ``False``.
  * ``grade_many(workers>=1)`` adds an OUTER deadline per item (``timeout_s``, measured from
    the moment a worker starts the item, checked at least every 0.25 s): a worker past it is
    SIGKILLed and replaced, the item gets ``Verdict(False, extracted, source, "timeout")`` in
    both modes (the extraction is redone in the caller; it is linear), and the other items of
    its batch are re-queued. An item whose worker dies under it (segfault, OOM kill) is retried
    on a fresh worker; on the third death it gets ``reason="error: worker died (exit code N)"``.
    ``workers=0`` and ``grade()`` have no outer deadline: they rely on math-verify's alarms,
    which cannot interrupt a long call inside C code.
  * Workers are started with the 'forkserver' method (else 'spawn'): callers' scripts need the
    usual ``if __name__ == "__main__":`` guard. Start-up costs ~0.2-1 s per call.
  * Cost: a math-verify LaTeX parse takes ~5-20 ms, so comparison results (except timeouts) are
    cached per process by (gold, answer); rollouts of one problem repeat few answers.
    Measured on 2 shared, busy CPU cores: ~250-350 items/s for ~1.5 kB completions.

Known limitations
  * Only "answer is" phrases are recognised besides boxes: "Answer: 7", "#### 7" and a bare
    bold "**7**" count only through lenient's last number. "The answer is four." extracts
    "four", which math-verify reads as symbols: a mismatch.
  * Several boxes (``\\boxed{3}, \\boxed{5}``) give the last box only, so a multi-answer gold
    "3, 5" is graded against "5".
  * Lenient's last number may be a number from the reasoning, not the answer (that is the point
    of reporting both modes); ``.5`` (no leading digit) and unicode minus are not recognised;
    "1,234" is read as one number (thousands separator), "(3,5)" as 3 and 5.
  * "answer is X, because ..." keeps "X" only when the comma is followed by a word of two or
    more letters; otherwise the whole tail up to the sentence end is parsed.
  * Multiple-choice letters become sympy symbols (``B`` == ``(B)`` == ``\\text{(B)}``); there is
    no StringExtractionConfig handling.
"""

from .extract import MAX_ANSWER_CHARS, extract_answer, last_boxed
from .grading import Grade, Verdict, grade, parse_failures
from .pool import TEST_SLEEP_MARKER, grade_many

__all__ = [
    "MAX_ANSWER_CHARS",
    "TEST_SLEEP_MARKER",
    "Grade",
    "Verdict",
    "extract_answer",
    "grade",
    "grade_many",
    "last_boxed",
    "parse_failures",
]
