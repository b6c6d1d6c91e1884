"""Block-sparse attention on the CPU as a native (C++) kernel, built on first use.

``csrc/block_sparse_cpu.cpp`` is a FlashAttention-2 style forward for fp32: one work item is a
whole query block (128 rows), which walks its selected key blocks in chunks of four with an online
softmax; each chunk's key blocks, then its value blocks, are copied into a small per-thread buffer
so the two products are one single-threaded MKL ``sgemm`` call each, and the work items spread over
torch's intra-op threads. PyTorch's
own CPU flash kernel, given one 128-row query block per batch entry, splits it into 32-row pieces
and runs ~20% slower; FlexAttention's CPU template walks 128x128 tiles and is slower still.

The kernel is compiled with ``torch.utils.cpp_extension`` (a C++ compiler and ``ninja``, both of
which compiled FlexAttention on the CPU needs too) for the instruction set torch itself uses, once
per machine and environment: the library lands in torch's extension cache (``TORCH_EXTENSIONS_DIR``)
in a folder keyed by the source, the flags, the torch version and the interpreter
(:func:`extension_name`), and a successful build is logged at INFO. It links
against the MKL ``sgemm_`` that PyTorch's x86 builds export. :func:`cpu_kernel_unavailable` says
why it cannot be used (no compiler, no MKL, ``FASTGEN_CPU_KERNEL=0``); callers then take the
PyTorch path and log it once.

A build never hangs: torch guards its build folder with a ``lock`` file that a killed build leaves
behind (every later process would wait on it forever). fastgen builds under its own OS file lock
(``fcntl.flock``, released by the kernel when its holder dies), so a torch ``lock`` found while
holding it is stale and is removed with a log line; waiting for a live builder in another process
ends after ``FASTGEN_CPU_BUILD_TIMEOUT`` seconds (default 900) with a reason, and the caller falls
back to the PyTorch path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["block_mass_cpu", "block_sparse_attention_cpu", "cpu_kernel_unavailable", "warm_up_cpu_kernel"]

_SOURCE = Path(__file__).parent / "csrc" / "block_sparse_cpu.cpp"

_BUILD_LOCK = threading.Lock()  # one build/load per process, even with concurrent first calls
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}


_BUILD_LOCK_NAME = "fastgen-build.lock"
"""fastgen's own lock file in the extension's build folder (held with ``fcntl.flock`` while building)."""

_TORCH_LOCK_NAME = "lock"
"""The lock file torch's ``cpp_extension`` creates in the build folder and waits on without limit."""


def build_timeout() -> float:
    """Seconds to wait for another process's build of the kernel (``FASTGEN_CPU_BUILD_TIMEOUT``, 900)."""
    raw = os.environ.get("FASTGEN_CPU_BUILD_TIMEOUT", "900")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(
            f"FASTGEN_CPU_BUILD_TIMEOUT={raw!r} is not allowed; it must be a number of seconds > 0"
        )
    return seconds


