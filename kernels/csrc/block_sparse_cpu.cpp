// Block-sparse attention forward for the CPU, FlashAttention-2 style: one work item is a query
// block (all its rows at once), walking its list of selected key blocks in chunks of up to
// kChunk blocks with an fp32 online softmax. Each chunk's key blocks, then its value blocks, are
// copied into a small per-thread buffer (it stays in cache) so both products are one
// single-threaded BLAS call each (measured ~8% faster than one call per block in place); work
// items are spread over the intra-op threads. Extra keys (the bias slots: Rectified SpaAttn's
// text, pooled and isolated keys) are packed per query block, keeping only those its bias does
// not hide. Also SparseD's block importance (block_mass). Registered as torch.ops.fastgen_cpu.*;
// built and called by kernels/cpu_attn.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 4;  // key blocks per softmax update
constexpr int64_t kPad = 16;   // packed extra-key columns are padded to this (any vector width divides it)
using Vec = at::vec::Vectorized<float>;

// MKL's Fortran sgemm, exported by PyTorch's x86 CPU build (column-major, LP64).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

inline void gemm(bool trans_a, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = 'N';
  const int mi = m, ni = n, ki = k, lda_i = lda, ldb_i = ldb, ldc_i = ldc;
  sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &lda_i, b, &ldb_i, &beta, c, &ldc_i);
}

// Copies len rows of src (rows of D floats) from row `row` on to dst [bs, D], zeros after them
// (padded keys: their logits are set to -inf, so p = 0 meets a finite 0 value).
inline void load_block(const float* src, int64_t row, int64_t len, int64_t bs, int64_t D, float* dst) {
  std::copy(src + row * D, src + (row + len) * D, dst);
  if (len < bs) std::fill(dst + len * D, dst + bs * D, 0.f);
}

