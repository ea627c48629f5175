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
// The dequantized value of every weight is the reference's bit for bit:
// fp32(quant_map[code] * absmax[block]) with absmax = fp32(fp32(map[q] * nested) + offset);
// the file is compiled with -ffp-contract=off so no FMA changes that rounding.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QK_AVX2 1
#endif

namespace {

// The fp32 scale of block b, undoing double quantization when it is present.
struct BlockScales {
  const float* absmax = nullptr;  // fp32 per block (no double quant)
  const uint8_t* codes = nullptr;  // uint8 per block (double quant)
  const float* nested_absmax = nullptr;
  const float* nested_map = nullptr;
  float offset = 0.f;
  int nested_shift = 8;  // log2(nested_blocksize): shifts, because a 64-bit divide costs ~40 cycles

  inline float operator()(int64_t b) const {
    if (absmax) return absmax[b];
    float scaled = nested_map[codes[b]] * nested_absmax[b >> nested_shift];
    return scaled + offset;
  }
};

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

inline float code_of(const uint8_t* packed, int64_t i, const float* qmap) {
  uint8_t byte = packed[i >> 1];
  return qmap[(i & 1) ? (byte & 15) : (byte >> 4)];
}

#ifdef QK_AVX2
// 16-entry fp32 table lookup for 8 int32 indices: two in-register permutes and a blend on bit 3.
inline __m256 lut16(__m256 lo8, __m256 hi8, __m256i idx) {
  __m256 a = _mm256_permutevar8x32_ps(lo8, idx);
  __m256 b = _mm256_permutevar8x32_ps(hi8, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// Decode 8 packed bytes (16 weights) into the 8 even-position and 8 odd-position values.
inline void decode16(const uint8_t* p, __m256 lo8, __m256 hi8, __m256 scale, __m256& even, __m256& odd) {
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  even = _mm256_mul_ps(lut16(lo8, hi8, _mm256_srli_epi32(b, 4)), scale);
  odd = _mm256_mul_ps(lut16(lo8, hi8, _mm256_and_si256(b, _mm256_set1_epi32(15))), scale);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// y[m, n] for MB rows of x at once, weight rows [n0, n1). K is even, so every row starts on a
// byte; xe/xo hold x's even and odd columns ([M, K/2] each) so decoded values need no shuffle.
template <int MB>
void gemm_rows(const float* xe, const float* xo, int64_t K, const uint8_t* packed, const float* qmap,
               const BlockScales& scales, int bshift, int64_t n0, int64_t n1, int64_t N, float* y) {
  const int64_t K2 = K / 2;
#ifdef QK_AVX2
  const __m256 lo8 = _mm256_loadu_ps(qmap), hi8 = _mm256_loadu_ps(qmap + 8);
#endif
  for (int64_t n = n0; n < n1; ++n) {
    float tail[MB] = {};
#ifdef QK_AVX2
    // Separate even/odd accumulators (and two chunks in flight for one row of x) keep the FMA
    // dependency chains short enough that the decode, not FMA latency, sets the pace.
    __m256 acc_e[MB], acc_o[MB], acc_e2 = _mm256_setzero_ps(), acc_o2 = _mm256_setzero_ps();
    for (int m = 0; m < MB; ++m) acc_e[m] = acc_o[m] = _mm256_setzero_ps();
#endif
    const int64_t base = n * K;
    int64_t k = 0;
    while (k < K) {  // one segment per block touched by this row
      const int64_t b = (base + k) >> bshift;
      const int64_t end = std::min(K, ((b + 1) << bshift) - base);
      const float s = scales(b);
      int64_t j = k / 2;
      const int64_t jend = end / 2;
      const uint8_t* row = packed + base / 2;
#ifdef QK_AVX2
      const __m256 vs = _mm256_set1_ps(s);
      if (MB == 1) {
        for (; j + 16 <= jend; j += 16) {
          __m256 we, wo, we2, wo2;
          decode16(row + j, lo8, hi8, vs, we, wo);
          decode16(row + j + 8, lo8, hi8, vs, we2, wo2);
          acc_e[0] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xe + j), acc_e[0]);
          acc_o[0] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xo + j), acc_o[0]);
          acc_e2 = _mm256_fmadd_ps(we2, _mm256_loadu_ps(xe + j + 8), acc_e2);
          acc_o2 = _mm256_fmadd_ps(wo2, _mm256_loadu_ps(xo + j + 8), acc_o2);
        }
      }
      for (; j + 8 <= jend; j += 8) {
        __m256 we, wo;
        decode16(row + j, lo8, hi8, vs, we, wo);
        for (int m = 0; m < MB; ++m) {
          acc_e[m] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xe + m * K2 + j), acc_e[m]);
          acc_o[m] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xo + m * K2 + j), acc_o[m]);
        }
      }
#endif
      for (; j < jend; ++j) {
        const uint8_t byte = row[j];
        const float we = qmap[byte >> 4] * s, wo = qmap[byte & 15] * s;
        for (int m = 0; m < MB; ++m) tail[m] += we * xe[m * K2 + j] + wo * xo[m * K2 + j];
      }
      k = end;
    }
#ifdef QK_AVX2
    acc_e[0] = _mm256_add_ps(acc_e[0], _mm256_add_ps(acc_e2, acc_o2));
#endif
    for (int m = 0; m < MB; ++m) {
#ifdef QK_AVX2
      tail[m] += hsum(_mm256_add_ps(acc_e[m], acc_o[m]));
#endif
      y[m * N + n] = tail[m];
    }
  }
}

