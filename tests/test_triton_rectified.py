"""Tests of the one-pass Triton kernel of Rectified SpaAttn's exact form against a PyTorch reference.

The reference materialises the mixed-resolution softmax (full keys of the selected blocks, text
keys, one pooled key per compensated block) as one ``[B, H, Nq, Nk + T + NKB]`` score matrix.
Without CUDA the kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``, set below
before ``triton`` is imported), on small shapes.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton.language as tl
except Exception as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"triton is not importable ({exc}); the Triton kernel is not tested", allow_module_level=True)

if os.environ.get("TRITON_INTERPRET") == "1" and type(tl.zeros).__name__ == "JITFunction":
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set, so it cannot run on the CPU in this "
        "process; set the variable before the first `import triton` (e.g. in tests/conftest.py)",
        allow_module_level=True,
    )

from fastgen.attention.rectified import rectified_sparse_attention  # noqa: E402
from fastgen.kernels import block_mask_to_indices, block_sparse_attention_triton  # noqa: E402
from fastgen.kernels import rectified_attn as ra  # noqa: E402
from tests.helpers import rel_rmse as relative_rmse  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1.5e-2}


def _rows(block_mask: torch.Tensor, block_size: int, q_len: int) -> torch.Tensor:
    """``[B, H, NQB, X]`` -> ``[B, H, Nq, X]`` (each query block row repeated for its tokens)."""
    return block_mask.repeat_interleave(block_size, dim=2)[:, :, :q_len]


def reference_exact(case: dict, sm_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised mixed-resolution softmax in fp64: ``(out [B, H, Nq, D], lse [B, H, Nq])``."""
    q, k, v = (case[name].double() for name in ("q", "k", "v"))
    batch, heads, q_len, head_dim = q.shape
    bs = case["block_size"]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    # (a) full keys of the selected blocks
    token_mask = _rows(case["selected"], bs, q_len).repeat_interleave(bs, dim=3)[..., : k.shape[2]]
    scores = [(q @ k.transpose(-1, -2) * scale).masked_fill(~token_mask, -math.inf)]
    values = [v[:, :, None].expand(-1, -1, q_len, -1, -1)]  # [B, H, Nq, Nk, D]
    # (b) text keys
    if case.get("text_k") is not None:
        text_scores = q @ case["text_k"].double().transpose(-1, -2) * scale
        if case.get("text_valid") is not None:
            text_scores = text_scores.masked_fill(~case["text_valid"][:, None, None, :], -math.inf)
        scores.append(text_scores)
        values.append(case["text_v"].double()[:, :, None].expand(-1, -1, q_len, -1, -1))
    # (c) pooled keys of the compensated blocks
    pooled_k = case["pooled_k"].double()
    pooled_scores = q @ pooled_k.transpose(-1, -2) * scale + case["log_counts"].double()[:, None, None, :]
    scores.append(pooled_scores.masked_fill(~_rows(case["compensated"], bs, q_len), -math.inf))
    values.append(case["pooled_v"].double()[:, :, None].expand(-1, -1, q_len, -1, -1))
    scores = torch.cat(scores, dim=-1)  # [B, H, Nq, Nk + T + NKB]
    values = torch.cat(values, dim=3)  # [B, H, Nq, Nk + T + NKB, D]
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without keys -> 0
    return torch.einsum("bhqk,bhqkd->bhqd", probs, values), lse


