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
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu_decode.h"

namespace {

using namespace qkernels_decode;

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
  check_rows_positions(rows, positions, B, slots, S, rope_table.size(0));
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();

  const float* qp = q.data_ptr<float>();
  const float* cp = rope_table.data_ptr<float>();  // row p: cos(p * f) in [0, half), sin(p * f) in [half, D)
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  // The new keys and values first: every query head of a row reads them.
  write_kv(k.data_ptr<float>(), v.data_ptr<float>(), cp, B, KV, S, D, rp, pp, kc, vc);
  at::Tensor y = at::empty({B, H * D}, q.options());
  float* yp = y.data_ptr<float>();
  const int64_t group = H / KV;
  const int64_t span = std::min(S, std::max<int64_t>(kv_len, 1));
  // One task per (row, query head); only a long cache is worth more than one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (span * D));
  at::parallel_for(0, B * H, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> qr(D), p(span);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, g = (i % H) / group, cache = (rp[b] * KV + g) * S * D;
      attend(qp + i * D, cp, kc + cache, vc + cache, pp[b], span, window, D, qr.data(), p.data(), yp + i * D);
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
  add_rms_norm_rows(xp, dp, weight.data_ptr<float>(), R, D, static_cast<float>(eps), y.data_ptr<float>());
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