// Inputs are arrays of rows of D floats.
//   q: [R, bs, D] block-major, or rows [M, D] with q_start int64 / q_len int32 [R] (first row and
//      number of rows of each query block);
//   k, v: [T, bs, D] block-major, or rows with k_start int64 [T] (first row of each key block);
//   idx int32 [R, S]: key blocks per query block, the first counts[r] (int32 [R]) of them used;
//   block_len int32 [T]: valid keys per key block (default bs);
//   bias fp32 [R, Sb*bs]: additive logits of the last Sb slots (extra keys, always walked);
//   out: q's rows, or dest [M, D] with out_rows int64 [R*bs] (query row i -> dest[out_rows[i]]);
//   lse: one value per q row, or empty.
void block_sparse_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
    const at::Tensor& counts, int64_t block_size, const std::optional<at::Tensor>& block_len,
    const std::optional<at::Tensor>& bias, double scale, at::Tensor& out,
    const std::optional<at::Tensor>& out_rows, const std::optional<at::Tensor>& lse,
    const std::optional<at::Tensor>& k_start, const std::optional<at::Tensor>& q_start,
    const std::optional<at::Tensor>& q_len) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "block_sparse_fwd: float32 tensors expected");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && idx.is_contiguous() &&
                  out.is_contiguous(),
              "block_sparse_fwd: contiguous tensors expected");
  TORCH_CHECK(idx.scalar_type() == at::kInt && counts.scalar_type() == at::kInt && counts.is_contiguous(),
              "block_sparse_fwd: int32 idx/counts expected");
  // q, k, v (and out, lse) are arrays of rows of D floats; a block starts at row block*bs unless
  // k_start / q_start say otherwise (unpadded [B*H*N, D] inputs whose blocks do not tile evenly)
  const int64_t bs = block_size, D = q.size(-1), S = idx.size(1), R = idx.size(0);
  const int64_t T = k_start.has_value() && k_start->defined() ? k_start->numel() : k.numel() / (bs * D);
  TORCH_CHECK(bs > 0 && k.size(-1) == D && v.sizes() == k.sizes(), "block_sparse_fwd: k/v shape");
  TORCH_CHECK(counts.numel() == R, "block_sparse_fwd: idx/counts shape");
  const int64_t* ksp = nullptr;
  if (k_start.has_value() && k_start->defined()) {
    TORCH_CHECK(k_start->scalar_type() == at::kLong && k_start->is_contiguous(), "block_sparse_fwd: k_start int64");
    ksp = k_start->data_ptr<int64_t>();
  }
  const int64_t* qsp = nullptr;
  const int32_t* qlp = nullptr;
  if (q_start.has_value() && q_start->defined()) {
    TORCH_CHECK(q_start->scalar_type() == at::kLong && q_start->numel() == R && q_len.has_value() &&
                    q_len->defined() && q_len->scalar_type() == at::kInt && q_len->numel() == R,
                "block_sparse_fwd: q_start int64 [R] with q_len int32 [R]");
    qsp = q_start->data_ptr<int64_t>();
    qlp = q_len->data_ptr<int32_t>();
  } else {
    TORCH_CHECK(q.numel() == R * bs * D, "block_sparse_fwd: q must hold R blocks of bs rows");
  }
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int32_t* ip = idx.data_ptr<int32_t>();
  const int32_t* cp = counts.data_ptr<int32_t>();
  const int32_t* lenp = nullptr;
  if (block_len.has_value() && block_len->defined()) {
    TORCH_CHECK(block_len->scalar_type() == at::kInt && block_len->numel() == T && block_len->is_contiguous(),
                "block_sparse_fwd: block_len must be int32 [T]");
    lenp = block_len->data_ptr<int32_t>();
  }
  const float* bp = nullptr;
  int64_t bias_slots = 0;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 2 && bias->size(0) == R &&
                    bias->size(1) % bs == 0 && bias->is_contiguous(),
                "block_sparse_fwd: bias must be float32 [R, Sb*bs]");
    bias_slots = bias->size(1) / bs;
    TORCH_CHECK(bias_slots <= S, "block_sparse_fwd: bias covers more slots than idx has");
    bp = bias->data_ptr<float>();
  }
  const int64_t first_bias_slot = S - bias_slots;
  const int64_t* rowp = nullptr;
  if (out_rows.has_value() && out_rows->defined()) {
    TORCH_CHECK(out_rows->scalar_type() == at::kLong && out_rows->numel() == R * bs && out.dim() == 2 &&
                    out.size(1) == D,
                "block_sparse_fwd: out_rows int64 [R*bs] with out [M, D]");
    rowp = out_rows->data_ptr<int64_t>();
  } else {
    TORCH_CHECK(out.numel() == q.numel(), "block_sparse_fwd: out must have q's rows");
  }
  float* op = out.data_ptr<float>();
  float* lp = nullptr;
  if (lse.has_value() && lse->defined()) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->numel() * D == q.numel() && lse->is_contiguous(),
                "block_sparse_fwd: lse must be float32 with one value per q row");
    lp = lse->data_ptr<float>();
  }
  const float sc = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t width = kChunk * bs;
  auto first_row = [&](int64_t blk) { return ksp ? ksp[blk] : blk * bs; };

  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s_buf(bs * width), acc(bs * D), m(bs), l(bs), kv_buf(width * D), col_bias(width);
    std::vector<int64_t> extra_rows;
    std::vector<float> extra_bias;

    // Online-softmax update with S[:, :cols] (scaled logits, plus col_bias per column if given):
    // p = exp(s - m_new) in place, row sums, acc rescaled; the caller then adds P · V.
    auto softmax_update = [&](int64_t rows, int64_t cols, const float* bias_cols) {
      for (int64_t i = 0; i < rows; ++i) {
        float* row = s_buf.data() + i * width;
        if (bias_cols) at::vec::map2<float>([](Vec a, Vec b) { return a + b; }, row, row, bias_cols, cols);
        const float mx =
            at::vec::reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, row, cols);
        const float m_new = std::max(m[i], mx);
        if (m_new == neg_inf) {  // nothing visible yet in this row
          std::fill(row, row + cols, 0.f);
          continue;
        }
        // exp and its row sum in one pass (cols is a multiple of the vector width)
        const Vec vmax(m_new);
        Vec vsum(0.f);
        for (int64_t x = 0; x < cols; x += Vec::size()) {
          const Vec e = (Vec::loadu(row + x) - vmax).exp_u20();
          e.store(row + x);
          vsum = vsum + e;
        }
        const float sum = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, vsum);
        const float alpha = m[i] == neg_inf ? 0.f : std::exp(m[i] - m_new);
        l[i] = l[i] * alpha + sum;
        m[i] = m_new;
        if (alpha != 1.f) {
          float* a = acc.data() + i * D;
          const Vec va(alpha);
          at::vec::map<float>([va](Vec x) { return x * va; }, a, a, D);
        }
      }
    };

    for (int64_t r = begin; r < end; ++r) {
      const int64_t q0 = qsp ? qsp[r] : r * bs;  // first row of this query block, and its rows
      const int64_t nr = qlp ? qlp[r] : bs;
      const float* qr = qp + q0 * D;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), 0.f);
      // selected key blocks (slots past counts[r] are skipped), kChunk blocks at a time
      const int64_t n_slots = std::min<int64_t>(cp[r], first_bias_slot);
      for (int64_t c0 = 0; c0 < n_slots; c0 += kChunk) {
        const int64_t nc = std::min<int64_t>(kChunk, n_slots - c0);
        const int64_t cols = nc * bs;
        int64_t lens[kChunk];
        bool partial = false;
        for (int64_t j = 0; j < nc; ++j) {
          const int64_t blk = ip[r * S + c0 + j];
          lens[j] = lenp ? lenp[blk] : bs;
          partial = partial || lens[j] < bs;
          load_block(kp, first_row(blk), lens[j], bs, D, kv_buf.data() + j * bs * D);
        }
        // S[:, :cols] = scale · Q · Kᵀ  (row-major [bs, width])
        gemm(true, cols, nr, D, sc, kv_buf.data(), D, qr, D, 0.f, s_buf.data(), width);
        for (int64_t i = 0; partial && i < nr; ++i)  // padded keys of a partial block: -inf
          for (int64_t j = 0; j < nc; ++j)
            std::fill(s_buf.data() + i * width + j * bs + lens[j], s_buf.data() + i * width + (j + 1) * bs, neg_inf);
        softmax_update(nr, cols, nullptr);
        // acc += P[:, :cols] · V  (the value blocks reuse the key buffer)
        for (int64_t j = 0; j < nc; ++j)
          load_block(vp, first_row(ip[r * S + c0 + j]), lens[j], bs, D, kv_buf.data() + j * bs * D);
        gemm(false, D, nr, cols, 1.f, kv_buf.data(), D, s_buf.data(), width, 1.f, acc.data(), D);
      }
      // extra keys (bias slots): only those this query block sees (finite bias), packed densely
      extra_rows.clear();
      extra_bias.clear();
      for (int64_t s = first_bias_slot; s < S; ++s) {
        const int64_t blk = ip[r * S + s];
        const int64_t len = lenp ? lenp[blk] : bs;
        const float* brow = bp + r * bias_slots * bs + (s - first_bias_slot) * bs;
        for (int64_t t = 0; t < len; ++t) {
          if (brow[t] != neg_inf) {
            extra_rows.push_back(first_row(blk) + t);
            extra_bias.push_back(brow[t]);
          }
        }
      }
      const int64_t n_extra = extra_rows.size();
      for (int64_t e0 = 0; e0 < n_extra; e0 += width) {
        const int64_t cnt = std::min(width, n_extra - e0);
        const int64_t cols = (cnt + kPad - 1) / kPad * kPad;  // padding columns: zero keys, -inf
        for (int64_t c = 0; c < cols; ++c) {
          float* dst = kv_buf.data() + c * D;
          if (c < cnt)
            std::copy(kp + extra_rows[e0 + c] * D, kp + (extra_rows[e0 + c] + 1) * D, dst);
          else
            std::fill(dst, dst + D, 0.f);
          col_bias[c] = c < cnt ? extra_bias[e0 + c] : neg_inf;
        }
        gemm(true, cols, nr, D, sc, kv_buf.data(), D, qr, D, 0.f, s_buf.data(), width);
        softmax_update(nr, cols, col_bias.data());
        for (int64_t c = 0; c < cnt; ++c)
          std::copy(vp + extra_rows[e0 + c] * D, vp + (extra_rows[e0 + c] + 1) * D, kv_buf.data() + c * D);
        gemm(false, D, nr, cols, 1.f, kv_buf.data(), D, s_buf.data(), width, 1.f, acc.data(), D);
      }
      for (int64_t i = 0; i < nr; ++i) {
        float* dst = op + (rowp ? rowp[r * bs + i] : q0 + i) * D;
        const float* a = acc.data() + i * D;
        if (l[i] > 0.f) {
          const Vec inv(1.f / l[i]);
          at::vec::map<float>([inv](Vec x) { return x * inv; }, dst, a, D);
        } else {
          std::fill(dst, dst + D, 0.f);
        }
        if (lp) lp[q0 + i] = l[i] > 0.f ? m[i] + std::log(l[i]) : neg_inf;
      }
    }
  });
}