// Any K (odd included): element by element. Odd in_features do not occur in real models.
void gemm_rows_generic(const float* x, int64_t M, int64_t K, const uint8_t* packed, const float* qmap,
                       const BlockScales& scales, int bshift, int64_t n0, int64_t n1, int64_t N, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = n * K + k;
        acc += code_of(packed, i, qmap) * scales(i >> bshift) * x[m * K + k];
      }
      y[m * N + n] = acc;
    }
  }
}

template <int MB>
void gemm_group(const float* xe, const float* xo, int64_t K, const uint8_t* packed, const float* qmap,
                const BlockScales& scales, int bshift, int64_t N, float* y) {
  // ~64 KiB of packed weight per task: enough work to amortise the fork, small enough to balance.
  const int64_t grain = std::max<int64_t>(1, 131072 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    gemm_rows<MB>(xe, xo, K, packed, qmap, scales, bshift, n0, n1, N, y);
  });
}

at::Tensor gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_map,
                const at::Tensor& quant_map, double offset, int64_t blocksize, int64_t nested_blocksize,
                int64_t N, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, ", K, "]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  const int64_t M = x.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const BlockScales scales = make_scales(absmax, nested_absmax, nested_map, offset, nested_blocksize);
  const int bshift = log2_exact(blocksize, "blocksize");
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* qmap = quant_map.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (K % 2) {
    const float* xp = xf.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      gemm_rows_generic(xp, M, K, p, qmap, scales, bshift, n0, n1, N, yp);
    });
    return y;
  }
  // De-interleave x into even and odd columns: [M, K/2] each.
  const int64_t K2 = K / 2;
  std::vector<float> xeo(2 * M * K2);
  const float* xp = xf.data_ptr<float>();
  float* xe = xeo.data();
  float* xo = xeo.data() + M * K2;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K2; ++j) {
      xe[m * K2 + j] = xp[m * K + 2 * j];
      xo[m * K2 + j] = xp[m * K + 2 * j + 1];
    }
  // Groups of up to 4 rows of x share each decoded weight (4 x 2 accumulators stay in registers).
  for (int64_t m = 0; m < M;) {
    const int64_t left = M - m;
    const float *e = xe + m * K2, *o = xo + m * K2;
    float* ym = yp + m * N;
    if (left >= 4) {
      gemm_group<4>(e, o, K, p, qmap, scales, bshift, N, ym);
      m += 4;
    } else if (left >= 2) {
      gemm_group<2>(e, o, K, p, qmap, scales, bshift, N, ym);
      m += 2;
    } else {
      gemm_group<1>(e, o, K, p, qmap, scales, bshift, N, ym);
      m += 1;
    }
  }
  return y;
}

// Rows [row0, row0 + rows) of the weight, dequantized to fp32, written into out[rows, K].
void dequantize_rows(const uint8_t* packed, const float* qmap, const BlockScales& scales, int bshift, int64_t K,
                     int64_t row0, int64_t r0, int64_t r1, float* out) {
#ifdef QK_AVX2
  const __m256 lo8 = _mm256_loadu_ps(qmap), hi8 = _mm256_loadu_ps(qmap + 8);
#endif
  const int64_t n_begin = (row0 + r0) * K, n_end = (row0 + r1) * K;
  int64_t i = n_begin;
  while (i < n_end) {
    const int64_t b = i >> bshift;
    const int64_t end = std::min(n_end, (b + 1) << bshift);
    const float s = scales(b);
    float* dst = out + (i - row0 * K);
    if (i & 1) {  // a segment starting on a low nibble (odd K only)
      *dst++ = code_of(packed, i, qmap) * s;
      ++i;
    }
#ifdef QK_AVX2
    const __m256 vs = _mm256_set1_ps(s);
    for (; i + 16 <= end; i += 16, dst += 16) {
      __m256 we, wo;
      decode16(packed + i / 2, lo8, hi8, vs, we, wo);
      const __m256 a = _mm256_unpacklo_ps(we, wo), c = _mm256_unpackhi_ps(we, wo);
      _mm256_storeu_ps(dst, _mm256_permute2f128_ps(a, c, 0x20));
      _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(a, c, 0x31));
    }
#endif
    for (; i < end; ++i) *dst++ = code_of(packed, i, qmap) * s;
  }
}

void dequantize(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                const std::optional<at::Tensor>& nested_map, const at::Tensor& quant_map, double offset,
                int64_t blocksize, int64_t nested_blocksize, int64_t K, int64_t row0, int64_t rows, at::Tensor out) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() >= rows * K,
              "out must be a contiguous float32 buffer of at least rows * K elements");
  const BlockScales scales = make_scales(absmax, nested_absmax, nested_map, offset, nested_blocksize);
  const int bshift = log2_exact(blocksize, "blocksize");
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* qmap = quant_map.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    dequantize_rows(p, qmap, scales, bshift, K, row0, r0, r1, op);
  });
}

}  // namespace

TORCH_LIBRARY(qkernels_cpu, m) {
  m.def(
      "gemm(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_map, Tensor quant_map, "
      "float offset, int blocksize, int nested_blocksize, int N, int K) -> Tensor");
  m.def(
      "dequantize(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_map, Tensor quant_map, "
      "float offset, int blocksize, int nested_blocksize, int K, int row0, int rows, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(qkernels_cpu, CPU, m) {
  m.impl("gemm", &gemm);
  m.impl("dequantize", &dequantize);
}
