"""User-facing errors. The CLI prints these as one line on stderr and exits non-zero."""


class ReasonMaxxerError(Exception):
    """An error caused by the user's input or environment, with a message they can act on.

    Messages name the file/row/field at fault (``path:line: reason``) and, where a missing
    package or file is the cause, the command that fixes it.
    """