// SparseD's block importance in one QKᵀ pass: for query block r (of head r / nqb), the attention
// mass its rows put on each key block of the same head, under a softmax over all keys,
// out[r, J] = Σ_i w_i Σ_{j∈J} p_ij. Keys are k [T, bs, D] with the nkb blocks of head h at rows
// h*nkb...; key_bias [B, nkb*bs] (0 or -inf, batch of row r = r / rows_per_batch) or empty;
// w = q_weight [R*bs] (1 real query, 0 padding) or empty. Per row, each chunk's block sums are
// kept relative to the running max at that chunk and rescaled once the final max and sum are
// known, so nothing N x N is stored and no value product is needed.
void block_mass(const at::Tensor& q, const at::Tensor& k, int64_t nqb, int64_t nkb, int64_t rows_per_batch,
                const std::optional<at::Tensor>& key_bias, const std::optional<at::Tensor>& q_weight,
                double scale, at::Tensor& out) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "block_mass: float32 tensors expected");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && out.is_contiguous(), "block_mass: contiguous tensors expected");
  const int64_t R = q.size(0), bs = q.size(1), D = q.size(2);
  TORCH_CHECK(k.size(1) == bs && k.size(2) == D && k.size(0) * nqb == R * nkb, "block_mass: k shape");
  TORCH_CHECK(out.numel() == R * nkb, "block_mass: out must be [R, nkb]");
  const float* kb = nullptr;
  if (key_bias.has_value() && key_bias->defined()) {
    TORCH_CHECK(key_bias->scalar_type() == at::kFloat && key_bias->is_contiguous() && key_bias->size(-1) == nkb * bs,
                "block_mass: key_bias must be float32 [B, nkb*bs]");
    kb = key_bias->data_ptr<float>();
  }
  const float* wp = nullptr;
  if (q_weight.has_value() && q_weight->defined()) {
    TORCH_CHECK(q_weight->scalar_type() == at::kFloat && q_weight->numel() == R * bs, "block_mass: q_weight [R*bs]");
    wp = q_weight->data_ptr<float>();
  }
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t width = kChunk * bs;
  const int64_t n_chunks = (nkb + kChunk - 1) / kChunk;

  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s_buf(bs * width), k_buf(width * D), m(bs), l(bs), mass(bs * nkb), m_ref(bs * n_chunks);
    for (int64_t r = begin; r < end; ++r) {
      const float* qr = qp + r * bs * D;
      const float* bias = kb ? kb + (r / rows_per_batch) * nkb * bs : nullptr;
      const int64_t first_block = (r / nqb) * nkb;
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t b0 = c * kChunk, nc = std::min(kChunk, nkb - b0), cols = nc * bs;
        for (int64_t j = 0; j < nc; ++j)
          load_block(kp, (first_block + b0 + j) * bs, bs, bs, D, k_buf.data() + j * bs * D);
        gemm(true, cols, bs, D, sc, k_buf.data(), D, qr, D, 0.f, s_buf.data(), width);
        for (int64_t i = 0; i < bs; ++i) {
          float* row = s_buf.data() + i * width;
          if (bias) at::vec::map2<float>([](Vec a, Vec b) { return a + b; }, row, row, bias + b0 * bs, cols);
          const float mx = at::vec::reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, row, cols);
          const float m_new = std::max(m[i], mx);
          m_ref[i * n_chunks + c] = m_new;
          float* row_mass = mass.data() + i * nkb + b0;
          if (m_new == neg_inf) {
            std::fill(row_mass, row_mass + nc, 0.f);
            continue;
          }
          const Vec vmax(m_new);
          float total = 0.f;
          for (int64_t j = 0; j < nc; ++j) {
            Vec vsum(0.f);
            for (int64_t x = j * bs; x < (j + 1) * bs; x += Vec::size())
              vsum = vsum + (Vec::loadu(row + x) - vmax).exp_u20();
            row_mass[j] = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, vsum);
            total += row_mass[j];
          }
          l[i] = l[i] * (m[i] == neg_inf ? 0.f : std::exp(m[i] - m_new)) + total;
          m[i] = m_new;
        }
      }
      float* dst = op + r * nkb;
      std::fill(dst, dst + nkb, 0.f);
      for (int64_t i = 0; i < bs; ++i) {
        const float w = wp ? wp[r * bs + i] : 1.f;
        if (w == 0.f || l[i] <= 0.f) continue;
        for (int64_t c = 0; c < n_chunks; ++c) {
          const float ref = m_ref[i * n_chunks + c];
          if (ref == neg_inf) continue;
          const float factor = w * std::exp(ref - m[i]) / l[i];
          const int64_t b0 = c * kChunk, nc = std::min(kChunk, nkb - b0);
          for (int64_t j = 0; j < nc; ++j) dst[b0 + j] += factor * mass[i * nkb + b0 + j];
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(fastgen_cpu, lib) {
  lib.def(
      "block_sparse_fwd(Tensor q, Tensor k, Tensor v, Tensor idx, Tensor counts, int block_size, "
      "Tensor? block_len, Tensor? bias, float scale, Tensor(a!) out, Tensor? out_rows, Tensor(b!)? lse, "
      "Tensor? k_start, Tensor? q_start, Tensor? q_len) -> ()");
  lib.def(
      "block_mass(Tensor q, Tensor k, int nqb, int nkb, int rows_per_batch, Tensor? key_bias, Tensor? q_weight, "
      "float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastgen_cpu, CPU, lib) {
  lib.impl("block_sparse_fwd", &block_sparse_fwd);
  lib.impl("block_mass", &block_mass);
}
