"""``--context-parallel`` of ``fastgen generate`` and ``fastgen batch``: one video spread over several
GPUs with diffusers' context parallelism (:func:`fastgen.processors.context_parallel_plans.enable_context_parallel`),
one process per GPU under ``torchrun``.

:func:`check_context_parallel` checks the flags before any model is loaded (one line each, exit status 2):
a video model, launched under ``torchrun`` (``WORLD_SIZE`` > 1), a degree that divides the world size,
``--ulysses-degree`` only for ``unified``. :func:`context_parallel_session`
initialises the process group (nccl on CUDA, gloo otherwise), pins ``cuda:LOCAL_RANK`` and destroys the
group at exit, also on an error or Ctrl-C. Every rank runs the same generation with the same seed; only
the writer of a group (its first rank) writes and prints.

Data parallelism over groups (``world size > --cp-degree``): ``batch`` splits the items over the
``world / degree`` groups of consecutive ranks (item ``i`` to group ``i % groups``; each group's first
rank writes its outputs and its own journal, merged into ``manifest.jsonl`` as for plain data
parallelism); ``generate`` (one video) refuses it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MODES = ("ulysses", "ring", "unified")
"""Values of ``--context-parallel``."""

LAUNCH_HINT = "torchrun --nproc-per-node N -m fastgen.cli"
"""How a context-parallel run is launched (shown in messages)."""


@dataclass(frozen=True)
class ContextParallelPlan:
    """What ``--context-parallel`` asks for, checked against the launcher's environment."""

    mode: str
    """``"ulysses"``, ``"ring"`` or ``"unified"``."""
    degree: int
    """Ranks per video (``--cp-degree``, default: the world size)."""
    ulysses_degree: int | None
    """Ulysses part of ``unified`` (``None``: the library picks)."""
    rank: int
    """This process's global rank."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """This process's rank on its machine (its GPU)."""

    @property
    def groups(self) -> int:
        """Data-parallel groups (``world_size // degree``), each making its own items."""
        return self.world_size // self.degree

    @property
    def group(self) -> int:
        """This rank's group (ranks ``[g * degree, (g + 1) * degree)``)."""
        return self.rank // self.degree

    @property
    def writer(self) -> bool:
        """Whether this rank writes and prints (the first rank of the group)."""
        return self.rank % self.degree == 0

    def describe(self) -> str:
        """``"ulysses over 2 ranks"``, for the report."""
        extra = f", ulysses degree {self.ulysses_degree}" if self.ulysses_degree else ""
        return f"{self.mode} over {self.degree} ranks{extra}"


def add_context_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """``--context-parallel``, ``--cp-degree`` and ``--ulysses-degree`` (video models, under torchrun)."""
    cp = p.add_argument_group(f"context parallelism (video, one process per GPU: {LAUNCH_HINT} ...)")
    cp.add_argument(
        "--context-parallel",
        default=None,
        choices=MODES,
        help="spread each video over the GPUs with diffusers' context parallelism: ulysses (heads split, "
        "sparse attention kept), ring (K/V gathered) or unified (both)",
    )
    cp.add_argument(
        "--cp-degree",
        type=int,
        default=None,
        help="--context-parallel: ranks per video, >= 2 (default: the world size)",
    )
    cp.add_argument(
        "--ulysses-degree",
        type=int,
        default=None,
        help="--context-parallel unified: the Ulysses part, a divisor of --cp-degree in [2, degree/2] "
        "(default: the largest that divides the head count)",
    )


def _environment() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or rank)
    return rank, world, local


def _family_problem(mode: str, family: str) -> str | None:
    """Why ``--context-parallel=mode`` cannot run ``family`` (``None`` when it can)."""
    if family == "text":
        return (
            f"--context-parallel={mode} is for video models (Wan, HunyuanVideo, the causal Wan); this run is "
            "text (a diffusion LM)"
        )
    return None


def _degree_problem(mode: str, degree, world: int, command: str) -> str | None:
    """Why the launch (``world`` processes) or ``--cp-degree`` does not fit (``None`` when they do)."""
    if world < 2:
        return (
            f"--context-parallel={mode} needs one process per GPU; launch with `{LAUNCH_HINT} {command} ...` "
            f"(WORLD_SIZE is {os.environ.get('WORLD_SIZE', 'unset')})"
        )
    if isinstance(degree, bool) or degree < 2 or world % degree:
        return (
            f"--cp-degree={degree} is not allowed with {world} processes; allowed: a divisor of the world "
            f"size {world}, >= 2"
        )
    if degree != world and command == "generate":
        return (
            f"--cp-degree={degree} with {world} processes: generate makes one video; allowed: --cp-degree "
            f"{world} (the world size; fastgen batch splits items over groups of ranks)"
        )
    return None


