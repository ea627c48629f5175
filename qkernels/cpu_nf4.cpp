// NF4 + double-quant compute on CPU, reading the stored format directly (bitsandbytes layout:
// element 2k in the high nibble of byte k of the row-major flattened weight, one absmax per
// `blocksize` consecutive elements, absmax optionally 8-bit coded against nested fp32 scales).
//
// Two ops, registered as torch.ops.qkernels_cpu.*:
//   gemm(x[M,K], ...) -> y[M,N]     fused dequant + dot products for small M (decode): every
//                                   weight byte is read once and decoded in registers, fp32
//                                   accumulation, rows of W split over torch's intra-op threads.
//   dequantize(..., row0, rows, out)  rows [row0, row0+rows) of W as fp32 into `out` (a
//                                   scratch buffer the caller hands to a BLAS matmul, large M).
// The AVX-512 decode path is cpu_nf4_avx512.cpp; cpu_nf4.h holds what both files share.
// The dequantized value of every weight is the reference's bit for bit:
// fp32(quant_map[code] * absmax[block]) with absmax = fp32(fp32(map[q] * nested) + offset);
// the file is compiled with -ffp-contract=off so no FMA changes that rounding.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_nf4.h"

namespace qkernels_nf4 {

int log2_exact(int64_t v, const char* what) {
  TORCH_CHECK(v > 0 && (v & (v - 1)) == 0, what, " must be a power of two, got ", v);
  int r = 0;
  while ((int64_t{1} << r) < v) ++r;
  return r;
}

BlockScales make_scales(const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                        const std::optional<at::Tensor>& nested_map, double offset, int64_t nested_blocksize) {
  BlockScales s;
  if (nested_absmax.has_value()) {
    TORCH_CHECK(absmax.scalar_type() == at::kByte, "double-quantized absmax must be uint8 codes");
    s.codes = absmax.data_ptr<uint8_t>();
    s.nested_absmax = nested_absmax->data_ptr<float>();
    s.nested_map = nested_map->data_ptr<float>();
    s.offset = static_cast<float>(offset);
    s.nested_shift = log2_exact(nested_blocksize, "nested_blocksize");
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax without double quant must be float32");
    s.absmax = absmax.data_ptr<float>();
  }
  return s;
}

WeightView view_of(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                   const at::Tensor& quant_map, const std::optional<at::Tensor>& nested_map, double offset,
                   int64_t nested_blocksize, int64_t N, int64_t K, float* y) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && 2 * packed.numel() >= N * K,
              "packed must be contiguous uint8 holding ", N, " x ", K, " codes");
  TORCH_CHECK(quant_map.scalar_type() == at::kFloat && quant_map.numel() == 16, "quant_map must be 16 float32");
  return {packed.data_ptr<uint8_t>(), quant_map.data_ptr<float>(),
          make_scales(absmax, nested_absmax, nested_map, offset, nested_blocksize), N, y};
}

}  // namespace qkernels_nf4

namespace {

using namespace qkernels_nf4;

inline float code_of(const uint8_t* packed, int64_t i, const float* qmap) {
  uint8_t byte = packed[i >> 1];
  return qmap[(i & 1) ? (byte & 15) : (byte >> 4)];
}

#ifdef QK_AVX2
// The 16 fp32 code values as four byte planes (byte p of every value), repeated in both 128-bit
// lanes: a 16-entry lookup of 32 nibbles is then four vpshufb, which run two per cycle, where a
// vpermps-based lookup of 8 indices costs two lane-crossing permutes and a blend.
struct CodePlanes {
  __m256i plane[4];
  explicit CodePlanes(const float* qmap) {
    alignas(32) uint8_t bytes[4][32];
    for (int c = 0; c < 16; ++c) {
      uint32_t bits;
      std::memcpy(&bits, qmap + c, 4);
      for (int p = 0; p < 4; ++p) bytes[p][c] = bytes[p][c + 16] = static_cast<uint8_t>(bits >> (8 * p));
    }
    for (int p = 0; p < 4; ++p) plane[p] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[p]));
  }
};