def make_case(
    batch,
    heads,
    q_len,
    head_dim,
    block_size,
    dtype,
    text_len=0,
    density=0.4,
    compensated_density=0.5,
    seed=0,
) -> dict:
    """Random inputs; query block 0 of (b=0, h=0) has no key at all, query block 1 only pooled keys."""
    gen = torch.Generator().manual_seed(seed)
    nb = -(-q_len // block_size)
    q, k, v = (torch.randn(batch, heads, q_len, head_dim, generator=gen) for _ in range(3))
    selected = torch.rand(batch, heads, nb, nb, generator=gen) < density
    compensated = (torch.rand(batch, heads, nb, nb, generator=gen) < compensated_density) & ~selected
    selected[0, 0, 0] = False
    compensated[0, 0, 0] = False
    if nb > 1:
        selected[0, 0, 1] = False
        compensated[0, 0, 1] = False
        compensated[0, 0, 1, 0] = True
    counts = torch.full((nb,), float(block_size))
    counts[-1] = q_len - (nb - 1) * block_size
    padded = torch.nn.functional.pad(k, (0, 0, 0, nb * block_size - q_len))
    pooled_k = padded.view(batch, heads, nb, block_size, head_dim).sum(3) / counts[:, None]
    pooled_v = torch.randn(batch, heads, nb, head_dim, generator=gen)
    case = dict(
        q=q,
        k=k,
        v=v,
        block_size=block_size,
        selected=selected,
        compensated=compensated,
        pooled_k=pooled_k,
        pooled_v=pooled_v,
        log_counts=counts.log().expand(batch, nb).contiguous(),
        text_k=None,
        text_v=None,
        text_valid=None,
    )
    if text_len:
        case["text_k"] = torch.randn(batch, heads, text_len, head_dim, generator=gen)
        case["text_v"] = torch.randn(batch, heads, text_len, head_dim, generator=gen)
        case["text_valid"] = torch.rand(batch, text_len, generator=gen) < 0.7
        case["text_valid"][:, 0] = True
    for name in ("q", "k", "v", "text_k", "text_v"):
        if case[name] is not None:
            case[name] = case[name].to(device=DEVICE, dtype=dtype)
    for name in ("selected", "compensated", "pooled_k", "pooled_v", "log_counts", "text_valid"):
        if case[name] is not None:
            case[name] = case[name].to(DEVICE)
    return case


def run_kernel(case: dict, sm_scale: float | None = None, **tiles) -> tuple[torch.Tensor, torch.Tensor]:
    """Call the launcher on a case (block tables built from its masks)."""
    indices, counts = block_mask_to_indices(case["selected"])
    pooled_indices, pooled_counts = block_mask_to_indices(case["compensated"])
    scale = 1.0 / math.sqrt(case["q"].shape[-1]) if sm_scale is None else sm_scale
    return ra._rectified_exact_attn_fwd(
        case["q"],
        case["k"],
        case["v"],
        indices,
        counts,
        case["pooled_k"],
        case["pooled_v"],
        pooled_indices,
        pooled_counts,
        case["log_counts"],
        case["block_size"],
        scale,
        text_k=case["text_k"],
        text_v=case["text_v"],
        text_valid=case["text_valid"],
        **tiles,
    )


def check(out, lse, case, sm_scale=None):
    """Assert out/lse match the reference; rows without any key are zeros with lse = -inf."""
    ref_out, ref_lse = reference_exact(case, sm_scale)
    q = case["q"]
    has_keys = torch.isfinite(ref_lse)
    tol = TOLERANCE[q.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert relative_rmse(out[has_keys], ref_out[has_keys]) < tol
    assert relative_rmse(lse[has_keys], ref_lse[has_keys]) < tol
    assert (out[~has_keys] == 0).all() and (lse[~has_keys] == float("-inf")).all()


SHAPES = [
    # (batch, heads, q_len, head_dim, block_size, text_len)
    pytest.param(2, 3, 100, 32, 32, 7, id="B2-H3-N100-partial-text7"),
    pytest.param(1, 2, 70, 16, 16, 0, id="D16-no-text"),
    pytest.param(1, 1, 90, 64, 32, 20, id="D64-text20"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("batch", "heads", "q_len", "head_dim", "block_size", "text_len"), SHAPES)
def test_matches_reference(batch, heads, q_len, head_dim, block_size, text_len, dtype):
    case = make_case(batch, heads, q_len, head_dim, block_size, dtype, text_len=text_len)
    out, lse = run_kernel(case)
    if not text_len:  # text keys are seen by every query
        assert (lse[0, 0, :block_size] == float("-inf")).all()  # query block without any key
    check(out, lse, case)


def test_pooled_only_rows_and_no_compensated_blocks():
    """Pooled keys alone give a proper softmax; with none compensated it is the block-sparse kernel."""
    case = make_case(2, 2, 80, 16, 16, torch.float32, seed=2)
    out, lse = run_kernel(case)
    check(out, lse, case)
    only_pooled = case["compensated"][0, 0, 1, :].nonzero().flatten()
    assert only_pooled.numel() == 1 and torch.allclose(
        out[0, 0, 16:32], case["pooled_v"][0, 0, only_pooled].expand(16, -1)
    )

    case["compensated"] = torch.zeros_like(case["compensated"])
    out, lse = run_kernel(case)
    check(out, lse, case)
    indices, counts = block_mask_to_indices(case["selected"])
    sparse_out, sparse_lse = block_sparse_attention_triton(
        case["q"], case["k"], case["v"], indices, counts, 16
    )
    assert torch.equal(out, sparse_out) and torch.equal(lse, sparse_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_custom_scale_with_text(dtype):
    case = make_case(1, 2, 72, 32, 16, dtype, text_len=5, seed=3)
    out, lse = run_kernel(case, sm_scale=0.3)
    check(out, lse, case, sm_scale=0.3)


def test_many_pooled_keys_in_several_tiles():
    """More compensated blocks than one BLOCK_P tile, and sub-tiles of the query/key blocks."""
    case = make_case(
        1, 1, 330, 16, 16, torch.float32, text_len=40, density=0.05, compensated_density=0.95, seed=4
    )
    assert int(case["compensated"].sum(-1).max()) > 16
    out, lse = run_kernel(case, block_m=16, block_n=16, block_p=16)
    check(out, lse, case)


def test_reads_only_listed_pooled_blocks():
    """Pooled keys/values of blocks that are not compensated hold NaN; entries past the count point out of range."""
    case = make_case(1, 2, 96, 32, 32, torch.float32, seed=5)
    used = case["compensated"].any(dim=2)[..., None]  # [B, H, NKB, 1]
    case["pooled_k"] = case["pooled_k"].masked_fill(~used, float("nan"))
    case["pooled_v"] = case["pooled_v"].masked_fill(~used, float("nan"))
    pooled_indices, pooled_counts = block_mask_to_indices(case["compensated"])
    padded = torch.full((1, 2, 3, 5), 10**6, dtype=torch.int32, device=DEVICE)
    padded[..., : pooled_indices.shape[-1]] = torch.where(
        torch.arange(pooled_indices.shape[-1], device=DEVICE) < pooled_counts[..., None],
        pooled_indices,
        10**6,
    )
    indices, counts = block_mask_to_indices(case["selected"])
    out, lse = rectified_exact_attention_triton_call(case, indices, counts, padded, pooled_counts)
    case["pooled_k"] = case["pooled_k"].nan_to_num(0.0)
    case["pooled_v"] = case["pooled_v"].nan_to_num(0.0)
    check(out, lse, case)


def rectified_exact_attention_triton_call(case, indices, counts, pooled_indices, pooled_counts):
    """The public function on a case with explicit block tables."""
    return ra.rectified_exact_attention_triton(
        case["q"],
        case["k"],
        case["v"],
        indices,
        counts,
        case["pooled_k"],
        case["pooled_v"],
        pooled_indices,
        pooled_counts,
        case["log_counts"],
        block_size=case["block_size"],
    )


def test_launcher_rejects_mismatched_pooled_shapes():
    case = make_case(1, 1, 32, 16, 16, torch.float32)
    case["pooled_k"] = case["pooled_k"][..., :8]
    with pytest.raises(ValueError, match="pooled_k"):
        run_kernel(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rectified_plans_run_the_fused_kernel_on_the_triton_engine(dtype, monkeypatch):
    """A Rectified plan (selected blocks + text, pooled and isolated extra keys) on the Triton engine
    is one pass of the rectified kernel and equals the torch engine, with padded text and a 3D grid."""
    import fastgen.kernels as kernels

    calls = []
    fused = kernels.rectified_exact_attention_triton
    monkeypatch.setattr(
        kernels, "rectified_exact_attention_triton", lambda *a, **kw: calls.append(1) or fused(*a, **kw)
    )
    gen = torch.Generator().manual_seed(9)
    grid, text = (2, 6, 8), 9
    n = math.prod(grid) + text
    q, k, v = (torch.randn(2, 3, n, 32, generator=gen).to(dtype) for _ in range(3))
    key_padding_mask = torch.ones(2, n, dtype=torch.bool)
    key_padding_mask[1, -3:] = False
    common = dict(
        sparsity=0.5, block_size=16, num_text_tokens=text, key_padding_mask=key_padding_mask, grid=grid
    )
    fused_out, stats = rectified_sparse_attention(q, k, v, backend="triton", return_stats=True, **common)
    reference = rectified_sparse_attention(q, k, v, backend="torch", **common)
    assert calls == [1]
    assert stats["compensated_mask"].any() and not stats["block_mask"].all()
    assert fused_out.dtype == dtype and fused_out.shape == q.shape
    assert relative_rmse(fused_out, reference) < (1e-5 if dtype == torch.float32 else 1.5e-2)


_COMPILE_SCRIPT = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastgen.kernels import block_sparse_attn as bsa, rectified_attn as ra

kernel = ra._load_kernel()
for dtype, name, head_dim, block_size in [(torch.bfloat16, "bf16", 128, 128),
                                          (torch.float16, "fp16", 64, 128),
                                          (torch.float32, "fp32", 128, 128)]:
    block_m, block_n, num_warps, num_stages = bsa._launch_config(head_dim, block_size, dtype)
    constants = dict(BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_P=block_n,
                     HEAD_DIM=head_dim,
                     DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", DOT_IN_FP32=False)
    pointers = dict(Q=name, K=name, V=name, TEXT_K=name, TEXT_V=name, TEXT_BIAS="fp32", POOLED_K=name,
                    POOLED_V=name, POOLED_LOG_COUNTS="fp32", Out=name, LSE="fp32",
                    KV_BLOCK_INDICES="i32", KV_BLOCK_COUNTS="i32", POOLED_BLOCK_INDICES="i32",
                    POOLED_BLOCK_COUNTS="i32")
    signature = {a: "constexpr" if a in constants else ("*" + pointers[a]) if a in pointers
                 else "fp32" if a.endswith("_log2") else "i32" for a in kernel.arg_names}
    source = ASTSource(kernel, signature, {(kernel.arg_names.index(a),): v for a, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    assert "cubin" in compiled.asm and compiled.metadata.shared <= 227 * 1024, compiled.metadata.shared
"""


@pytest.mark.slow
def test_compiles_for_sm90_without_a_gpu():
    """The launch configs compile to a cubin for sm_90 within its shared-memory limit."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
