"""errors.first_line: the one-line summary of an exception used in every one-line error."""

from reasonmaxxer.errors import first_line


def test_first_line_of_a_message_or_the_type_name():
    assert first_line(OSError("  no such file\n  at line 2\n")) == "no such file"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(ValueError("   "), empty="") == ""


class _FakeOOM(RuntimeError):
    """Stands in for torch.OutOfMemoryError (matched by class name, as CUDA raises it)."""


_FakeOOM.__name__ = "OutOfMemoryError"


def test_out_of_memory_becomes_one_line_naming_the_knob():
    from reasonmaxxer.errors import out_of_memory_error

    e = _FakeOOM("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB\nmore")
    err = out_of_memory_error("train", e)
    msg = str(err)
    assert "\n" not in msg and msg.startswith("train: out of memory (CUDA out of memory)")
    assert "micro_batch" in msg and "re-run" in msg
    assert "[eval] batch_size" in str(out_of_memory_error("eval trained", RuntimeError("CUDA error: out of memory")))
    assert "score fewer rows" in str(out_of_memory_error("select + score", e))
    assert out_of_memory_error("train", ValueError("bad")) is None


def test_every_memory_hungry_command_names_its_own_knob():
    """`baseline` and `distill` (CLI command names, as cli/__init__.py passes them) get their own
    flags, not the generic fallback."""
    from reasonmaxxer.errors import out_of_memory_error

    e = _FakeOOM("CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert "--grad-accum" in str(out_of_memory_error("baseline", e))
    assert "--vllm-gpu-memory-utilization" in str(out_of_memory_error("baseline", e))
    assert "--micro-batch" in str(out_of_memory_error("distill", e))
    assert "lower the batch size or the sequence length" in str(out_of_memory_error("compare", e))


def test_torch_out_of_memory_is_recognised():
    import torch

    from reasonmaxxer.errors import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_cli_reports_an_out_of_memory_as_one_line(monkeypatch, capsys):
    import reasonmaxxer.cli as cli
    import reasonmaxxer.cli.parser as cli_parser  # build_parser binds each subcommand's cmd_* from here

    def boom(a):
        raise _FakeOOM("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(cli_parser, "cmd_train", boom)
    rc = cli.main(["train", "--rollouts", "x", "--out", "y"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert err.startswith("reasonmaxxer: error: train: out of memory") and "micro_batch" in err
