"""``fastgen batch``, the command: the :class:`~fastgen.cli.batch.runner.BatchRunner` built from the parsed
options (ranks, device, loader, method options) and run over a prompt file, with the summary line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable

from fastgen.cli.batch.manifest import MANIFEST
from fastgen.cli.batch.prompts import TEXT_PARAMS, VIDEO_PARAMS, read_prompt_file
from fastgen.cli.batch.runner import BatchRunner, _method_parts, distributed_rank
from fastgen.configs import METHOD_CONFIGS

logger = logging.getLogger(__name__)


def _rank_and_device(args: argparse.Namespace, plan) -> tuple[int, int, str | None]:
    """This process's share of the items ``(rank, world_size)`` and its device: under context parallelism
    (``plan``) a group of ranks makes each item and the groups split the items; otherwise one GPU per rank
    when several ranks run without ``--device``."""
    rank, world_size, local_rank = distributed_rank()
    device = args.device
    if plan is not None:  # a group of ranks makes each item: the groups split the items, first ranks write
        from fastgen.cli.context_parallel import rank_device

        rank, world_size, device = plan.group, plan.groups, rank_device(plan)
    if device is None and world_size > 1:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
    return rank, world_size, device


def _default_functions(args: argparse.Namespace, kind: str, device) -> tuple[Callable[[], object], Callable]:
    """The loader of the pipeline ``args`` name on ``device`` and the runner's generate function for ``kind``."""
    from fastgen.cli.generate import pipeline_from_args

    if kind == "video":
        from fastgen.pipelines.video_runner import generate_video as generate
    else:
        from fastgen.pipelines.text_runner import generate_text as generate

    def load():
        return pipeline_from_args(args, kind, device)

    return load, generate


def _config_options(args: argparse.Namespace, method: str) -> dict:
    """The method config fields given on the command line (those of every part of a composed method)."""
    config_options = {}
    if method != "dense":
        for f in (f for part in _method_parts(method) for f in dataclasses.fields(METHOD_CONFIGS[part])):
            value = getattr(args, f.name, None)
            if value is not None:
                config_options[f.name] = value
    return config_options


def runner_from_args(
    args: argparse.Namespace,
    *,
    kind: str | None = None,
    load: Callable[[], object] | None = None,
    generate: Callable[..., dict] | None = None,
) -> BatchRunner:
    """Build a :class:`BatchRunner` from ``fastgen batch`` arguments (``load``/``generate`` injectable),
    after every check that needs no model (:func:`fastgen.cli.batch.checks.batch_run`) and of ``--out-dir``."""
    from fastgen.cli.batch.checks import batch_run
    from fastgen.cli.checks import check_writable_folder
    from fastgen.cli.context_parallel import check_context_parallel, enable

    run = batch_run(args, kind)
    plan = check_context_parallel(args, run.family, command="batch")
    kind = "text" if run.family == "text" else "video"
    method = run.method
    if plan is None or plan.writer:
        check_writable_folder(args.out_dir, flag="--out-dir")
    rank, world_size, device = _rank_and_device(args, plan)
    if load is None or generate is None:
        default_load, default_generate = _default_functions(args, kind, device)
        load = load or default_load
        generate = generate or default_generate
    if plan is not None:
        plain_load = load

        def load():
            pipe = plain_load()
            enable(pipe, plan)
            return pipe

    config_options = _config_options(args, method)
    names = VIDEO_PARAMS if kind == "video" else TEXT_PARAMS
    params = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    runner = BatchRunner(
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
        rounds=getattr(args, "rounds", None),
        report=_report if rank == 0 and (plan is None or plan.writer) else None,
        run_spec=run,
        writer=plan is None or plan.writer,
        progress=plan is None or plan.writer,
        context_parallel=plan,
    )
    return runner


def _report(line: str) -> None:
    """A line on screen that does not break the progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def run_batch(
    args: argparse.Namespace,
    *,
    kind: str | None = None,
    load: Callable[[], object] | None = None,
    generate: Callable[..., dict] | None = None,
) -> int:
    """Run ``fastgen batch``; returns 0 when every item of this rank is done, 1 when some failed."""
    from fastgen.cli.batch.checks import item_problems
    from fastgen.cli.context_parallel import context_parallel_session
    from fastgen.cli.generate import RANDOM_WEIGHTS_NOTE, option_values, random_weights

    runner = runner_from_args(args, kind=kind, load=load, generate=generate)
    items = read_prompt_file(args.prompts, runner.columns(), item_problems(runner, option_values(args)))
    with context_parallel_session(runner.context_parallel):
        counts = runner.run(items)
    if not runner.writer:
        logger.info("context-parallel rank: %s (the group's first rank prints the summary)", counts)
    elif runner.world_size > 1 and runner.rank != 0:
        logger.info("rank %d: %s (rank 0 prints the summary of all ranks)", runner.rank, counts)
    else:
        who, total = "", counts
        if runner.world_size > 1:
            reports = counts.get("ranks", {})
            total = {k: sum(c[k] for c in reports.values()) for k in ("ok", "skipped", "failed", "total")}
            missing = runner.world_size - len(reports)
            who = f"{len(reports)} of {runner.world_size} ranks" + (
                f" ({missing} did not report)" if missing else ""
            )
            who += ": "
        sys.stderr.write(
            f"fastgen batch: {who}{total['ok']} generated, {total['skipped']} already done, "
            f"{total['failed']} failed, of {total['total']} items; manifest: "
            f"{os.path.join(runner.out_dir, MANIFEST)}\n"
        )
        if random_weights(runner.model):
            sys.stderr.write(f"fastgen batch: note: {runner.model} has {RANDOM_WEIGHTS_NOTE}\n")
    if counts["failed"]:
        logger.warning(
            "%d item(s) failed; see 'error' in the manifest; re-run to retry them", counts["failed"]
        )
    return 1 if counts["failed"] else 0


__all__ = ["run_batch", "runner_from_args"]
