"""``fastgen batch``: generate a video or text for every prompt of a file, with a resumable manifest.

This module is the runner (:mod:`fastgen.cli.batch.command` is the command); prompt files are read by :mod:`fastgen.cli.batch.prompts`, the
manifest is kept by :mod:`fastgen.cli.batch.manifest`, every row is checked up front by the CLI's
validation layer (:mod:`fastgen.cli.options`), statistics are summarised by :mod:`fastgen.stats`, and
``--compare-dense`` goes through :func:`fastgen.compare.compare_with_dense` (warm-up excluded).

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

import dataclasses
import glob
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fastgen.cli.batch.manifest import (
    MANIFEST,
    append_record,
    batch_run_id,
    journal_path,
    latest_records,
    merge_manifests,
    read_progress,
    read_records,
    write_progress,
)
from fastgen.cli.batch.prompts import (
    COMPOSITE_METHODS,
    DEFAULT_METHOD,
    TEXT_PARAMS,
    VIDEO_PARAMS,
    Item,
    allowed_columns,
    output_name,
    read_prompt_file,
    slugify,
)
from fastgen.configs import METHOD_CONFIGS
from fastgen.stats import finite as _finite
from fastgen.stats import mean_stat

logger = logging.getLogger(__name__)


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
# the runner


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
    rounds: int | None = None
    """Interleaved timing rounds of ``compare_dense`` (``None``: :data:`fastgen.compare.DEFAULT_ROUNDS`)."""
    run_spec: object = None
    """The :class:`fastgen.cli.options.Run` (family, method, source) the rows are checked against."""
    report: Callable[[str], None] | None = None
    """Where per-item comparison lines go on screen (``None``: nowhere; the command writes them to stderr)."""
    rank: int = 0
    """This process's rank."""
    world_size: int = 1
    """Number of processes splitting the items."""
    progress: bool = True
    """Show the bar over items and the pipeline's own bar per item."""
    stall_seconds: float = 600.0
    """Rank 0 stops waiting for the other ranks' final counts after this long without any report."""
    poll_seconds: float = 1.0
    """How often rank 0 reads the other ranks' progress."""
    writer: bool = True
    """Whether this process writes outputs, journals and progress; ``False`` for the ranks of a
    context-parallel group other than its first, which generate every item in step with it and write
    nothing (:mod:`fastgen.cli.context_parallel`)."""
    context_parallel: object = None
    """The :class:`fastgen.cli.context_parallel.ContextParallelPlan` of a ``--context-parallel`` run
    (its process group is set up around :meth:`run` by :func:`run_batch`), else ``None``."""

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

        if not self.writer:
            return
        if self.kind == "video":
            write_video(path, result["frames"], fps=int(result.get("fps") or 16))
        else:
            write_text(path, result["text"])

    def run_item(self, item: Item) -> dict:
        """Generate, write and measure one item; returns its manifest record (status ``ok``).

        With ``compare_dense`` the item runs through :func:`fastgen.compare.compare_with_dense` (the
        same helper and warm-up policy as ``fastgen generate`` and the demo; warm-up excluded)."""
        from fastgen.compare import (
            VIDEO_WARM_UP,
            compare_with_dense,
            text_fidelity,
            text_warm_up,
            video_fidelity,
        )

        seed = item.resolved_seed(self.base_seed)
        config = self.build_config(self.method_options(item))
        params = self.item_params(item)
        name = output_name(item, self.kind)
        path = os.path.join(self.out_dir, name)
        self._remove_partials(name)
        pipe = self._pipeline()
        started = time.perf_counter()
        options = dict(prompt=item.prompt, seed=seed, progress=self.progress and self.rank == 0, **params)
        comparison = None
        if self.compare_dense and self.method != "dense":
            if self.kind == "video":
                fidelity, warm_up = video_fidelity, VIDEO_WARM_UP
            else:
                fidelity, warm_up = text_fidelity, text_warm_up(params.get("gen_length") or 4)
            from fastgen.compare import DEFAULT_ROUNDS

            comparison = compare_with_dense(
                self.generate, pipe, method=self.method, config=config, fidelity=fidelity, warm_up=warm_up,
                rounds=self.rounds or DEFAULT_ROUNDS, **options,
            )  # fmt: skip
            result = comparison.accelerated
        else:
            result = self.generate(pipe, method=self.method, config=config, **options)
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
        if comparison is not None:
            self._add_comparison(record, comparison, f"item {item.index} ({name})")
        record["wall_seconds"] = time.perf_counter() - started
        if result.get("method") is not None:
            record["method_run"] = result["method"]  # a runner may fall back to dense
        if result.get("config") is not None:
            record["runner_config"] = result["config"]
        return record

    def _add_comparison(self, record: dict, comparison, label: str) -> None:
        """Add the comparison with dense to an item's ``record`` (times, speed-up, rounds, load, fidelity) and
        report its line (``label``: the item) and any timing warning."""
        dense = comparison.dense
        record["dense_seconds"] = _finite(dense.get("seconds"))
        record["speedup"] = _finite(comparison.speedup)
        record["speedups"] = [_finite(x) for x in comparison.speedups]
        record["rounds"] = comparison.rounds
        record["load_average"] = _finite(comparison.load)
        record["cpus"] = comparison.cpus
        record["sparse_never_ran"] = comparison.not_sparse
        if self.kind == "video":
            record["psnr"] = _finite(comparison.fidelity["psnr"])
            record["identical"] = comparison.fidelity["identical"]
            record["ssim"] = _finite(comparison.fidelity["ssim"])
            fidelity_text = (
                "identical frames" if record["identical"] else f"PSNR {record['psnr']:.2f} dB"
            ) + f", SSIM {record['ssim']:.4f}"
        else:
            record["token_agreement"] = comparison.fidelity["token_agreement"]
            record["dense_tokens_per_s"] = _finite(dense.get("tokens_per_s"))
            fidelity_text = f"token agreement {record['token_agreement']:.3f}"
        if self.report is not None:
            self.report(f"{label}: {comparison.speed_summary()}; {fidelity_text}")
            warning = comparison.load_warning()
            if warning:
                self.report(warning)

    def _remove_partials(self, name: str) -> None:
        """Delete the temp files of an interrupted earlier attempt at the (same-rank) item ``name`` (the writer)."""
        base, ext = os.path.splitext(name)
        for stale in glob.glob(os.path.join(self.out_dir, f".{glob.escape(base)}.*.partial{ext}")):
            if self.writer:
                os.remove(stale)

    def run(self, items: Sequence[Item]) -> dict:
        """Run this rank's share of ``items``; returns counts ``{"ok", "skipped", "failed", "total"}``.

        With several ranks, each rank publishes its counts after every item (:mod:`fastgen.cli.batch.manifest`
        progress files); rank 0 draws ONE bar over all ranks' items (the others draw none) and, once its
        own share is done, waits for the others' final counts (never forever: it stops waiting when no
        rank has reported for ``stall_seconds``) so its summary counts every rank (``counts["ranks"]``).
        """
        from tqdm.auto import tqdm

        if self.context_parallel is not None:  # the group decides what is done on the same manifest
            import torch.distributed as dist

            if self.writer:
                os.makedirs(self.out_dir, exist_ok=True)
                merge_manifests(self.out_dir)
            dist.barrier()
        if not self.writer:
            return self._follow(items)
        os.makedirs(self.out_dir, exist_ok=True)
        merge_manifests(self.out_dir)  # fold journals of an interrupted earlier run
        previous = latest_records(self.out_dir)
        mine = [item for item in items if item.index % self.world_size == self.rank]
        journal = journal_path(self.out_dir, self.rank)
        counts = {"ok": 0, "skipped": 0, "failed": 0, "total": len(mine)}
        run_id, started_at = batch_run_id(), time.time()
        multi = self.world_size > 1
        if multi:
            write_progress(self.out_dir, self.rank, run_id, counts, False, started_at)
        bar = tqdm(
            total=len(items) if multi else len(mine),
            desc=f"batch ({self.world_size} ranks)" if multi else "batch",
            unit="item",
            disable=not self.progress or self.rank != 0,
        )

        def refresh():
            if multi and self.rank == 0:
                others = read_progress(self.out_dir, self.world_size, run_id, started_at)
                done = sum(c["ok"] + c["skipped"] + c["failed"] for r, c in others.items() if r != 0)
                bar.n = done + counts["ok"] + counts["skipped"] + counts["failed"]
                bar.refresh()
            else:
                bar.update(1)

        try:
            self._run_items(mine, previous, journal, counts, run_id, started_at, multi, refresh)
        except KeyboardInterrupt:
            bar.close()
            merge_manifests(self.out_dir)
            done = counts["ok"] + counts["skipped"]
            raise KeyboardInterrupt(
                f"stopped at item {done + counts['failed'] + 1} of {counts['total']} ({counts['ok']} generated, "
                f"{counts['skipped']} already done, {counts['failed']} failed); finished items are in "
                f"{os.path.join(self.out_dir, MANIFEST)}; run the same command again to resume"
            ) from None
        if multi:
            write_progress(self.out_dir, self.rank, run_id, counts, True, started_at)
            if self.rank == 0:
                counts["ranks"] = self._wait_for_ranks(run_id, started_at, refresh)
        bar.close()
        # a single process owns every journal; with several ranks others may still be appending to theirs
        leftovers = (
            glob.glob(os.path.join(self.out_dir, "manifest.rank*.jsonl")) if self.world_size == 1 else ()
        )
        merge_manifests(self.out_dir, remove_journals=leftovers)
        return counts

    def _follow(self, items: Sequence[Item]) -> dict:
        """A non-writing rank of a context-parallel group: generate the items its group's writer
        generates (same skip decisions, read from the manifest before the writer changes it), write nothing."""
        previous = latest_records(self.out_dir) if os.path.isdir(self.out_dir) else {}
        mine = [item for item in items if item.index % self.world_size == self.rank]
        counts = {"ok": 0, "skipped": 0, "failed": 0, "total": len(mine)}
        for item in mine:
            seed = item.resolved_seed(self.base_seed)
            if self._is_done(item, previous.get(item.index), seed):
                counts["skipped"] += 1
                continue
            try:
                self.run_item(item)
                counts["ok"] += 1
            except Exception as err:  # noqa: BLE001 - the writer records the item's failure
                logger.debug("item %d failed on a non-writing rank: %s", item.index, err)
                counts["failed"] += 1
        return counts

    def _run_items(self, mine, previous, journal, counts, run_id, started_at, multi, refresh) -> None:
        """The loop of :meth:`run` over this rank's items (counts updated in place)."""
        for item in mine:
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
                    if multi:
                        write_progress(self.out_dir, self.rank, run_id, counts, False, started_at)
                    refresh()
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
            if multi:
                write_progress(self.out_dir, self.rank, run_id, counts, False, started_at)
            refresh()

    def _wait_for_ranks(self, run_id: str, started_at: float, refresh: Callable[[], None]) -> dict[int, dict]:
        """Rank 0: the final counts of every rank of this run (missing ranks left out after a stall)."""
        last_change, seen = time.monotonic(), None
        while True:
            reports = read_progress(self.out_dir, self.world_size, run_id, started_at)
            refresh()
            if len(reports) == self.world_size and all(r.get("done") for r in reports.values()):
                return reports
            state = json.dumps(reports, sort_keys=True)
            if state != seen:
                seen, last_change = state, time.monotonic()
            elif time.monotonic() - last_change > self.stall_seconds:
                missing = sorted(
                    set(range(self.world_size)) - {r for r, c in reports.items() if c.get("done")}
                )
                logger.warning("ranks %s did not finish (no report for %.0f s); summary without them",
                               missing, self.stall_seconds)  # fmt: skip
                return {r: c for r, c in reports.items() if c.get("done")}
            time.sleep(self.poll_seconds)


__all__ = [
    "DEFAULT_METHOD",
    "MANIFEST",
    "TEXT_PARAMS",
    "VIDEO_PARAMS",
    "BatchRunner",
    "Item",
    "allowed_columns",
    "append_record",
    "distributed_rank",
    "journal_path",
    "latest_records",
    "merge_manifests",
    "output_name",
    "read_prompt_file",
    "read_records",
    "slugify",
]
