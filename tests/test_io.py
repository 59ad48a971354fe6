"""io: read_jsonl (the one JSONL reader, its one-line errors and options) and atomic_dir."""

import os
import platform
import subprocess
import sys

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
    assert final.stat().st_mode & 0o777 == 0o755  # readable by the group, as atomic files are 0644
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


def test_atomic_dir_removes_the_temp_dir_a_killed_process_left(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = platform.node()
    left = {
        "dead": tmp_path / f".out.tmp-{host}-{dead.pid}-abc",  # killed mid-write: removed
        "alive": tmp_path / f".out.tmp-{host}-{os.getpid()}-def",  # still writing: kept
        "other host": tmp_path / f".out.tmp-{host}x-{dead.pid}-ghi",  # maybe alive there: kept
        "other name": tmp_path / f".outer.tmp-{host}-{dead.pid}-jkl",  # another dir's: kept
    }
    for d in left.values():
        d.mkdir()
        (d / "model.safetensors").write_text("half")
    atomic_dir(tmp_path / "out", lambda d: (d / "a").write_text("1"))
    assert {k for k, d in left.items() if d.exists()} == {"alive", "other host", "other name"}
    assert (tmp_path / "out" / "a").read_text() == "1"