// Decode 16 packed bytes (32 weights w0..w31) into four fp32 code vectors, in the order
//   f[q] = [w(8q), w(8q+2), w(8q+4), w(8q+6) | w(8q+1), w(8q+3), w(8q+5), w(8q+7)]
// (high nibbles, i.e. even elements, in the low lane; low nibbles in the high lane).
inline void decode32(const uint8_t* p, const CodePlanes& cp, __m256 f[4]) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i idx = _mm256_and_si256(_mm256_blend_epi32(_mm256_srli_epi16(v, 4), v, 0xF0), _mm256_set1_epi8(0x0F));
  const __m256i b0 = _mm256_shuffle_epi8(cp.plane[0], idx), b1 = _mm256_shuffle_epi8(cp.plane[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(cp.plane[2], idx), b3 = _mm256_shuffle_epi8(cp.plane[3], idx);
  const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
  f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
  f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
  f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
  f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// The fp32 scales of the blocks that rows [n0, n1) touch, decoded once per task: the inner
// loops then see one load per block instead of the double-quant lookups.
struct RowScales {
  std::vector<float> v;
  int64_t first;
  RowScales(const BlockScales& scales, int bshift, int64_t K, int64_t n0, int64_t n1) {
    first = (n0 * K) >> bshift;
    const int64_t last = (n1 * K - 1) >> bshift;
    v.resize(last - first + 1);
    for (int64_t b = first; b <= last; ++b) v[b - first] = scales(b);
  }
  inline float operator[](int64_t b) const { return v[b - first]; }
};

// Any K, any CPU: element by element.
void gemm_rows_generic(const float* x, int64_t M, int64_t K, const uint8_t* packed, const float* qmap,
                       const BlockScales& block_scales, int bshift, int64_t n0, int64_t n1, int64_t N, float* y) {
  const RowScales scales(block_scales, bshift, K, n0, n1);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = n * K + k;
        acc += code_of(packed, i, qmap) * scales[i >> bshift] * x[m * K + k];
      }
      y[m * N + n] = acc;
    }
  }
}

#ifdef QK_AVX2
// y[m, n] for MB rows of x at once, weight rows [n0, n1), K a multiple of 32. xp is x with each
// group of 8 columns permuted to [x0 x2 x4 x6 x1 x3 x5 x7], the order decode32 produces, so
// decoded vectors multiply x without a shuffle. A row is walked block segment by block segment
// (a block may straddle two rows); segments are multiples of 32 columns.
template <int MB>
void gemm_rows(const float* xp, int64_t K, const uint8_t* packed, const CodePlanes& cp,
               const BlockScales& block_scales, int bshift, int64_t n0, int64_t n1, int64_t N, float* y) {
  const RowScales scales(block_scales, bshift, K, n0, n1);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t base = n * K;
    const uint8_t* row = packed + base / 2;
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K;) {
      const int64_t b = (base + k) >> bshift;
      const int64_t end = std::min(K, ((b + 1) << bshift) - base);
      const __m256 vs = _mm256_set1_ps(scales[b]);
      if (MB == 1) {
        // One row of x: sum code * x over the segment in four independent chains, scale once.
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (; k < end; k += 32) {
          __m256 f[4];
          decode32(row + k / 2, cp, f);
          s0 = _mm256_fmadd_ps(f[0], _mm256_loadu_ps(xp + k), s0);
          s1 = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xp + k + 8), s1);
          s2 = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xp + k + 16), s2);
          s3 = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xp + k + 24), s3);
        }
        acc[0] = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)), vs, acc[0]);
      } else {
        // Several rows of x share each decoded, scaled weight vector.
        for (; k < end; k += 32) {
          __m256 f[4];
          decode32(row + k / 2, cp, f);
          for (int q = 0; q < 4; ++q) {
            const __m256 w = _mm256_mul_ps(f[q], vs);
            for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp + m * K + k + 8 * q), acc[m]);
          }
        }
      }
    }
    for (int m = 0; m < MB; ++m) y[m * N + n] = hsum(acc[m]);
  }
}

template <int MB>
void gemm_group(const float* xp, int64_t K, const uint8_t* packed, const CodePlanes& cp, const BlockScales& scales,
                int bshift, int64_t N, float* y, int64_t grain) {
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    gemm_rows<MB>(xp, K, packed, cp, scales, bshift, n0, n1, N, y);
  });
}
#endif

