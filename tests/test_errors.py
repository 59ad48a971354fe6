"""errors.first_line: the one-line summary of an exception used in every one-line error."""

from reasonmaxxer.errors import first_line


def test_first_line_of_a_message_or_the_type_name():
    assert first_line(OSError("  no such file\n  at line 2\n")) == "no such file"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(ValueError("   "), empty="") == ""
