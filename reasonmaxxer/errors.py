"""User-facing errors. The CLI prints these as one line on stderr and exits non-zero."""


class ReasonMaxxerError(Exception):
    """An error caused by the user's input or environment, with a message they can act on.

    Messages name the file/row/field at fault (``path:line: reason``) and, where a missing
    package or file is the cause, the command that fixes it.
    """


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """The first line of an exception's message, for a one-line error; `empty` (default: the
    exception's type name) when the message is blank."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if empty is None else empty
