"""The rollout store: Parquet shards plus a self-describing manifest.

Layout of a store directory::

    manifest.json            what produced the rollouts: stage, config, model fingerprint,
                             prompt template, sampling config, seed, package versions,
                             data hash, and the config hash that decides resumption
    shards/shard-00000.parquet
    shards/shard-00001.parquet ...
    shards/00000.lock ...    per-shard locks (see `ShardClaims`); manifest.lock guards the manifest

One row per rollout (see `ROLLOUT_SCHEMA`). Every file is written to a temporary name in
the same directory, flushed, fsynced and renamed into place, so a killed process leaves
either the old file or the new one, never a torn one. A shard that exists is complete;
re-running a stage with the same config hash skips it. Opening a store whose manifest
has a DIFFERENT config hash is an error (nothing is overwritten) unless `overwrite=True`.

Several processes may fill one store with the same config: each takes a shard's lock
(`ShardClaims`, an OS file lock: released when its holder dies, so a lock file left by a
killed process does not block anyone) before computing the shard, skips the shards others
hold and comes back to them at the end; the manifest's read-modify-writes are serialised by
`manifest.lock`. Lock files stay on disk and are never read as shards.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from .errors import ReasonMaxxerError
from .io import atomic_dir, atomic_write_json, atomic_write_table, config_hash, package_versions

ROLLOUT_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("sample_index", pa.int32()),  # -1 for the greedy completion
        ("prompt", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("completion", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("logprobs", pa.list_(pa.float32())),  # log p(sampled token), untempered, nats
        ("entropies", pa.list_(pa.float32())),  # full-vocabulary entropy, untempered, nats
        ("finish_reason", pa.string()),  # eos | stop | length
        ("truncated", pa.bool_()),
        ("gold", pa.string()),
        ("reward", pa.float32()),  # 1.0 if strict_correct else 0.0
        ("strict_correct", pa.bool_()),
        ("strict_extracted", pa.string()),
        ("lenient_correct", pa.bool_()),
        ("lenient_extracted", pa.string()),
        ("grade_reason", pa.string()),  # strict verdict's reason
    ]
)


SCORE_SCHEMA = pa.schema(
    [  # a score store (`reasonmaxxer score`): teacher-forced, nats
        ("problem_id", pa.string()),
        ("sample_index", pa.int32()),
        ("entropies", pa.list_(pa.float32())),  # full-vocabulary entropy at each completion token
        ("logprobs", pa.list_(pa.float32())),  # log p(completion token | prefix)
    ]
)


class RolloutStore:
    """A directory of rollout shards with a manifest (see module docstring); `schema` is
    ROLLOUT_SCHEMA, or SCORE_SCHEMA for a store of teacher-forced scores."""

    def __init__(self, root: str | Path, schema: pa.Schema = ROLLOUT_SCHEMA):
        self.root = Path(root)
        self.schema = schema

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def shard_path(self, i: int) -> Path:
        return self.root / "shards" / f"shard-{i:05d}.parquet"

    def shard_lock_path(self, i: int) -> Path:
        return self.root / "shards" / f"{i:05d}.lock"

    def _manifest_lock(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / "manifest.lock")

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def copy_from(self, src: str | Path, config: dict) -> bool:
        """Make this store a copy of the store at `src` when this one does not exist yet and `src`
        was made with the same inputs (its manifest's config hash is `config`'s): another run's
        base rollouts or base evaluation, reused. Copied through `io.atomic_dir` (a temp dir beside
        it, renamed into place; an empty dir or stale lock of a store never opened is replaced).
        Returns whether it copied (a mismatch or a missing `src` copies nothing)."""
        other = RolloutStore(src, self.schema)
        if self.exists() or not other.exists() or other.manifest().get("config_hash") != config_hash(config):
            return False
        atomic_dir(self.root, lambda tmp: shutil.copytree(other.root, tmp, dirs_exist_ok=True))
        return True

    def manifest(self) -> dict:
        if not self.exists():
            raise ReasonMaxxerError(
                f"{self.root}: not a rollout store (no manifest.json); run `reasonmaxxer sample` first"
            )
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise ReasonMaxxerError(f"{self.manifest_path}:{e.lineno}: corrupt manifest ({e.msg})") from e

    def open(self, config: dict, describe: dict | None = None, *, overwrite: bool = False) -> dict:
        """Create the store, or reopen it for resumption if its config hash matches.

        `config` is what identifies the inputs (hashed); `describe` is extra, non-identifying
        information written beside it (versions, timings, human-readable notes).
        """
        with self._manifest_lock():
            return self._open_locked(config, describe, overwrite)

    def _open_locked(self, config: dict, describe: dict | None, overwrite: bool) -> dict:
        h = config_hash(config)
        self._remove_stale_temp_files()
        if self.exists():
            m = self.manifest()
            if m.get("config_hash") == h:
                return m
            if not overwrite:
                raise ReasonMaxxerError(
                    f"{self.root}: holds rollouts made with different inputs (config hash {m.get('config_hash', '?')[:12]} "
                    f"!= {h[:12]}); choose another --out or pass --overwrite"
                )
            shutil.rmtree(self.root / "shards", ignore_errors=True)
        m = {
            "kind": "rollouts",
            "config_hash": h,
            "config": config,
            "versions": package_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "shards": {},
            "complete": False,
        }
        if describe:
            m.update(describe)
        atomic_write_json(self.manifest_path, m)
        return m

    def _remove_stale_temp_files(self) -> None:
        """Temp files left by a process killed mid-write (the real files are intact: writes are
        temp + rename). Called holding the manifest lock, so a manifest temp file is stale; a
        shard's temp file is stale unless another process holds that shard's lock."""
        if self.root.is_dir():
            for p in self.root.glob(".*.tmp"):
                p.unlink(missing_ok=True)
        d = self.root / "shards"
        if d.is_dir():
            for p in d.glob(".shard-*.tmp"):
                lock = FileLock(self.shard_lock_path(int(p.name.split(".")[1].split("-")[1])))
                try:
                    lock.acquire(blocking=False)
                except Timeout:
                    continue  # another process is writing that shard now
                try:
                    p.unlink(missing_ok=True)
                finally:
                    lock.release()

    def done_shards(self) -> set[int]:
        d = self.root / "shards"
        if not d.is_dir():
            return set()
        return {int(p.stem.split("-")[1]) for p in d.glob("shard-*.parquet")}

    def write_shard(self, i: int, rows: Sequence[dict]) -> None:
        table = pa.Table.from_pylist(list(rows), schema=self.schema)
        atomic_write_table(self.shard_path(i), table)
        with self._manifest_lock():
            m = self.manifest()
            m["shards"][f"{i:05d}"] = {"rows": len(rows)}
            atomic_write_json(self.manifest_path, m)

    def update_manifest(self, **fields) -> None:
        self.edit_manifest(lambda m: m.update(fields))

    def edit_manifest(self, fn) -> None:
        """Apply `fn(manifest)` (in place) and write it back, holding the manifest lock."""
        with self._manifest_lock():
            m = self.manifest()
            fn(m)
            atomic_write_json(self.manifest_path, m)

    def read_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        shards = sorted(self.done_shards())
        if not shards:
            raise ReasonMaxxerError(f"{self.root}: the store has no shards yet")
        tables = []
        for i in shards:
            p = self.shard_path(i)
            try:
                tables.append(pq.read_table(p, columns=list(columns) if columns else None))
            except (pa.ArrowInvalid, OSError) as e:
                raise ReasonMaxxerError(
                    f"{p}: unreadable shard ({e}); delete it and re-run the stage to redo it"
                ) from e
        return pa.concat_tables(tables)

    def read_rows(self, columns: Sequence[str] | None = None) -> list[dict]:
        return self.read_table(columns).to_pylist()

    def rewrite_shards(self, fn) -> None:
        """Apply `fn(rows) -> rows` to every shard, each rewritten atomically (e.g. re-grading)."""
        for i in sorted(self.done_shards()):
            rows = pq.read_table(self.shard_path(i)).to_pylist()
            atomic_write_table(self.shard_path(i), pa.Table.from_pylist(fn(rows), schema=self.schema))


MINE, BUSY, DONE = "mine", "busy", "done"


class ShardClaims:
    """Per-shard locks on a store, so that processes filling it with the same config split
    its shards. `claim(i)` takes `shards/<i>.lock` and answers MINE (compute shard i, then
    `release(i)` once it is written), BUSY (another process holds it: come back later with
    `wait=True`) or DONE (the shard is on disk; nothing to do)."""

    def __init__(self, store: RolloutStore):
        self.store = store
        self._held: dict[int, FileLock] = {}

    def claim(self, i: int, *, wait: bool = False) -> str:
        if i in self._held:
            return MINE
        self.store.shard_path(i).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.store.shard_lock_path(i))
        try:
            lock.acquire(blocking=wait)
        except Timeout:
            return BUSY
        if self.store.shard_path(i).is_file():  # written by another process since we listed
            lock.release()
            return DONE
        self._held[i] = lock
        return MINE

    @property
    def held(self) -> set[int]:
        """The shards whose lock this process holds."""
        return set(self._held)

    def release(self, i: int) -> None:
        lock = self._held.pop(i, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        for i in list(self._held):
            self.release(i)
