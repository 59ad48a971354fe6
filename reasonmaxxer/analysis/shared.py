"""What `tokens.run_analyze` and `intervene.run_intervene` share: loading the base/tuned pair
(problems, template, both models, the same vocabulary checked, the rendered prompt ids) and
writing strict JSON (`jsonable`: nan/inf -> null).
"""

from __future__ import annotations

import math

from ..errors import ReasonMaxxerError, first_line


def check_same_tokenizer(tok_a, tok_b) -> None:
    """Raise ReasonMaxxerError unless both tokenizers map the same ids to the same tokens."""
    na, nb = len(tok_a), len(tok_b)
    if na != nb:
        raise ReasonMaxxerError(
            f"analysis: the base and tuned tokenizers differ in size ({na} vs {nb} tokens); "
            "token-level comparison needs the same vocabulary"
        )
    ia = {i: t for t, i in tok_a.get_vocab().items()}
    ib = {i: t for t, i in tok_b.get_vocab().items()}
    for i in sorted(set(ia) | set(ib)):
        if ia.get(i) != ib.get(i):
            raise ReasonMaxxerError(
                f"analysis: the base and tuned tokenizers differ at token id {i} "
                f"({ia.get(i)!r} vs {ib.get(i)!r}); token-level comparison needs the same vocabulary"
            )


def jsonable(x):
    """nan/inf -> None (strict JSON), recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def _load(spec: str, role: str, what: str):
    """`load_model(spec)`, any failure as one ReasonMaxxerError line naming the role (base/tuned).

    Every exception counts as "fails to load" (a corrupt config, unknown architecture, truncated
    weights each raise a different type); REASONMAXXER_DEBUG=1 shows the chained traceback."""
    from ..models import load_model

    try:
        return load_model(spec)
    except ReasonMaxxerError as e:
        raise ReasonMaxxerError(f"{what}: {role} model: {e}") from e
    except Exception as e:  # noqa: BLE001 -- transformers, peft and safetensors raise many types for bad files
        first = first_line(e)
        raise ReasonMaxxerError(
            f"{what}: could not load the {role} model {spec!r} ({type(e).__name__}: {first})"
        ) from e


def load_pair(base_spec: str, tuned_spec: str, problems_spec: str, *, template: str, limit, data_dir, what: str):
    """Problems, template, both models (same tokenizer checked) and the rendered prompt ids.

    Returns (problems, template, base, tuned, tokenizer, prompts_ids). Shared by analyze and intervene.
    """
    from ..data.benchmarks import load_problems
    from ..data.prompts import get_template, render_prompt
    from ..models import resolve_spec

    problems = load_problems(problems_spec, data_dir=data_dir, limit=limit)
    if not problems:
        raise ReasonMaxxerError(f"{what}: problem set {problems_spec!r} is empty (limit={limit})")
    tmpl = get_template(template)
    for spec, role in ((base_spec, "base"), (tuned_spec, "tuned")):  # missing files: fail before loading anything
        try:
            resolve_spec(spec)
        except ReasonMaxxerError as e:
            raise ReasonMaxxerError(f"{what}: {role} model: {e}") from e
    base, btok = _load(base_spec, "base", what)
    tuned, ttok = _load(tuned_spec, "tuned", what)
    check_same_tokenizer(btok, ttok)
    vb, vt = base.get_output_embeddings().weight.shape[0], tuned.get_output_embeddings().weight.shape[0]
    if vb != vt:
        raise ReasonMaxxerError(
            f"{what}: the base and tuned models have different output vocabularies "
            f"({vb} vs {vt} logits); token-level comparison needs the same vocabulary"
        )
    prompts = []
    for p in problems:
        ids = list(btok(render_prompt(tmpl, p.question, btok), add_special_tokens=False)["input_ids"])
        if not ids:
            raise ReasonMaxxerError(f"{what}: problem {p.id} renders to an empty prompt")
        prompts.append(ids)
    return problems, tmpl, base, tuned, btok, prompts
