"""``fastgen batch``: generate a video or text for every prompt of a file, with a resumable manifest.

Prompt files are ``.txt`` (one prompt per line; blank lines and ``#`` comments skipped), ``.jsonl``
(one object per line with a ``prompt`` key, or a bare JSON string) or ``.csv`` (a header row with a
``prompt`` column). Optional columns: ``seed``, ``negative_prompt`` and per-row overrides of generation
parameters (``steps``, ``frames``, ``gen_length``, ...) or method options (``sparsity``, ``select``, ...).

Every item gets a deterministic seed (the row's, else ``base_seed + index``) and a deterministic output
name (``0003-a-cat-surfing.mp4``). Outputs are written atomically; a record per item is appended to a
journal (``manifest.rank{r}.jsonl``, one full line written, flushed and fsynced at a time) and the
journals are merged into ``manifest.jsonl`` (sorted by index, one record per item, latest wins) under a
file lock at the start and end of every process. Re-running the same command skips finished items.

Under ``torchrun`` / ``accelerate launch`` (env ``RANK`` and ``WORLD_SIZE``) items are split by
``index % world_size``; no collective communication is needed, so a rank that dies never hangs others.

Example::

    fastgen batch samples/video_prompts.txt --preset tiny-wan --method rectified --out-dir out/
    torchrun --nproc-per-node 2 -m fastgen.cli batch prompts.jsonl --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import glob
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fastgen.configs import METHOD_CONFIGS

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
"""Name of the merged manifest in the output folder."""

_INT, _FLOAT, _STR = int, float, str

VIDEO_PARAMS: dict[str, type] = {
    "negative_prompt": _STR,
    "steps": _INT,
    "height": _INT,
    "width": _INT,
    "frames": _INT,
    "guidance_scale": _FLOAT,
}
"""Per-item generation parameters of video runners and their types."""

TEXT_PARAMS: dict[str, type] = {
    "steps": _INT,
    "gen_length": _INT,
    "block_length": _INT,
    "temperature": _FLOAT,
    "cfg_scale": _FLOAT,
}
"""Per-item generation parameters of text runners and their types."""

DEFAULT_METHOD = {"video": "rectified", "text": "sparsed"}
"""Sparse method used when ``--method`` is not given, per kind of model."""

COMPOSITE_METHODS = {"sparsed+window_diffusion": ("window_diffusion", "sparsed")}
"""Methods that run several configs together, and the methods they are made of."""


def _method_parts(method: str) -> tuple[str, ...]:
    """The config methods behind ``method`` (itself, or the parts of a composite method)."""
    return COMPOSITE_METHODS.get(method, (method,))


def _known_method(method: str) -> bool:
    return method in METHOD_CONFIGS or method in COMPOSITE_METHODS


def _allowed_methods() -> str:
    return ", ".join(["dense", *sorted(METHOD_CONFIGS), *sorted(COMPOSITE_METHODS)])


def _config_record(config):
    """Manifest form of a config or of a list of configs."""
    if isinstance(config, (list, tuple)):
        return [c.to_dict() for c in config]
    return config.to_dict()


def _config_field_types(method: str) -> dict[str, type]:
    """Column types of the config fields of ``method`` (bool/int/float/str, optional allowed)."""
    types = {}
    for f in dataclasses.fields(METHOD_CONFIGS[method]):
        annotation = str(f.type)
        for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
            if annotation.startswith(name):
                types[f.name] = typ
                break
    return types


def allowed_columns(kind: str | None = None, method: str | None = None) -> dict[str, type]:
    """Columns a prompt file may have for ``kind``/``method`` (all known columns when ``None``; no method
    options for ``"dense"``)."""
    columns: dict[str, type] = {"prompt": _STR, "seed": _INT}
    kinds = [kind] if kind else ["video", "text"]
    for k in kinds:
        columns.update(VIDEO_PARAMS if k == "video" else TEXT_PARAMS)
    methods = [method] if method else list(METHOD_CONFIGS)
    for m in methods:
        for part in _method_parts(m):
            if part in METHOD_CONFIGS:
                columns.update(_config_field_types(part))
    return columns


@dataclass
class Item:
    """One prompt of a batch with its optional seed and per-row overrides."""

    index: int
    """Position in the prompt file (0-based, after skipping blanks and comments)."""
    prompt: str
    """The prompt text."""
    seed: int | None = None
    """The row's own seed; ``None`` means ``base_seed + index``."""
    overrides: dict = field(default_factory=dict)
    """Per-row generation parameters and method options (e.g. ``steps``, ``sparsity``)."""

    def resolved_seed(self, base_seed: int) -> int:
        """The seed this item runs with: its own, else ``base_seed + index``."""
        return self.seed if self.seed is not None else base_seed + self.index


