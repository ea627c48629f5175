// What the fused decode ops (cpu_decode.cpp) and the whole-stack decode step (cpu_decode_stack.cpp)
// share: the arithmetic of rope, the cache write, one query head's attention and the residual add +
// RMSNorm, so that both compute every value in the same order (the same bits).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace qkernels_decode {

// rows and positions int64 [B]: each row's cache slot in [0, slots) and position in [0, S), with a
// row of the rope table. Fails naming the row otherwise.
inline void check_rows_positions(const at::Tensor& rows, const at::Tensor& positions, int64_t B, int64_t slots,
                                 int64_t S, int64_t rope_rows) {
  TORCH_CHECK(rows.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && rows.numel() == B &&
                  positions.numel() == B && rows.is_contiguous() && positions.is_contiguous(),
              "rows and positions must be int64 [B]");
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(rp[b] >= 0 && rp[b] < slots && pp[b] >= 0 && pp[b] < S && pp[b] < rope_rows, "row ", b, ": slot ",
                rp[b], " position ", pp[b], " outside the cache [", slots, ", ", S, "] or rope table");
}

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

// The new keys (rotated) and values of B rows, k and v [B, KV * D], written into the caches
// [slots, KV, S, D] at (rows[b], positions[b]); rope_table row p holds cos | sin of position p.
inline void write_kv(const float* kp, const float* vp, const float* rope_table, int64_t B, int64_t KV, int64_t S,
                     int64_t D, const int64_t* rows, const int64_t* positions, float* k_cache, float* v_cache) {
  const int64_t half = D / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < KV; ++g) {
      const int64_t at = ((rows[b] * KV + g) * S + positions[b]) * D;
      const float* cs = rope_table + positions[b] * D;
      rope(kp + (b * KV + g) * D, cs, cs + half, half, k_cache + at);
      std::copy_n(vp + (b * KV + g) * D, D, v_cache + at);
    }
}

// One query head q [D] at `position` (rotated here, into qr [D]) over its cache's keys and values
// [S, D] at positions 0..position (the last `window` when > 0) within the first `span`: out [D].
// p: scratch of at least `span` floats.
inline void attend(const float* q, const float* rope_table, const float* keys, const float* values, int64_t position,
                   int64_t span, int64_t window, int64_t D, float* qr, float* p, float* out) {
  const int64_t half = D / 2;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  rope(q, rope_table + position * D, rope_table + position * D + half, half, qr);
  const int64_t end = std::min(position + 1, span);
  const int64_t start = window > 0 ? std::max<int64_t>(0, position - window + 1) : 0;
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = start; j < end; ++j) {
    p[j] = dot(qr, keys + j * D, D) * scale;
    top = std::max(top, p[j]);
  }
  float total = 0.f;
  for (int64_t j = start; j < end; ++j) {
    p[j] = std::exp(p[j] - top);
    total += p[j];
  }
  std::fill_n(out, D, 0.f);
  for (int64_t j = start; j < end; ++j) {
    const float w = p[j] / total;
    const float* vj = values + j * D;
    for (int64_t d = 0; d < D; ++d) out[d] += w * vj[d];
  }
}

// x [R, D] += delta (when not null), then y = RMSNorm(x) * weight.
inline void add_rms_norm_rows(float* x, const float* delta, const float* weight, int64_t R, int64_t D, float eps,
                              float* y) {
  for (int64_t r = 0; r < R; ++r) {
    float* xr = x + r * D;
    if (delta)
      for (int64_t d = 0; d < D; ++d) xr[d] += delta[r * D + d];
    const float inv = 1.0f / std::sqrt(dot(xr, xr, D) / static_cast<float>(D) + eps);
    for (int64_t d = 0; d < D; ++d) y[r * D + d] = xr[d] * inv * weight[d];
  }
}

}  // namespace qkernels_decode