def _ulysses_problem(mode: str, ulysses, degree: int) -> str | None:
    """Why ``--ulysses-degree`` (or unified's rank count) does not fit (``None`` when it does)."""
    if ulysses is not None:
        if mode != "unified":
            return f"--ulysses-degree={ulysses} does not apply: it is for --context-parallel unified (this run: {mode})"
        if ulysses < 2 or degree % ulysses or ulysses == degree:
            return (
                f"--ulysses-degree={ulysses} is not allowed for unified over {degree} ranks; allowed: a divisor "
                f"of {degree} in [2, {degree // 2}]"
            )
    if mode == "unified" and degree < 4:
        return (
            f"--context-parallel=unified over {degree} ranks has no room for Ulysses x ring; allowed: 4 or more "
            "ranks, or ulysses / ring"
        )
    return None


def _device_problem(mode: str, device) -> str | None:
    """Why ``--device`` or the visible devices do not fit context parallelism (``None`` when they do)."""
    if device is not None and device not in ("cuda", "cpu"):
        return (
            f"--device={device!r} with --context-parallel: each rank uses cuda:LOCAL_RANK; allowed: cuda "
            "(or leave --device out)"
        )
    import torch

    if torch.cuda.is_available() and device == "cpu":
        return "--device='cpu' with --context-parallel: diffusers' context parallelism runs one GPU per rank; allowed: cuda"
    if torch.accelerator.device_count() == 0:
        return f"--context-parallel={mode}: no GPU is visible; diffusers' context parallelism runs one GPU per rank"
    return None


def check_context_parallel(
    args: argparse.Namespace, family: str, *, command: str
) -> ContextParallelPlan | None:
    """Check the context-parallel flags of ``args`` for a run of ``family`` (``video``, ``causal``,
    ``text``) by ``command`` (``generate`` / ``batch``) before any model is loaded; returns the plan
    (``None`` without ``--context-parallel``). Raises :class:`fastgen.cli.generate.UsageError` (one
    line per problem)."""
    from fastgen.cli.checks import UsageError

    mode = getattr(args, "context_parallel", None)
    degree = getattr(args, "cp_degree", None)
    ulysses = getattr(args, "ulysses_degree", None)
    if mode is None:
        stray = [
            f"--{n}={v}" for n, v in (("cp-degree", degree), ("ulysses-degree", ulysses)) if v is not None
        ]
        if stray:
            raise UsageError(
                [
                    f"{', '.join(stray)} does not apply: it is for --context-parallel; add --context-parallel ulysses|ring|unified"
                ]
            )
        return None
    problem = _family_problem(mode, family)
    if problem is None:
        rank, world, local = _environment()
        degree = world if degree is None else degree
        problem = (
            _degree_problem(mode, degree, world, command)
            or _ulysses_problem(mode, ulysses, degree)
            or _device_problem(mode, getattr(args, "device", None))
        )
    if problem is not None:
        raise UsageError([problem])
    return ContextParallelPlan(mode, degree, ulysses, rank, world, local)


def rank_device(plan: ContextParallelPlan) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{plan.local_rank % torch.cuda.device_count()}"
    return "cpu"


@contextlib.contextmanager
def context_parallel_session(plan: ContextParallelPlan | None):
    """Initialise the process group for ``plan`` (nccl on CUDA, gloo otherwise; nothing when ``None``),
    pin this rank's GPU, and destroy the group at exit, also after an error or Ctrl-C."""
    if plan is None:
        yield
        return
    import torch
    import torch.distributed as dist

    owns = not dist.is_initialized()
    if owns:
        if torch.cuda.is_available():
            torch.cuda.set_device(rank_device(plan))
            dist.init_process_group("nccl", device_id=torch.device(rank_device(plan)))
        else:
            dist.init_process_group("gloo")
    try:
        yield
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()


def enable(pipe, plan: ContextParallelPlan) -> None:
    """Turn on diffusers' context parallelism on ``pipe``'s transformer(s) as ``plan`` says."""
    from fastgen.processors.context_parallel_plans import degrees, enable_context_parallel

    if plan.groups == 1:
        enable_context_parallel(pipe, plan.mode, plan.degree, ulysses_degree=plan.ulysses_degree)
        return
    # several groups: a ("dp", "ring", "ulysses") mesh over every rank; each group gets its slice
    from torch.distributed.device_mesh import init_device_mesh

    from fastgen.api import pipeline_transformers

    heads = int(pipeline_transformers(pipe)[0].config.num_attention_heads)
    u, r = degrees(plan.mode, plan.degree, heads, plan.ulysses_degree)
    device_type = "cuda" if rank_device(plan).startswith("cuda") else "cpu"
    mesh = init_device_mesh(device_type, (plan.groups, r, u), mesh_dim_names=("dp", "ring", "ulysses"))
    enable_context_parallel(pipe, plan.mode, plan.degree, ulysses_degree=u if r > 1 and u > 1 else None,
                            mesh=mesh["ring", "ulysses"])  # fmt: skip


__all__ = [
    "LAUNCH_HINT",
    "MODES",
    "ContextParallelPlan",
    "add_context_parallel_arguments",
    "check_context_parallel",
    "context_parallel_session",
    "enable",
    "rank_device",
]
