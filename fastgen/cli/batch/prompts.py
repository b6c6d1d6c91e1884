"""Prompt files of ``fastgen batch``: reading ``.txt`` / ``.jsonl`` / ``.csv`` into items, the columns each
kind of model and method allows, and the deterministic output name of an item.

Prompt files are ``.txt`` (one prompt per line; blank lines and ``#`` comments skipped), ``.jsonl``
(one object per line with a ``prompt`` key, or a bare JSON string) or ``.csv`` (a header row with a
``prompt`` column). Optional columns: ``seed``, ``negative_prompt`` and per-row overrides of generation
parameters (``steps``, ``frames``, ``gen_length``, ...) or method options (``sparsity``, ``select``, ...).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from fastgen.configs import METHOD_CONFIGS

_INT, _FLOAT, _STR = int, float, str

VIDEO_PARAMS: dict[str, type] = {
    "negative_prompt": _STR,
    "steps": _INT,
    "height": _INT,
    "width": _INT,
    "frames": _INT,
    "guidance_scale": _FLOAT,
    "image": _STR,
    "local_attn_frames": _INT,
    "sink_frames": _INT,
}
"""Per-item generation parameters of video runners and their types (``image``: the first frame of an
image-to-video pipeline, a path relative to the prompt file's folder; ``local_attn_frames`` /
``sink_frames``: the causal Wan's local attention window)."""

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


COMPOSITE_METHODS = {"sparsed+window_diffusion": ("window_diffusion", "sparsed")}
"""Methods that run several configs together, and the methods they are made of."""


def allowed_columns(kind: str | None = None, method: str | None = None) -> dict[str, type]:
    """Columns a prompt file may have for ``kind``/``method`` (all known columns when ``None``; no method
    options for ``"dense"``)."""
    columns: dict[str, type] = {"prompt": _STR, "seed": _INT}
    kinds = [kind] if kind else ["video", "text"]
    for k in kinds:
        columns.update(VIDEO_PARAMS if k == "video" else TEXT_PARAMS)
    methods = [method] if method else list(METHOD_CONFIGS)
    for m in methods:
        for part in COMPOSITE_METHODS.get(m, (m,)):
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
    where: str = ""
    """``file:line`` of the row, for messages."""

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


def _item_from_row(row: dict, index: int, where: str, columns: dict[str, type], folder: str) -> Item:
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
    if isinstance(overrides.get("image"), str) and not os.path.isabs(overrides["image"]):
        overrides["image"] = os.path.join(folder, overrides["image"])
    return Item(index=index, prompt=prompt.strip(), seed=seed, overrides=overrides, where=where)


def _decode_lines(path: str) -> list[str]:
    """The lines of ``path`` as UTF-8; a ``ValueError`` naming the file, line and byte otherwise."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); allowed: a UTF-8 "
            "text file (re-save it as UTF-8)"
        ) from None
    return text.splitlines(keepends=True)


def read_prompt_file(
    path: str | os.PathLike,
    columns: dict[str, type] | None = None,
    check: Callable[[Item], list[str]] | None = None,
) -> list[Item]:
    """Read a ``.txt``, ``.jsonl`` or ``.csv`` prompt file into items (columns checked against ``columns``).

    Every bad row is reported (one line each, ``file:line: ...``) in one ``ValueError``: unknown columns
    (with the allowed ones), cells of the wrong type, invalid JSON; a file that is not UTF-8 names the
    line and byte; a file without any prompt is an error too. ``check(item)`` returns the problems of a
    well-formed row's values (ranges, relevance), reported in the same error as the others.
    """
    path = os.fspath(path)
    columns = columns if columns is not None else allowed_columns()
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".jsonl", ".csv"):
        raise ValueError(f"prompt file {path!r} has extension {ext!r}; allowed: .txt, .jsonl, .csv")
    if not os.path.isfile(path):
        raise ValueError(f"prompt file {path!r} does not exist")
    rows: list[tuple[dict, str]] = []
    problems: list[str] = []
    lines = _decode_lines(path)
    if ext == ".txt":
        for lineno, line in enumerate(lines, 1):
            text = line.strip()
            if text and not text.startswith("#"):
                rows.append(({"prompt": text}, f"{path}:{lineno}"))
    elif ext == ".jsonl":
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{where}: invalid JSON ({err.msg})")
                continue
            if isinstance(row, str):
                row = {"prompt": row}
            if not isinstance(row, dict):
                problems.append(f"{where}: each line must be a JSON object or string, got {row!r}")
                continue
            rows.append((row, where))
    else:
        reader = csv.DictReader(io.StringIO("".join(lines), newline=""))
        if reader.fieldnames is None or "prompt" not in reader.fieldnames:
            raise ValueError(f"{path}: a CSV prompt file needs a header row with a 'prompt' column")
        for row in reader:
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue
            if None in row:
                problems.append(f"{path}:{reader.line_num}: more cells than header columns")
                continue
            rows.append((row, f"{path}:{reader.line_num}"))
    folder = os.path.dirname(os.path.abspath(path))
    items = []
    for row, where in rows:
        try:
            item = _item_from_row(row, len(items), where, columns, folder)
        except ValueError as err:
            problems.append(str(err))
            continue
        items.append(item)
        if check is not None:
            problems.extend(f"{where}: {p}" for p in check(item))
    if problems:
        raise ValueError("\n".join(problems))
    if not items:
        raise ValueError(
            f"prompt file {path!r} holds no prompt (blank lines and # comments are skipped); allowed: at "
            "least one prompt"
        )
    return items


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


__all__ = [
    "DEFAULT_METHOD",
    "TEXT_PARAMS",
    "VIDEO_PARAMS",
    "Item",
    "allowed_columns",
    "output_name",
    "read_prompt_file",
    "slugify",
]
