"""Field checks of the config dataclasses, declared once as field metadata.

A config field may carry ``choices`` (a tuple, or a callable returning one, e.g. the loss
registry) and bounds ``ge``/``gt``/``le``/``lt`` in its metadata. `check_fields` applies them
to a constructed instance (each config's ``__post_init__`` calls it, so a config built in code
is checked like one read from TOML); `config.build_config` applies the same `check_value_meta`
at load, where it can also name the file and table.
"""

from __future__ import annotations

import json
from dataclasses import fields

from .errors import ReasonMaxxerError

_BOUNDS = (
    ("ge", ">=", lambda a, b: a >= b),
    ("gt", ">", lambda a, b: a > b),
    ("le", "<=", lambda a, b: a <= b),
    ("lt", "<", lambda a, b: a < b),
)


def show_value(v) -> str:
    """`v` as written in TOML/JSON where possible ("fast", 1.5, null), else its repr."""
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def choices_of(meta) -> tuple | None:
    """The allowed values declared in a field's metadata, or None."""
    c = meta.get("choices")
    return tuple(c()) if callable(c) else c


def check_value_meta(meta, v, where: str) -> None:
    """`v` against the metadata's choices and bounds; None is not checked. Error: ``where: ...``."""
    if v is None:
        return
    c = choices_of(meta)
    if c is not None and v not in c:
        raise ReasonMaxxerError(f"{where}: expected one of {', '.join(map(str, c))}; got {show_value(v)}")
    for key, op, ok in _BOUNDS:
        if key in meta and not ok(v, meta[key]):
            raise ReasonMaxxerError(f"{where}: must be {op} {meta[key]}, got {show_value(v)}")


def check_fields(obj, what: str) -> None:
    """Every field of the dataclass instance `obj` against its metadata (errors: ``what name: ...``)."""
    for f in fields(obj):
        check_value_meta(f.metadata, getattr(obj, f.name), f"{what} {f.name}")