// One weight where the AVX-512 path does not apply: AVX2 for K % 32 == 0, else element by element.
void gemm_one(const float* x, int64_t M, int64_t K, const WeightView& w, int bshift, int64_t grain) {
#ifdef QK_AVX2
  if (K % 32 == 0) {
    // x with every 8 columns in decode32's order [0 2 4 6 1 3 5 7].
    std::vector<float> xperm(M * K);
    for (int64_t i = 0; i < M * K; i += 8)
      for (int t = 0; t < 4; ++t) {
        xperm[i + t] = x[i + 2 * t];
        xperm[i + 4 + t] = x[i + 2 * t + 1];
      }
    const CodePlanes cp(w.qmap);
    // Groups of up to 8 rows of x share each decoded weight (8 accumulators stay in registers).
    for (int64_t m = 0; m < M;) {
      const int64_t left = M - m;
      const int mb = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
      const float* xm = xperm.data() + m * K;
      float* ym = w.y + m * w.N;
      if (mb == 8) gemm_group<8>(xm, K, w.packed, cp, w.scales, bshift, w.N, ym, grain);
      else if (mb == 4) gemm_group<4>(xm, K, w.packed, cp, w.scales, bshift, w.N, ym, grain);
      else if (mb == 2) gemm_group<2>(xm, K, w.packed, cp, w.scales, bshift, w.N, ym, grain);
      else gemm_group<1>(xm, K, w.packed, cp, w.scales, bshift, w.N, ym, grain);
      m += mb;
    }
    return;
  }
#endif
  at::parallel_for(0, w.N, grain, [&](int64_t n0, int64_t n1) {
    gemm_rows_generic(x, M, K, w.packed, w.qmap, w.scales, bshift, n0, n1, w.N, w.y);
  });
}

// y_i = x @ W_i.T for weights that share K and the blocksize; each y_i allocated in its view. Rows
// of W per thread task: at least grain_weights weights. Forking threads for a small matrix costs
// more than it saves, and on an oversubscribed machine a fork waits for every thread to be scheduled.
void gemm_views(const at::Tensor& xf, int64_t K, int64_t blocksize, const std::vector<WeightView>& ws,
                int64_t grain_weights) {
  const int64_t M = xf.size(0);
  const float* xp = xf.data_ptr<float>();
  const int bshift = log2_exact(blocksize, "blocksize");
  const int64_t grain = std::max<int64_t>(1, grain_weights / K);
#ifdef QK_AVX512
  if (blocksize >= 32 && K % blocksize == 0) return qkernels_nf4::gemm512(xp, M, K, ws, bshift, grain);
#endif
  for (const WeightView& w : ws) gemm_one(xp, M, K, w, bshift, grain);
}

at::Tensor float_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, ", K, "]");
  return x.to(at::kFloat).contiguous();
}

at::Tensor gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                const std::optional<at::Tensor>& nested_absmax, const at::Tensor& quant_map,
                const std::optional<at::Tensor>& nested_map, double offset, int64_t blocksize, int64_t nested_blocksize,
                int64_t N, int64_t K, int64_t grain_weights) {
  const at::Tensor xf = float_rows(x, K);
  at::Tensor y = at::empty({xf.size(0), N}, xf.options());
  gemm_views(xf, K, blocksize,
             {view_of(packed, absmax, nested_absmax, quant_map, nested_map, offset, nested_blocksize, N, K, y.data_ptr<float>())},
             grain_weights);
  return y;
}