def _coerce(value, typ: type, where: str):
    """Convert a cell to ``typ``; empty cells become ``None`` (not overridden)."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.strip().lower() in ("true", "1", "yes")
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise ValueError(f"{where}={value!r} must be of type {typ.__name__}") from None


def _item_from_row(row: dict, index: int, where: str, columns: dict[str, type]) -> Item:
    unknown = sorted(set(row) - set(columns))
    if unknown:
        raise ValueError(
            f"{where}: unknown column(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(columns))}"
        )
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: column 'prompt' is missing or empty")
    values = {k: _coerce(v, columns[k], f"{where}: column {k!r}") for k, v in row.items() if k != "prompt"}
    seed = values.pop("seed", None)
    overrides = {k: v for k, v in values.items() if v is not None}
    return Item(index=index, prompt=prompt.strip(), seed=seed, overrides=overrides)


def read_prompt_file(path: str | os.PathLike, columns: dict[str, type] | None = None) -> list[Item]:
    """Read a ``.txt``, ``.jsonl`` or ``.csv`` prompt file into items (columns checked against ``columns``).

    Unknown columns raise a ``ValueError`` naming the column and the allowed ones.
    """
    path = os.fspath(path)
    columns = columns if columns is not None else allowed_columns()
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".jsonl", ".csv"):
        raise ValueError(f"prompt file {path!r} has extension {ext!r}; allowed: .txt, .jsonl, .csv")
    if not os.path.isfile(path):
        raise ValueError(f"prompt file {path!r} does not exist")
    rows: list[tuple[dict, str]] = []
    with open(path, encoding="utf-8", newline="") as f:
        if ext == ".txt":
            for lineno, line in enumerate(f, 1):
                text = line.strip()
                if text and not text.startswith("#"):
                    rows.append(({"prompt": text}, f"{path}:{lineno}"))
        elif ext == ".jsonl":
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
                if isinstance(row, str):
                    row = {"prompt": row}
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: each line must be a JSON object or string, got {row!r}")
                rows.append((row, where))
        else:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "prompt" not in reader.fieldnames:
                raise ValueError(f"{path}: a CSV prompt file needs a header row with a 'prompt' column")
            for row in reader:
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue
                if None in row:
                    raise ValueError(f"{path}:{reader.line_num}: more cells than header columns")
                rows.append((row, f"{path}:{reader.line_num}"))
    return [_item_from_row(row, i, where, columns) for i, (row, where) in enumerate(rows)]


def slugify(text: str, max_len: int = 40) -> str:
    """Short lowercase ASCII slug of a prompt for file names (``"A cat, surfing!"`` -> ``a-cat-surfing``)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(slug) > max_len:
        cut = slug[: max_len + 1]
        slug = cut.rsplit("-", 1)[0] if "-" in cut else slug[:max_len]
    return slug.strip("-") or "prompt"


def output_name(item: Item, kind: str) -> str:
    """Deterministic output file name: index and slug, ``.mp4`` for video, ``.txt`` for text."""
    return f"{item.index:04d}-{slugify(item.prompt)}.{'mp4' if kind == 'video' else 'txt'}"


def distributed_rank() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's environment (torchrun, accelerate)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"RANK={rank} and WORLD_SIZE={world_size} are inconsistent; need 0 <= RANK < WORLD_SIZE"
        )
    return rank, world_size, local_rank


# ----------------------------------------------------------------------------------------------------
# manifest: per-rank append-only journals merged into manifest.jsonl


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


# ----------------------------------------------------------------------------------------------------
# the runner


def _finite(x) -> float | None:
    """A float for JSON (``None`` for inf/nan)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def stats_layers(stats) -> list[dict]:
    """Per-layer stat dicts from a runner's ``stats`` (a list of layer dicts, or a dict with ``layers``)."""
    if isinstance(stats, dict):
        stats = stats.get("layers")
    return [s for s in stats or [] if isinstance(s, dict)]


