// y = x @ W.T for fp32 x [M, K] and a 16-bit (fp16 or bf16) weight W [N, K], fp32 products and
// sums, y in fp32: the output layer of a decode step, whose weight (SmolLM2's tied 49152 x 576
// embedding) is read once per token and held in the 16 bits it was stored in, half of fp32's bytes.
//
// Registered as torch.ops.qkernels_cpu.linear16(x, w, grain_weights). Each weight is widened to
// fp32 exactly (F16C for fp16, a 16-bit shift for bf16), so the only difference from
// `x @ W.float().T` is the order of the fp32 sums.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QK16_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define QK16_AVX512 1
#endif

namespace {

inline float widen(uint16_t bits, bool bf16) {
  return bf16 ? static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()))
              : static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

#ifdef QK16_AVX2
template <bool BF16>
inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// MB rows of x against NB rows of W at a time (MB * NB accumulators in registers): each widened
// weight vector serves MB rows of x, each x vector NB rows of W. Columns past K - K % 8 in scalar.
template <bool BF16, int MB, int NB>
void rows_tile(const float* x, int64_t K, const uint16_t* w, int64_t n, int64_t N, float* y) {
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  const int64_t K8 = K - K % 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load8<BF16>(w + (n + j) * K + k);
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_fmadd_ps(wv[j], xv, acc[m][j]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) {
      float s = hsum(acc[m][j]);
      for (int64_t k = K8; k < K; ++k) s += widen(w[(n + j) * K + k], BF16) * x[m * K + k];
      y[m * N + n + j] = s;
    }
}

template <bool BF16, int MB>
void rows_avx2(const float* x, int64_t K, const uint16_t* w, int64_t n0, int64_t n1, int64_t N, float* y) {
  constexpr int NB = MB <= 2 ? 4 : 2;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) rows_tile<BF16, MB, NB>(x, K, w, n, N, y);
  for (; n < n1; ++n) rows_tile<BF16, MB, 1>(x, K, w, n, N, y);
}

template <bool BF16>
void rows_any_m(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t n0, int64_t n1, int64_t N,
                float* y) {
  // Rows of W in slices that stay in L2 while every group of x rows passes over them.
  constexpr int64_t kSliceRows = 64;
  for (int64_t s0 = n0; s0 < n1; s0 += kSliceRows) {
    const int64_t s1 = std::min(n1, s0 + kSliceRows);
    for (int64_t m = 0; m < M;) {
      const int64_t left = M - m;
      const float* xm = x + m * K;
      float* ym = y + m * N;
      if (left >= 4) {
        rows_avx2<BF16, 4>(xm, K, w, s0, s1, N, ym);
        m += 4;
      } else if (left >= 2) {
        rows_avx2<BF16, 2>(xm, K, w, s0, s1, N, ym);
        m += 2;
      } else {
        rows_avx2<BF16, 1>(xm, K, w, s0, s1, N, ym);
        m += 1;
      }
    }
  }
}
#endif

#ifdef QK16_AVX512
// The AVX-512 form: 16 weights widened per instruction (vcvtph2ps, or a zero-extend and shift for
// bf16). One core cannot keep enough cache-line reads in flight to reach DRAM's bandwidth from the
// hardware prefetcher alone, so each tile also prefetches the weights kPrefetchBytes ahead.
constexpr int64_t kPrefetchBytes = 8192;

