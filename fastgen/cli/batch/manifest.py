"""The resumable manifest of ``fastgen batch``: per-rank append-only journals (``manifest.rank{r}.jsonl``,
one full line written, flushed and fsynced at a time) merged into ``manifest.jsonl`` (sorted by index,
one record per item, latest wins) under a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
from collections.abc import Sequence

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
"""Name of the merged manifest in the output folder."""


def append_record(path: str, record: dict) -> None:
    """Append one JSON line: a single write of the full line, flushed and fsynced."""
    line = json.dumps(record, allow_nan=False, sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str) -> list[dict]:
    """Records of a jsonl manifest; a truncated or corrupt line (an interrupted append) is skipped."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s:%d: skipping a truncated manifest line", path, lineno)
                    continue
                if isinstance(record, dict) and isinstance(record.get("index"), int):
                    records.append(record)
    except FileNotFoundError:
        pass
    return records


def journal_path(out_dir: str, rank: int) -> str:
    """The append-only journal of ``rank`` in ``out_dir``."""
    return os.path.join(out_dir, f"manifest.rank{rank}.jsonl")


def latest_records(out_dir: str) -> dict[int, dict]:
    """The latest record per item index over ``manifest.jsonl`` and every rank journal."""
    paths = [
        os.path.join(out_dir, MANIFEST),
        *sorted(glob.glob(os.path.join(out_dir, "manifest.rank*.jsonl"))),
    ]
    latest: dict[int, dict] = {}
    for path in paths:
        for record in read_records(path):
            old = latest.get(record["index"])
            if old is None or record.get("finished_at", 0.0) >= old.get("finished_at", 0.0):
                latest[record["index"]] = record
    return latest


@contextlib.contextmanager
def _manifest_lock(out_dir: str):
    with open(os.path.join(out_dir, ".manifest.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def merge_manifests(out_dir: str, remove_journals: Sequence[str] = ()) -> list[dict]:
    """Merge journals into ``manifest.jsonl`` (sorted by index, one record per item) under a file lock.

    ``remove_journals`` are deleted after the merge (a process only removes journals no one else writes).
    """
    from fastgen.io import atomic_path

    with _manifest_lock(out_dir):
        records = [r for _, r in sorted(latest_records(out_dir).items())]
        with atomic_path(os.path.join(out_dir, MANIFEST)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, allow_nan=False, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for path in remove_journals:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    return records


def batch_run_id() -> str:
    """The launcher's id of this run (``TORCHELASTIC_RUN_ID`` under torchrun), shared by all its ranks."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("FASTGEN_BATCH_RUN_ID") or "local"


def progress_path(out_dir: str, rank: int) -> str:
    """The progress file of ``rank``: its counts so far, rewritten atomically after every item."""
    return os.path.join(out_dir, f".progress.rank{rank}.json")


def write_progress(out_dir: str, rank: int, run_id: str, counts: dict, done: bool, started_at: float) -> None:
    """Publish ``rank``'s counts (atomic replace) for rank 0's overall bar and summary."""
    path = progress_path(out_dir, rank)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"run_id": run_id, "rank": rank, "done": done, "started_at": started_at, **counts}, f)
    os.replace(tmp, path)


STALE_SECONDS = 300.0
"""A report whose rank started this long before the reader is taken for an earlier run's (same run id)."""


def read_progress(out_dir: str, world_size: int, run_id: str, started_at: float) -> dict[int, dict]:
    """The progress reports of this run's ranks (a missing, stale or half-written file is left out).

    Without a launcher run id (plain ``RANK``/``WORLD_SIZE``), an earlier run's files are told apart by
    their start time: reports of ranks started more than :data:`STALE_SECONDS` before ``started_at``."""
    reports = {}
    for rank in range(world_size):
        try:
            with open(progress_path(out_dir, rank), encoding="utf-8") as f:
                report = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if report.get("run_id") == run_id and report.get("started_at", 0.0) >= started_at - STALE_SECONDS:
            reports[rank] = report
    return reports


__all__ = [
    "batch_run_id",
    "progress_path",
    "read_progress",
    "write_progress",
    "MANIFEST",
    "append_record",
    "journal_path",
    "latest_records",
    "merge_manifests",
    "read_records",
]