def mean_stat(stats, key: str) -> float | None:
    """Mean of ``key`` over the layers of a runner's ``stats`` (or its own summary value)."""
    if isinstance(stats, dict) and stats.get(key) is not None:
        return float(stats[key])
    values = [float(s[key]) for s in stats_layers(stats) if s.get(key) is not None]
    return float(np.mean(values)) if values else None


def reported_config(result: dict) -> dict | None:
    """The method config a runner reports having used (``result["config"]``), if it names one."""
    config = result.get("config")
    if not isinstance(config, dict):
        return None
    if isinstance(config.get("acceleration"), list):
        return config["acceleration"]
    if isinstance(config.get("method"), dict):
        config = config["method"]
    return config if config.get("method") in METHOD_CONFIGS else None


@dataclass
class BatchRunner:
    """Runs the items of one rank, writes outputs atomically and records each one in the journal."""

    kind: str
    """``"video"`` or ``"text"``."""
    load: Callable[[], object]
    """Builds the pipeline (called lazily, once, only if an item needs work)."""
    generate: Callable[..., dict]
    """``generate_video`` / ``generate_text`` or a compatible fake."""
    out_dir: str
    """Folder of outputs and manifests."""
    method: str
    """Method name (``"dense"`` or a key of ``METHOD_CONFIGS``)."""
    config_options: dict = field(default_factory=dict)
    """Method options from the command line (non-``None`` config fields)."""
    params: dict = field(default_factory=dict)
    """Generation parameters from the command line (non-``None``)."""
    model: str = ""
    """Preset name or checkpoint, for the manifest."""
    base_seed: int = 0
    """Seed of item ``i`` without its own seed is ``base_seed + i``."""
    compare_dense: bool = False
    """Also run dense with the same seed; record speedup and fidelity."""
    overwrite: bool = False
    """Redo items that are already finished."""
    rank: int = 0
    """This process's rank."""
    world_size: int = 1
    """Number of processes splitting the items."""
    progress: bool = True
    """Show the bar over items and the pipeline's own bar per item."""

    def __post_init__(self):
        if self.kind not in ("video", "text"):
            raise ValueError(f"kind={self.kind!r} is not allowed; allowed: 'video', 'text'")
        if self.method != "dense" and not _known_method(self.method):
            raise ValueError(f"method={self.method!r} is unknown; allowed: {_allowed_methods()}")
        self._pipe = None
        self.build_config(self.method_options(None))  # validates the command-line options before any work

    def columns(self) -> dict[str, type]:
        """Prompt-file columns allowed for this kind and method."""
        return allowed_columns(self.kind, self.method)

    def method_options(self, item: Item | None) -> dict:
        """Method options of one item: the command line's, then the row's overrides."""
        if self.method == "dense":
            return {}
        names = {
            f.name for part in _method_parts(self.method) for f in dataclasses.fields(METHOD_CONFIGS[part])
        }
        overrides = item.overrides if item is not None else {}
        return {**self.config_options, **{k: v for k, v in overrides.items() if k in names}}

    def build_config(self, options: dict):
        """The method config for ``options`` (validated); ``None`` for dense or when no option is given,
        so that the runner picks its own (model-aware) default config."""
        if self.method == "dense":
            return None
        if self.method in COMPOSITE_METHODS:
            configs = []
            for part in _method_parts(self.method):
                cls = METHOD_CONFIGS[part]
                names = {f.name for f in dataclasses.fields(cls)}
                mine = {k: v for k, v in options.items() if k in names}
                if mine or part == "window_diffusion":
                    configs.append(cls(**mine))
            return configs if options else None
        config = METHOD_CONFIGS[self.method](**options)
        return config if options else None

    def item_params(self, item: Item) -> dict:
        """Generation keyword arguments of one item (command line, then the row's overrides)."""
        names = VIDEO_PARAMS if self.kind == "video" else TEXT_PARAMS
        params = {k: v for k, v in self.params.items() if k in names}
        params.update({k: v for k, v in item.overrides.items() if k in names})
        return params

    def _is_done(self, item: Item, record: dict | None, seed: int) -> bool:
        if self.overwrite or record is None or record.get("status") != "ok":
            return False
        if not os.path.exists(os.path.join(self.out_dir, record.get("output") or "")):
            return False
        same = (
            record.get("prompt") == item.prompt
            and record.get("seed") == seed
            and record.get("method") == self.method
            and record.get("options") == self.method_options(item)
            and record.get("model") == self.model
            and record.get("params") == self.item_params(item)
        )
        if not same:
            logger.info("item %d: recorded settings differ from this run; redoing it", item.index)
        return same

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = self.load()
        return self._pipe

    def _write_output(self, path: str, result: dict) -> None:
        from fastgen.io import write_text, write_video

        if self.kind == "video":
            write_video(path, result["frames"], fps=int(result.get("fps") or 16))
        else:
            write_text(path, result["text"])

    def run_item(self, item: Item) -> dict:
        """Generate, write and measure one item; returns its manifest record (status ``ok``)."""
        from fastgen.metrics import psnr, ssim, token_agreement

        seed = item.resolved_seed(self.base_seed)
        config = self.build_config(self.method_options(item))
        params = self.item_params(item)
        name = output_name(item, self.kind)
        path = os.path.join(self.out_dir, name)
        base, ext = os.path.splitext(name)
        for stale in glob.glob(os.path.join(self.out_dir, f".{glob.escape(base)}.*.partial{ext}")):
            os.remove(stale)  # temp file of an interrupted earlier attempt at this (same-rank) item
        pipe = self._pipeline()
        started = time.perf_counter()
        result = self.generate(
            pipe,
            prompt=item.prompt,
            seed=seed,
            method=self.method,
            config=config,
            progress=self.progress,
            **params,
        )
        self._write_output(path, result)
        record = {
            "config": _config_record(config) if config is not None else reported_config(result),
            "output": name,
            "seconds": _finite(result.get("seconds")),
            "density": mean_stat(result.get("stats"), "density"),
            "compensated_fraction": mean_stat(result.get("stats"), "compensated_fraction"),
        }
        if self.kind == "text":
            record["tokens_per_s"] = _finite(result.get("tokens_per_s"))
        if self.compare_dense and self.method != "dense":
            dense = self.generate(
                pipe,
                prompt=item.prompt,
                seed=seed,
                method="dense",
                config=None,
                progress=self.progress,
                **params,
            )
            record["dense_seconds"] = _finite(dense.get("seconds"))
            if result.get("seconds") and dense.get("seconds"):
                record["speedup"] = _finite(dense["seconds"] / result["seconds"])
            if self.kind == "video":
                value = psnr(dense["frames"], result["frames"])
                record["psnr"] = _finite(value)
                record["identical"] = bool(math.isinf(value))
                record["ssim"] = _finite(ssim(dense["frames"], result["frames"]))
            else:
                record["token_agreement"] = token_agreement(dense["tokens"], result["tokens"])
                record["dense_tokens_per_s"] = _finite(dense.get("tokens_per_s"))
        record["wall_seconds"] = time.perf_counter() - started
        if result.get("method") is not None:
            record["method_run"] = result["method"]  # a runner may fall back to dense
        if result.get("config") is not None:
            record["runner_config"] = result["config"]
        return record

    def run(self, items: Sequence[Item]) -> dict:
        """Run this rank's share of ``items``; returns counts ``{"ok", "skipped", "failed", "total"}``."""
        from tqdm.auto import tqdm

        os.makedirs(self.out_dir, exist_ok=True)
        merge_manifests(self.out_dir)  # fold journals of an interrupted earlier run
        previous = latest_records(self.out_dir)
        mine = [item for item in items if item.index % self.world_size == self.rank]
        journal = journal_path(self.out_dir, self.rank)
        counts = {"ok": 0, "skipped": 0, "failed": 0, "total": len(mine)}
        bar = tqdm(
            mine,
            desc=f"batch rank {self.rank}" if self.world_size > 1 else "batch",
            unit="item",
            disable=not self.progress,
            position=self.rank if self.world_size > 1 else None,
        )
        for item in bar:
            seed = item.resolved_seed(self.base_seed)
            base = {
                "index": item.index,
                "prompt": item.prompt,
                "seed": seed,
                "kind": self.kind,
                "model": self.model,
                "method": self.method,
                "options": self.method_options(item),
                "config": None,
                "params": self.item_params(item),
                "rank": self.rank,
            }
            try:
                if self._is_done(item, previous.get(item.index), seed):
                    counts["skipped"] += 1
                    continue
                record = {**base, **self.run_item(item), "status": "ok", "error": None}
                counts["ok"] += 1
            except Exception as err:  # noqa: BLE001 - a failing item is recorded and the run goes on
                logger.warning(
                    "item %d (%r) failed: %s: %s", item.index, item.prompt, type(err).__name__, err
                )
                logger.debug("item %d traceback", item.index, exc_info=True)
                record = {**base, "output": None, "status": "error", "error": f"{type(err).__name__}: {err}"}
                counts["failed"] += 1
            record["finished_at"] = time.time()
            append_record(journal, record)
        bar.close()
        # a single process owns every journal; with several ranks others may still be appending to theirs
        leftovers = (
            glob.glob(os.path.join(self.out_dir, "manifest.rank*.jsonl")) if self.world_size == 1 else ()
        )
        merge_manifests(self.out_dir, remove_journals=leftovers)
        return counts


