"""io: read_jsonl (the one JSONL reader, its one-line errors and options) and atomic_dir."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reasonmaxxer.errors import ReasonMaxxerError
from reasonmaxxer.io import atomic_dir, read_jsonl


def _err(path, **kw) -> str:
    with pytest.raises(ReasonMaxxerError) as e:
        list(read_jsonl(path, **kw))
    return str(e.value)


def test_rows_and_locations(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a": 1}\n\n{"a": "\xc3\xa9"}\n')
    assert list(read_jsonl(p)) == [(f"{p}:1", {"a": 1}), (f"{p}:3", {"a": "é"})]


def test_bad_json_and_non_object_name_the_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n{"a": \n')
    assert _err(p) == f"{p}:2: invalid JSON: Expecting value"
    p.write_text('{"a": 1}\n\n[1, 2]\n')
    assert _err(p) == f"{p}:3: expected a JSON object, got list"
    p.write_text('[\n  {"a": 1},\n  {"a": 2}\n]\n')  # a pretty-printed JSON array
    assert _err(p).endswith("(a JSON array file? use one object per line)")


def test_not_utf8_names_the_byte_offset(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": "x\xff"}\n')  # 9 bytes, then 0xff at 8 more
    msg = _err(p)
    assert msg == f"{p}: not UTF-8 text (byte 0xff at byte offset 17, line 2)"
    assert "\n" not in msg


def test_empty_and_missing(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n  \n")
    assert _err(p) == f"{p}:1: empty file (no records)"
    assert list(read_jsonl(p, allow_empty=True)) == []
    assert _err(tmp_path / "none.jsonl").startswith(f"{tmp_path / 'none.jsonl'}: cannot open")


def test_torn_tail(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": ')  # a crash cut the last write short
    assert [r for _, r in read_jsonl(p, torn_tail=True)] == [{"a": 1}, {"a": 2}]
    assert _err(p) == f"{p}:3: invalid JSON: Expecting value"
    p.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')  # a bad line in the middle is still an error
    assert _err(p, torn_tail=True) == f"{p}:2: invalid JSON: Expecting value"


def test_atomic_dir_replaces_keeps_and_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "out"
    atomic_dir(final, lambda d: (d / "a").write_text("1"))
    assert (final / "a").read_text() == "1"
    umask = os.umask(0)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it (mkdtemp: 0700)
    atomic_dir(final, lambda d: (d / "b").write_text("2"))
    assert sorted(p.name for p in final.iterdir()) == ["b"]  # replaced, not merged
    atomic_dir(final, lambda d: (d / "c").write_text("3"), replace=False)
    assert sorted(p.name for p in final.iterdir()) == ["b"]  # the first writer's dir is kept

    def boom(d):
        (d / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_dir(final, boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left beside it
    assert sorted(p.name for p in final.iterdir()) == ["b"]


def _writer(out, then: str) -> subprocess.Popen:
    """A process that starts `atomic_dir(out)`, writes one file, then runs `then` (mid-fill)."""
    code = "import os, sys, time\nfrom pathlib import Path\nfrom reasonmaxxer.io import atomic_dir\n"
    code += f"def fill(d):\n    (d / 'half').write_text('x')\n    {then}\n"
    code += f"atomic_dir(Path({str(out)!r}), fill)\n"
    return subprocess.Popen([sys.executable, "-c", code])


def test_atomic_dir_removes_the_temp_dir_a_killed_process_left(tmp_path):
    out = tmp_path / "out"
    live = _writer(out, "time.sleep(120)")  # still writing
    try:
        for _ in range(300):
            if list(tmp_path.glob(".out.tmp-*")):
                break
            time.sleep(0.1)
        (alive,) = tmp_path.glob(".out.tmp-*")
        killed = _writer(out, "os._exit(9)")  # dies mid-fill without cleaning up, as on SIGKILL
        assert killed.wait() == 9
        (dead,) = set(tmp_path.glob(".out.tmp-*")) - {alive}
        elsewhere = tmp_path / f".out.tmp-otherhost~1-{killed.pid}-abcd"  # another machine's
        elsewhere.mkdir()
        atomic_dir(out, lambda d: (d / "a").write_text("1"))
        assert not dead.exists() and alive.exists() and elsewhere.exists()
        assert (out / "a").read_text() == "1"
    finally:
        live.kill()
        live.wait()


def test_atomic_dir_without_replace_keeps_the_dir_another_process_renamed_in_first(tmp_path, monkeypatch):
    real = os.replace

    def another_process_first(src, dst):  # the other writer's rename lands between check and rename
        Path(dst).mkdir()
        (Path(dst) / "theirs").write_text("1")
        real(src, dst)

    monkeypatch.setattr(os, "replace", another_process_first)
    atomic_dir(tmp_path / "kept", lambda d: (d / "mine").write_text("2"), replace=False)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["theirs"]
    with pytest.raises(OSError):  # replacing: the race is an error, not a silent loss
        atomic_dir(tmp_path / "raced", lambda d: (d / "mine").write_text("2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "raced"]  # no temp dir left