template <bool BF16>
inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if (BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// MB rows of x against NB rows of W (rows n..n+NB): MB * NB accumulators, two per pair for MB <= 2
// (few pairs), so the FMA chains overlap. Columns past K - K % 16 in scalar.
template <bool BF16, int MB, int NB>
void tile512(const float* x, int64_t K, const uint16_t* w, int64_t n, int64_t N, float* y, const char* prefetch_end) {
  constexpr int kAcc = MB <= 2 ? 2 : 1;  // by MB alone: the sums do not depend on how rows are split
  const char* tile = reinterpret_cast<const char*>(w + n * K);
  for (const char* p = tile + kPrefetchBytes; p < tile + kPrefetchBytes + NB * K * 2 && p < prefetch_end; p += 64)
    _mm_prefetch(p, _MM_HINT_T0);
  __m512 acc[MB][NB][kAcc];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j)
      for (int a = 0; a < kAcc; ++a) acc[m][j][a] = _mm512_setzero_ps();
  const int64_t K16 = K - K % 16;
  int64_t k = 0;
  for (; k + 32 <= K16; k += 32)
    for (int a = 0; a < 2; ++a) {
      __m512 wv[NB];
      for (int j = 0; j < NB; ++j) wv[j] = load16<BF16>(w + (n + j) * K + k + 16 * a);
      for (int m = 0; m < MB; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * K + k + 16 * a);
        for (int j = 0; j < NB; ++j) acc[m][j][a % kAcc] = _mm512_fmadd_ps(wv[j], xv, acc[m][j][a % kAcc]);
      }
    }
  for (; k < K16; k += 16)
    for (int j = 0; j < NB; ++j) {
      const __m512 wv = load16<BF16>(w + (n + j) * K + k);
      for (int m = 0; m < MB; ++m) acc[m][j][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m][j][0]);
    }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) {
      __m512 sum = acc[m][j][0];
      for (int a = 1; a < kAcc; ++a) sum = _mm512_add_ps(sum, acc[m][j][a]);
      float s = _mm512_reduce_add_ps(sum);
      for (int64_t c = K16; c < K; ++c) s += widen(w[(n + j) * K + c], BF16) * x[m * K + c];
      y[m * N + n + j] = s;
    }
}

template <bool BF16, int MB>
void rows512(const float* x, int64_t K, const uint16_t* w, int64_t n0, int64_t n1, int64_t N, float* y,
             const char* prefetch_end) {
  constexpr int NB = MB <= 2 ? 4 : 2;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) tile512<BF16, MB, NB>(x, K, w, n, N, y, prefetch_end);
  for (; n < n1; ++n) tile512<BF16, MB, 1>(x, K, w, n, N, y, prefetch_end);
}

template <bool BF16>
void rows_any_m512(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t n0, int64_t n1, int64_t N,
                   float* y) {
  // Rows of W in slices that stay in L2 while every group of (up to 8) x rows passes over them; only
  // the first pass over a slice reads DRAM, so only it prefetches.
  constexpr int64_t kSliceRows = 64;
  const char* end = reinterpret_cast<const char*>(w + n1 * K);
  for (int64_t s0 = n0; s0 < n1; s0 += kSliceRows) {
    const int64_t s1 = std::min(n1, s0 + kSliceRows);
    for (int64_t m = 0; m < M;) {
      const int64_t left = M - m;
      const int mb = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
      const char* pf = m == 0 ? end : nullptr;
      const float* xm = x + m * K;
      float* ym = y + m * N;
      if (mb == 8) rows512<BF16, 8>(xm, K, w, s0, s1, N, ym, pf);
      else if (mb == 4) rows512<BF16, 4>(xm, K, w, s0, s1, N, ym, pf);
      else if (mb == 2) rows512<BF16, 2>(xm, K, w, s0, s1, N, ym, pf);
      else rows512<BF16, 1>(xm, K, w, s0, s1, N, ym, pf);
      m += mb;
    }
  }
}
#endif

[[maybe_unused]] void rows_generic(const float* x, int64_t M, int64_t K, const uint16_t* w, bool bf16, int64_t n0, int64_t n1,
                  int64_t N, float* y) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += widen(w[n * K + k], bf16) * x[m * K + k];
      y[m * N + n] = acc;
    }
}

at::Tensor linear16(const at::Tensor& x, const at::Tensor& w, int64_t grain_weights) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w must be a contiguous [N, K] matrix");
  TORCH_CHECK(w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16, "w must be float16 or bfloat16");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1) && x.scalar_type() == at::kFloat,
              "x must be float32 [M, ", w.size(1), "]");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  const int64_t grain = std::max<int64_t>(1, grain_weights / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
#if defined(QK16_AVX512)
    if (bf16) rows_any_m512<true>(xp, M, K, wp, n0, n1, N, yp);
    else rows_any_m512<false>(xp, M, K, wp, n0, n1, N, yp);
#elif defined(QK16_AVX2)
    if (bf16) rows_any_m<true>(xp, M, K, wp, n0, n1, N, yp);
    else rows_any_m<false>(xp, M, K, wp, n0, n1, N, yp);
#else
    rows_generic(xp, M, K, wp, bf16, n0, n1, N, yp);
#endif
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qkernels_cpu, m) {
  m.def("linear16(Tensor x, Tensor w, int grain_weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(qkernels_cpu, CPU, m) {
  m.impl("linear16", &linear16);
}