// y_i = x @ W_i.T for several weights that share x (a layer's q/k/v, or gate/up) in one call: one
// parallel region over the rows of all of them (AVX-512), and one dispatch instead of several. Each
// output row is computed exactly as `gemm` computes it.
std::vector<at::Tensor> gemm_many(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                  const c10::List<std::optional<at::Tensor>>& nested_absmax, at::TensorList quant_map,
                                  const c10::List<std::optional<at::Tensor>>& nested_map, at::ArrayRef<double> offset,
                                  int64_t blocksize, int64_t nested_blocksize, at::IntArrayRef N, int64_t K,
                                  int64_t grain_weights) {
  const size_t n = packed.size();
  TORCH_CHECK(absmax.size() == n && nested_absmax.size() == n && quant_map.size() == n && nested_map.size() == n &&
                  offset.size() == n && N.size() == n,
              "gemm_many: every list must hold one entry per weight");
  const at::Tensor xf = float_rows(x, K);
  std::vector<at::Tensor> ys;
  std::vector<WeightView> views;
  for (size_t i = 0; i < n; ++i) {
    ys.push_back(at::empty({xf.size(0), N[i]}, xf.options()));
    views.push_back(view_of(packed[i], absmax[i], nested_absmax.get(i), quant_map[i], nested_map.get(i), offset[i],
                            nested_blocksize, N[i], K, ys.back().data_ptr<float>()));
  }
  gemm_views(xf, K, blocksize, views, grain_weights);
  return ys;
}

// Rows [row0, row0 + rows) of the weight, dequantized to fp32, written into out[rows, K].
void dequantize_rows(const uint8_t* packed, const float* qmap, const BlockScales& scales, int bshift, int64_t K,
                     int64_t row0, int64_t r0, int64_t r1, float* out) {
#ifdef QK_AVX2
  const CodePlanes cp(qmap);
  const __m256i natural = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // decode32 order -> w0..w7
#endif
  const int64_t n_end = (row0 + r1) * K;
  float* dst = out + r0 * K;
  for (int64_t i = (row0 + r0) * K; i < n_end;) {
    const int64_t b = i >> bshift;
    const int64_t end = std::min(n_end, (b + 1) << bshift);
    const float s = scales(b);
#ifdef QK_AVX2
    for (; i < end && i % 32; ++i) *dst++ = code_of(packed, i, qmap) * s;  // to a 16-byte boundary
    const __m256 vs = _mm256_set1_ps(s);
    for (; i + 32 <= end; i += 32, dst += 32) {
      __m256 f[4];
      decode32(packed + i / 2, cp, f);
      for (int q = 0; q < 4; ++q)
        _mm256_storeu_ps(dst + 8 * q, _mm256_permutevar8x32_ps(_mm256_mul_ps(f[q], vs), natural));
    }
#endif
    for (; i < end; ++i) *dst++ = code_of(packed, i, qmap) * s;
  }
}

void dequantize(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                const at::Tensor& quant_map, const std::optional<at::Tensor>& nested_map, double offset,
                int64_t blocksize, int64_t nested_blocksize, int64_t K, int64_t row0, int64_t rows, at::Tensor out,
                int64_t grain_weights) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() >= rows * K,
              "out must be a contiguous float32 buffer of at least rows * K elements");
  const BlockScales scales = make_scales(absmax, nested_absmax, nested_map, offset, nested_blocksize);
  const int bshift = log2_exact(blocksize, "blocksize");
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* qmap = quant_map.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, grain_weights / std::max<int64_t>(K, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    dequantize_rows(p, qmap, scales, bshift, K, row0, r0, r1, op);
  });
}

}  // namespace

TORCH_LIBRARY(qkernels_cpu, m) {
  m.def(
      "gemm(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor quant_map, Tensor? nested_map, "
      "float offset, int blocksize, int nested_blocksize, int N, int K, int grain_weights) -> Tensor");
  m.def(
      "gemm_many(Tensor x, Tensor[] packed, Tensor[] absmax, Tensor?[] nested_absmax, Tensor[] quant_map, "
      "Tensor?[] nested_map, float[] offset, int blocksize, int nested_blocksize, int[] N, int K, "
      "int grain_weights) -> Tensor[]");
  m.def(
      "dequantize(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor quant_map, Tensor? nested_map, "
      "float offset, int blocksize, int nested_blocksize, int K, int row0, int rows, Tensor(a!) out, "
      "int grain_weights) -> ()");
}

TORCH_LIBRARY_IMPL(qkernels_cpu, CPU, m) {
  m.impl("gemm", &gemm);
  m.impl("gemm_many", &gemm_many);
  m.impl("dequantize", &dequantize);
}