def _build_directory(name: str) -> Path:
    """The folder torch's ``cpp_extension.load`` builds extension ``name`` in (created if missing)."""
    from torch.utils import cpp_extension

    if hasattr(cpp_extension, "_get_build_directory"):  # the same folder torch picks by itself
        return Path(cpp_extension._get_build_directory(name, False))
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def exclusive_build(folder: Path, timeout: float, poll: float = 0.2) -> Iterator[str | None]:
    """Hold fastgen's build lock of ``folder`` for the ``with`` body; yields None, or the reason it
    could not be had within ``timeout`` seconds (the body must then not build).

    While it is held no other fastgen process is building, so torch's own ``lock`` file, if present,
    was left by a killed build: it is removed (logged). Without ``fcntl`` (not POSIX) it yields None
    and leaves torch's lock alone.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield None
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / _BUILD_LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        logged = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not logged:
                    holder = path.read_text().strip() or "?"
                    logger.warning(
                        "fastgen: waiting up to %g s for process %s, which is building the native CPU "
                        "attention kernel in %s",
                        timeout,
                        holder,
                        folder,
                    )
                    logged = True
                if time.monotonic() >= deadline:
                    yield (
                        f"timed out after {timeout:g} s waiting for another process building it in "
                        f"{folder} (FASTGEN_CPU_BUILD_TIMEOUT sets the wait)"
                    )
                    return
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        stale = folder / _TORCH_LOCK_NAME
        if stale.exists():
            logger.warning(
                "fastgen: removing %s, left by a build of the native CPU kernel that was killed "
                "(no process is building it now)",
                stale,
            )
            stale.unlink(missing_ok=True)
        try:
            yield None
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _compile(name: str, flags: list[str], timeout: float) -> str | None:
    """Build and load extension ``name`` under :func:`exclusive_build`; the reason it failed, or None."""
    from torch.utils import cpp_extension

    folder = _build_directory(name)
    with exclusive_build(folder, timeout) as why:
        if why is not None:
            return f"could not build the native CPU kernel: {why}"
        try:
            cpp_extension.load(
                name=name,
                sources=[str(_SOURCE)],
                extra_cflags=flags,
                build_directory=str(folder),
                is_python_module=False,
                verbose=False,
            )
        except Exception as err:  # compiler, ninja or the MKL symbol missing: the caller falls back
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"could not build the native CPU kernel: {first_line}"
    logger.info("fastgen: native CPU attention kernel %s ready (built or loaded from %s)", name, folder)
    return None


def extension_name(isa: str, flags: list[str], *, source: Path = _SOURCE) -> str:
    """The extension's (and so its build folder's) name: ``fastgen_cpu_<isa>_<key>``, the key a hash of
    the kernel source (its text and path), the compiler flags, the torch version and the interpreter
    (``sys.prefix``, the Python version), so two virtual environments or checkouts on one machine each
    keep their own build instead of rebuilding over each other."""
    import hashlib
    import sys

    digest = hashlib.sha256()
    for part in (source.read_bytes(), str(source.resolve()).encode(), " ".join(flags).encode(),
                 torch.__version__.encode(), sys.prefix.encode(), sys.version.encode()):  # fmt: skip
        digest.update(part)
        digest.update(b"\0")
    return f"fastgen_cpu_{isa.lower()}_{digest.hexdigest()[:12]}"


@functools.cache
def _build() -> str | None:
    """Compile and load the extension once per process; the reason it failed, or None."""
    if not _SOURCE.is_file():
        return f"kernel source {_SOURCE} is missing"
    capability = torch.backends.cpu.get_cpu_capability()
    isa = "AVX512" if capability.startswith("AVX512") else capability
    flags = ["-O3", "-fopenmp", *_ISA_FLAGS.get(isa, [])]
    if isa in _ISA_FLAGS:
        flags.append(f"-DCPU_CAPABILITY={isa}")
    return _compile(extension_name(isa, flags), flags, build_timeout())


def cpu_kernel_unavailable() -> str | None:
    """None when the native CPU kernel can run, else the reason (built on the first call)."""
    if os.environ.get("FASTGEN_CPU_KERNEL", "1") == "0":
        return "disabled by FASTGEN_CPU_KERNEL=0"
    with _BUILD_LOCK:
        return _build()


def _op_defined(qualname: str) -> bool:
    """Whether the custom op ``namespace::name`` is registered in this process already."""
    namespace, name = qualname.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


def _require_kernel() -> None:
    why = cpu_kernel_unavailable()
    if why is not None:
        raise RuntimeError(f"fastgen: native CPU block-sparse kernel unavailable ({why})")


# The kernels as ``torch.library`` custom ops (namespace ``fastgen``): opaque to ``torch.compile``,
# which traces through them with their fake (meta) implementations; the build and the lock files
# are touched only when an op really runs. Functional: each op allocates what it returns.


if not _op_defined("fastgen::block_sparse_cpu"):  # a second copy of this module keeps the first registration

    @torch.library.custom_op("fastgen::block_sparse_cpu", mutates_args=())
    def _block_sparse_cpu_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        indices: torch.Tensor,
        counts: torch.Tensor,
        block_size: int,
        block_len: torch.Tensor | None,
        bias: torch.Tensor | None,
        scale: float,
        need_lse: bool,
        k_start: torch.Tensor | None,
        q_start: torch.Tensor | None,
        q_len: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [q.shape], lse [q.shape[:-1]] or [0])`` of the native kernel (see :func:`block_sparse_attention_cpu`)."""
        _require_kernel()
        out = torch.empty(q.shape, dtype=torch.float32)
        lse = torch.empty(q.shape[:-1] if need_lse else (0,), dtype=torch.float32)
        torch.ops.fastgen_cpu.block_sparse_fwd(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            indices.contiguous(),
            counts.contiguous(),
            block_size,
            block_len,
            bias,
            scale,
            out,
            None,
            lse if need_lse else None,
            k_start,
            q_start,
            q_len,
        )
        return out, lse

    @_block_sparse_cpu_op.register_fake
    def _(q, k, v, indices, counts, block_size, block_len, bias, scale, need_lse, k_start, q_start, q_len):
        out = q.new_empty(q.shape, dtype=torch.float32)
        return out, q.new_empty(q.shape[:-1] if need_lse else (0,), dtype=torch.float32)