# ----------------------------------------------------------------------------------------------------
# the command


def _resolve_method(args: argparse.Namespace, kind: str) -> str:
    method = args.method or DEFAULT_METHOD[kind]
    if method != "dense" and not _known_method(method):
        raise ValueError(f"--method={method!r} is unknown; allowed: {_allowed_methods()}")
    return method


def runner_from_args(
    args: argparse.Namespace,
    *,
    kind: str | None = None,
    load: Callable[[], object] | None = None,
    generate: Callable[..., dict] | None = None,
) -> BatchRunner:
    """Build a :class:`BatchRunner` from ``fastgen batch`` arguments (``load``/``generate`` injectable)."""
    if kind is None:
        from fastgen.cli_generate import model_kind

        kind = model_kind(args)
    method = _resolve_method(args, kind)
    rank, world_size, local_rank = distributed_rank()
    device = args.device
    if device is None and world_size > 1:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
    if load is None or generate is None:
        if kind == "video":
            from fastgen.pipelines.video_runner import generate_video, load_video_pipeline

            def default_load():
                return load_video_pipeline(
                    preset=args.preset, model=args.model, device=device, dtype=args.dtype
                )

            default_generate = generate_video
        else:
            from fastgen.pipelines.text_runner import generate_text, load_text_pipeline

            def default_load():
                return load_text_pipeline(
                    preset=args.preset,
                    model=args.model,
                    device=device,
                    dtype=args.dtype,
                    trust_remote_code=args.trust_remote_code,
                )

            default_generate = generate_text
        load = load or default_load
        generate = generate or default_generate
    config_options = {}
    if method != "dense":
        for f in (f for part in _method_parts(method) for f in dataclasses.fields(METHOD_CONFIGS[part])):
            value = getattr(args, f.name, None)
            if value is not None:
                config_options[f.name] = value
    names = VIDEO_PARAMS if kind == "video" else TEXT_PARAMS
    params = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    return BatchRunner(
        kind=kind,
        load=load,
        generate=generate,
        out_dir=args.out_dir,
        method=method,
        config_options=config_options,
        params=params,
        model=args.preset or args.model or "",
        base_seed=args.seed,
        compare_dense=args.compare_dense,
        overwrite=args.overwrite,
        rank=rank,
        world_size=world_size,
    )


