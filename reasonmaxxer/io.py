"""io: the one JSONL reader, atomic writes, package versions, config hashes, TOML."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ReasonMaxxerError


def read_jsonl(path: Path, *, allow_empty: bool = False, torn_tail: bool = False) -> Iterator[tuple[str, dict]]:
    """Rows of a JSON Lines file located as ``path:line``; blank lines are skipped.

    The one JSONL reader. Every malformed input is a one-line `ReasonMaxxerError`: invalid
    JSON or a non-object row names ``path:line``, a byte that is not UTF-8 names the file and
    its byte offset, a file with no records names ``path:1`` (unless ``allow_empty``).
    ``torn_tail``: a last line that is invalid JSON and has no newline (a write cut short by a
    crash) is dropped instead of raising.
    """
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise ReasonMaxxerError(f"{path}: cannot open: {exc.strerror or exc}") from None
    seen = offset = 0
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start]
                raise ReasonMaxxerError(
                    f"{path}: not UTF-8 text (byte 0x{bad:02x} at byte offset {offset + exc.start}, line {lineno})"
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if torn_tail and not raw.endswith(b"\n"):  # the last line, cut short
                    break
                hint = " (a JSON array file? use one object per line)" if line.lstrip()[:1] == "[" else ""
                raise ReasonMaxxerError(f"{where}: invalid JSON: {exc.msg}{hint}") from None
            if not isinstance(row, dict):
                raise ReasonMaxxerError(f"{where}: expected a JSON object, got {type(row).__name__}")
            seen += 1
            yield where, row
    if not seen and not allow_empty:
        raise ReasonMaxxerError(f"{path}:1: empty file (no records)")


_PACKAGES = ("reasonmaxxer", "torch", "transformers", "peft", "accelerate", "math-verify", "pyarrow", "trl", "vllm")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def json_ready(obj):
    """`obj` as JSON writes it and reads it back: paths and other values JSON lacks as strings."""
    return json.loads(json.dumps(obj, default=str))


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of a config dict (the identity of a stage's inputs)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _atomic_file(path: Path, write) -> None:
    """`write(tmp_path)` fills a temp file beside `path`; it is fsynced, made readable (0644:
    mkstemp creates 0600) and renamed over `path`. On error the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_file(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def _temp_owner() -> str:
    """This process's machine, as a temp dir name part: the host name and, on Linux, the pid
    namespace (containers sharing a host name and a filesystem have separate pids)."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return f"{platform.node()}~{ns}"


def _remove_dead_temp_dirs(parent: Path, prefix: str, owner: str) -> None:
    """Remove `parent/<prefix><owner>-<pid>-*` temp dirs of `atomic_dir` whose process, on this
    machine (`_temp_owner`), is gone (killed mid-write: a merged 8B checkpoint's temp dir holds
    ~16 GB). A temp dir of a live process, or of another machine sharing the filesystem, is
    left alone (a reused pid only keeps a dead one's)."""
    for p in parent.glob(f"{glob.escape(prefix)}*"):
        who, _, pid = p.name[len(prefix) :].rpartition("-")[0].rpartition("-")
        if who != owner or not pid.isdigit() or not p.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (PermissionError, OverflowError):
            pass  # alive (another user's process), or not a pid


def atomic_dir(final: Path, fill, *, replace: bool = True) -> Path:
    """Create directory `final` atomically: `fill(tmp_dir)` writes into a temp dir beside it,
    which then takes the name `final`. An existing `final` is removed first, or with
    `replace=False` kept (another process won the race) and the temp dir discarded. The
    directory gets the umask's mode, as `mkdir` does (mkdtemp would make it 0700). On error
    nothing changes; a temp dir that a killed process left is removed by the next call for
    `final` on the same machine."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix, owner = f".{final.name}.tmp-", _temp_owner()
    _remove_dead_temp_dirs(final.parent, prefix, owner)
    while True:
        tmp = final.parent / f"{prefix}{owner}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    try:
        fill(tmp)
        if final.exists() and not replace:
            shutil.rmtree(tmp)
            return final
        if final.exists():
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if replace or not final.is_dir():
                raise
            shutil.rmtree(tmp)  # another process took the name since the check above
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def atomic_write_table(path: Path, table: pa.Table) -> None:
    _atomic_file(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def read_toml(path: str | Path | None) -> dict:
    """The tables of a TOML config file ({} for None); a missing or invalid file is a one-line error."""
    import tomllib

    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ReasonMaxxerError(f"{p}: no such config file")
    try:
        return tomllib.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ReasonMaxxerError(f"{p}: not UTF-8 text (invalid byte at offset {e.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ReasonMaxxerError(f"{p}: invalid TOML ({e})") from None