if not _op_defined("fastgen::block_mass_cpu"):  # a second copy of this module keeps the first registration

    @torch.library.custom_op("fastgen::block_mass_cpu", mutates_args=())
    def _block_mass_cpu_op(
        q_blocks: torch.Tensor,
        k_blocks: torch.Tensor,
        nqb: int,
        nkb: int,
        rows_per_batch: int,
        key_bias: torch.Tensor | None,
        q_weight: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """``[R, nkb]`` fp32 block mass of the native kernel (see :func:`block_mass_cpu`)."""
        _require_kernel()
        out = torch.empty(q_blocks.shape[0], nkb, dtype=torch.float32)
        torch.ops.fastgen_cpu.block_mass(
            q_blocks.contiguous(),
            k_blocks.contiguous(),
            nqb,
            nkb,
            rows_per_batch,
            key_bias,
            q_weight,
            scale,
            out,
        )
        return out

    @_block_mass_cpu_op.register_fake
    def _(q_blocks, k_blocks, nqb, nkb, rows_per_batch, key_bias, q_weight, scale):
        return q_blocks.new_empty((q_blocks.shape[0], nkb), dtype=torch.float32)


def block_sparse_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    scale: float,
    *,
    block_size: int | None = None,
    block_len: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_rows: torch.Tensor | None = None,
    return_lse: bool = True,
    k_start: torch.Tensor | None = None,
    q_start: torch.Tensor | None = None,
    q_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the native kernel on fp32 tensors; returns ``(out, lse)``.

    Block-major: ``q [R, bs, D]`` (R query blocks), ``k``/``v [T, bs, D]``. Rows: ``q [M, D]`` with
    ``q_start`` int64 / ``q_len`` int32 ``[R]`` (first row and number of rows of each query block)
    and ``k``/``v [M', D]`` with ``k_start [T]`` int64 (first row of each key block) — unpadded
    inputs whose blocks do not tile them evenly; ``block_size`` is then required. ``indices [R, S]``
    int32 key blocks per query block of which the first ``counts[r]`` (int32) are used, plus the last
    ``bias.shape[1] // bs`` slots always (extra keys, with the additive fp32 logit ``bias``
    ``[R, Sb*bs]``; only the keys a query block sees are computed); ``block_len [T]`` int32 valid
    keys per key block (default all). ``out`` has q's shape by default, or is ``[M, D]`` with
    ``out_rows [R*bs]`` int64 giving each query row's destination row; ``lse`` has q's shape without
    its last dim. Query rows that see no key get zeros and LSE ``-inf``.

    Without ``out`` this is the custom op ``torch.ops.fastgen.block_sparse_cpu`` (traceable by
    ``torch.compile``); writing into a given ``out`` calls the kernel directly (eager only).
    """
    bs = int(block_size) if block_size is not None else q.shape[1]
    if out is None:
        out, lse = torch.ops.fastgen.block_sparse_cpu(
            q, k, v, indices, counts, bs, block_len, bias, float(scale), return_lse, k_start, q_start, q_len
        )
        return out, lse if return_lse else None
    _require_kernel()
    lse = torch.empty(q.shape[:-1], dtype=torch.float32) if return_lse else None
    torch.ops.fastgen_cpu.block_sparse_fwd(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        indices.contiguous(),
        counts.contiguous(),
        bs,
        block_len,
        bias,
        float(scale),
        out,
        out_rows,
        lse,
        k_start,
        q_start,
        q_len,
    )
    return out, lse


def block_mass_cpu(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    nqb: int,
    nkb: int,
    scale: float,
    *,
    key_bias: torch.Tensor | None = None,
    q_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention mass of each query block on each key block of its head, ``[R, nkb]`` fp32.

    ``q_blocks [R, bs, D]`` with ``R = B*H*nqb``, ``k_blocks [B*H*nkb, bs, D]``; the softmax of each
    query runs over all keys of its head plus ``key_bias`` (fp32 ``[B or 1, nkb*bs]``, 0 or ``-inf``;
    it must hide padded tail keys); ``q_weight [R*bs]`` fp32 weights each query row's mass (0 for
    padding). One ``Q Kᵀ`` pass, no ``N x N`` storage (SparseD's importance). The custom op
    ``torch.ops.fastgen.block_mass_cpu``.
    """
    r = q_blocks.shape[0]
    rows_per_batch = r if key_bias is None or key_bias.shape[0] == 1 else r // key_bias.shape[0]
    return torch.ops.fastgen.block_mass_cpu(
        q_blocks,
        k_blocks,
        int(nqb),
        int(nkb),
        rows_per_batch,
        None if key_bias is None else key_bias.float().contiguous(),
        None if q_weight is None else q_weight.float().contiguous(),
        float(scale),
    )


def warm_up_cpu_kernel() -> str | None:
    """Build (or load) the native kernel now, outside any timed region: a first build on a machine
    takes ~15-60 s. Returns :func:`cpu_kernel_unavailable`'s answer; logs how long a build took."""
    start = time.perf_counter()
    why = cpu_kernel_unavailable()
    seconds = time.perf_counter() - start
    if why is None and seconds > 2.0:
        logger.info(
            "fastgen: built the native CPU attention kernel in %.0f s (cached for later runs)", seconds
        )
    return why
