"""Checks of ``fastgen batch`` before any work: its command line (the same validation layer as
``fastgen generate``) and every row of its prompt file (ranges, relevance, image files, what the method
config says), all problems reported at once."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from fastgen.cli.batch.prompts import Item


def batch_run(args: argparse.Namespace, kind: str | None):
    """The :class:`fastgen.cli.options.Run` of a batch: its family (from ``kind`` when given, else from
    the preset or checkpoint), its method and its source; and every command-line check of
    ``fastgen generate`` that needs no model (option ranges and relevance, device, checkpoint files,
    ``--compare-dense`` / ``--rounds``, ``--image``), all problems in one :class:`UsageError`."""
    from fastgen.cli.checks import check_checkpoint_folder, check_device, check_torch_file
    from fastgen.cli.generate import (
        UsageError,
        is_causal_request,
        option_values,
        resolve_family,
        takes_image_source,
    )
    from fastgen.cli.options import FAMILY_METHODS, Run, check_options, resolve_method

    if kind is None:
        family, source = resolve_family(args)
    else:
        family = "text" if kind == "text" else ("causal" if is_causal_request(args) else "video")
        source = args.preset or args.model or ""
    # the causal Wan runs dense unless a method is named (batch's default since it could run it)
    method = "dense" if family == "causal" and args.method is None else resolve_method(family, args.method)
    run = Run(family, method, source)
    problems = check_options(option_values(args), run)
    if args.compare_dense and run.method == "dense":
        accelerated = ", ".join(m for m in FAMILY_METHODS[family] if m != "dense")
        problems.append(
            f"--compare-dense with --method dense compares dense with itself; allowed: an accelerated --method ({accelerated})"
        )
    if getattr(args, "rounds", None) is not None and not args.compare_dense:
        problems.append(
            f"--rounds={args.rounds} is for --compare-dense timings; add --compare-dense or drop it"
        )
    if getattr(args, "image", None) is not None and family == "video" and kind is None:
        if not takes_image_source(args, family):
            problems.append(
                f"--image={args.image!r} is for image-to-video pipelines (Wan I2V); {source} is text-to-video"
            )
    if problems:
        raise UsageError(problems)
    check_device(args.device)
    if args.model is not None and os.path.isdir(args.model):
        check_checkpoint_folder(args.model)
    if getattr(args, "self_forcing_checkpoint", None) is not None:
        check_torch_file(args.self_forcing_checkpoint, "--self-forcing-checkpoint")
    return run


def item_problems(runner, cli_values: dict) -> Callable[[Item], list[str]]:
    """``check(item)``: the range and relevance problems of one prompt-file row (its overrides on top of
    the command line's values, :func:`fastgen.cli.options.check_options`), its image file, and what its
    method config says of its options; used by :func:`read_prompt_file` so that every bad row of a
    file is reported at once, before any work."""
    from fastgen.cli.options import check_options

    base = {k: v for k, v in cli_values.items() if v is not None}

    def check(item: Item) -> list[str]:
        row = dict(item.overrides)
        if item.seed is not None:
            row["seed"] = item.seed
        if not row:
            return []
        problems = check_options({**base, **row}, runner.run_spec, flag=False)
        image = row.get("image")
        if isinstance(image, str) and not os.path.isfile(image):
            problems.append(f"image={image!r} does not exist; allowed: an existing picture file")
        if not problems:
            try:
                runner.build_config(runner.method_options(item))
            except ValueError as err:
                problems.append(str(err))
        return problems

    return check


__all__ = ["batch_run", "item_problems"]