def run_batch(
    args: argparse.Namespace,
    *,
    kind: str | None = None,
    load: Callable[[], object] | None = None,
    generate: Callable[..., dict] | None = None,
) -> int:
    """Run ``fastgen batch``; returns 0 when every item of this rank is done, 1 when some failed."""
    runner = runner_from_args(args, kind=kind, load=load, generate=generate)
    items = read_prompt_file(args.prompts, runner.columns())
    counts = runner.run(items)
    who = f"rank {runner.rank}/{runner.world_size}: " if runner.world_size > 1 else ""
    summary = (
        f"fastgen batch: {who}{counts['ok']} generated, {counts['skipped']} already done, "
        f"{counts['failed']} failed, of {counts['total']} items; manifest: "
        f"{os.path.join(runner.out_dir, MANIFEST)}\n"
    )
    sys.stderr.write(summary)
    if counts["failed"]:
        logger.warning(
            "%d item(s) failed; see 'error' in the manifest; re-run to retry them", counts["failed"]
        )
    return 1 if counts["failed"] else 0


__all__ = [
    "MANIFEST",
    "BatchRunner",
    "Item",
    "allowed_columns",
    "append_record",
    "latest_records",
    "merge_manifests",
    "output_name",
    "read_prompt_file",
    "read_records",
    "run_batch",
    "runner_from_args",
    "slugify",
]
