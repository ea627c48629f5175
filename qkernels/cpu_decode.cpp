// The small ops of one decode step (one new token per row), fused so that a layer is a handful of
// calls instead of some sixty small aten ops, whose dispatch cost more than their arithmetic:
//
// - decode_attention(q, k, v, rope_table, k_cache, v_cache, rows, positions, kv_len, window): rope on
//   q and k (the rotate-half layout of HF checkpoints; cos and sin are the two halves of
//   rope_table[positions[b]]), k and v written into the static cache at
//   (rows[b], positions[b]), and attention of each row's one query over its cache positions
//   0..positions[b] (the last `window` of them for sliding-window layers), GQA; y [B, H * D].
// - add_rms_norm_(x, delta, weight, eps): x += delta (when given) in place, returns
//   RMSNorm(x) * weight: the residual add of a layer and the next norm in one pass.
//
// fp32 throughout, in the order of the torch ops they replace (no FMA contraction: the build has
// -ffp-contract=off), so values differ from the unfused step only in the order of the sums.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace {

// Eight partial sums, which gcc vectorizes (a single running sum it may not reorder).
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t n8 = n - n % 8;
  for (int64_t i = 0; i < n8; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (int64_t i = n8; i < n; ++i) s += a[i] * b[i];
  return s;
}

// x * cos + cat(-x2, x1) * sin over one head of D = 2 * half values, into out.
inline void rope(const float* x, const float* c, const float* s, int64_t half, float* out) {
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * c[i] - x[i + half] * s[i];
    out[i + half] = x[i + half] * c[i] + x[i] * s[i];
  }
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const at::Tensor& rope_table, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& rows,
                            const at::Tensor& positions, int64_t kv_len, int64_t window) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat,
              "the caches must be contiguous float32 [slots, kv_heads, positions, head_dim]");
  // The projections' outputs are contiguous already, unless a LoRA layer returned a view.
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t slots = k_cache.size(0), KV = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
  const int64_t B = q.size(0), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && q.dim() == 2 && q.size(1) % D == 0, "q must be [B, heads * ", D, "]");
  const int64_t H = q.size(1) / D;
  TORCH_CHECK(H % KV == 0, "query heads ", H, " not a multiple of kv heads ", KV);
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == B,
                "q, k, v must be float32 with ", B, " rows");
  TORCH_CHECK(k.size(1) == KV * D && v.size(1) == KV * D, "k, v must be [B, ", KV * D, "]");
  TORCH_CHECK(rope_table.scalar_type() == at::kFloat && rope_table.is_contiguous() && rope_table.dim() == 2 &&
                  rope_table.size(1) == D,
              "rope_table must be contiguous float32 [positions, ", D, "]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && rows.numel() == B &&
                  positions.numel() == B && rows.is_contiguous() && positions.is_contiguous(),
              "rows and positions must be int64 [B]");
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(rp[b] >= 0 && rp[b] < slots && pp[b] >= 0 && pp[b] < S && pp[b] < rope_table.size(0), "row ", b,
                ": slot ", rp[b], " position ", pp[b], " outside the cache [", slots, ", ", S, "] or rope table");

  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* cp = rope_table.data_ptr<float>();  // row p: cos(p * f) in [0, half), sin(p * f) in [half, D)
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  // Write the new keys (rotated) and values first: every query head of a row reads them.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < KV; ++g) {
      const int64_t at = ((rp[b] * KV + g) * S + pp[b]) * D;
      rope(kp + (b * KV + g) * D, cp + pp[b] * D, cp + pp[b] * D + half, half, kc + at);
      std::copy_n(vp + (b * KV + g) * D, D, vc + at);
    }
  at::Tensor y = at::empty({B, H * D}, q.options());
  float* yp = y.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t group = H / KV;
  const int64_t span = std::min(S, std::max<int64_t>(kv_len, 1));
  // One task per (row, query head); only a long cache is worth more than one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (span * D));
  at::parallel_for(0, B * H, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> qr(D), p(span);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / group;
      rope(qp + i * D, cp + pp[b] * D, cp + pp[b] * D + half, half, qr.data());
      const int64_t end = std::min(pp[b] + 1, span);
      const int64_t start = window > 0 ? std::max<int64_t>(0, pp[b] - window + 1) : 0;
      const float* keys = kc + (rp[b] * KV + g) * S * D;
      const float* values = vc + (rp[b] * KV + g) * S * D;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = start; j < end; ++j) {
        p[j] = dot(qr.data(), keys + j * D, D) * scale;
        top = std::max(top, p[j]);
      }
      float total = 0.f;
      for (int64_t j = start; j < end; ++j) {
        p[j] = std::exp(p[j] - top);
        total += p[j];
      }
      float* out = yp + i * D;
      std::fill_n(out, D, 0.f);
      for (int64_t j = start; j < end; ++j) {
        const float w = p[j] / total;
        const float* vj = values + j * D;
        for (int64_t d = 0; d < D; ++d) out[d] += w * vj[d];
      }
    }
  });
  return y;
}

at::Tensor add_rms_norm_(at::Tensor& x, const std::optional<at::Tensor>& delta, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && weight.scalar_type() == at::kFloat &&
                  weight.is_contiguous() && weight.dim() == 1 && x.size(-1) == weight.size(0),
              "x must be contiguous float32 [..., ", weight.size(0), "] like the norm's weight");
  const int64_t D = weight.size(0), R = x.numel() / std::max<int64_t>(D, 1);
  float* xp = x.data_ptr<float>();
  const float* dp = nullptr;
  at::Tensor dc;
  if (delta.has_value()) {
    TORCH_CHECK(delta->scalar_type() == at::kFloat && delta->numel() == x.numel(), "delta must be float32 shaped like x");
    dc = delta->contiguous();
    dp = dc.data_ptr<float>();
  }
  at::Tensor y = at::empty_like(x);
  float* yp = y.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    float* xr = xp + r * D;
    if (dp)
      for (int64_t d = 0; d < D; ++d) xr[d] += dp[r * D + d];
    const float inv = 1.0f / std::sqrt(dot(xr, xr, D) / static_cast<float>(D) + static_cast<float>(eps));
    for (int64_t d = 0; d < D; ++d) yp[r * D + d] = xr[d] * inv * wp[d];
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qkernels_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor rope_table, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor rows, Tensor positions, int kv_len, int window) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor? delta, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(qkernels_cpu, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("add_rms_norm_", &add_rms_norm_);
}
