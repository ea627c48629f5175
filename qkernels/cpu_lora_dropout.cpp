// LoRA dropout from a seed: the keep/drop decision of element i is a hash of (seed, i), so a mask
// is never stored: the forward applies it to x, and the backward recomputes it where it needs it
// (the masked x for dA, the masked dx). One pass each, vectorized by the compiler (AVX2: 8 lanes).
// qkernels/lora_dropout.py has the same hash in torch, bit for bit, for machines without the
// extension.
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

inline uint32_t lowbias32(uint32_t x) {  // Chris Wellons' 32-bit integer hash (a bijection)
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// keep element i when its hash is >= threshold = round(p * 2^32); s1, s2 come from the seed
inline bool keep(uint32_t i, uint32_t s1, uint32_t s2, uint32_t threshold) {
  return lowbias32(lowbias32(i + s1) ^ s2) >= threshold;
}

// the two per-call keys: every bit of the 64-bit seed reaches both
inline void keys(int64_t seed, uint32_t& s1, uint32_t& s2) {
  s1 = lowbias32(static_cast<uint32_t>(seed) ^ 0x9e3779b9U);
  s2 = lowbias32(static_cast<uint32_t>(uint64_t(seed) >> 32) + s1);
}

template <typename T>
void apply_range(const T* x, T* out, int64_t begin, int64_t end, uint32_t lo, uint32_t hi, uint32_t thr) {
  for (int64_t i = begin; i < end; ++i) out[i] = keep(static_cast<uint32_t>(i), lo, hi, thr) ? x[i] : T(0);
}

template <typename T>
void add_range(T* y, const T* t, int64_t begin, int64_t end, uint32_t lo, uint32_t hi, uint32_t thr) {
  for (int64_t i = begin; i < end; ++i)  // branchless (a blend), so it vectorizes; adds 0 where dropped
    y[i] += keep(static_cast<uint32_t>(i), lo, hi, thr) ? t[i] : T(0);
}

void check(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
  TORCH_CHECK(t.numel() < (int64_t(1) << 32), what, " has more than 2^32 elements");
}

constexpr int64_t kGrain = 1 << 16;

at::Tensor dropout_apply(const at::Tensor& x, int64_t seed, int64_t threshold) {
  check(x, "x");
  at::Tensor out = at::empty_like(x);
  uint32_t lo, hi;
  keys(seed, lo, hi);
  const uint32_t thr = static_cast<uint32_t>(threshold);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_apply", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) { apply_range(xp, op, b, e, lo, hi, thr); });
  });
  return out;
}

void dropout_add_(at::Tensor& y, const at::Tensor& t, int64_t seed, int64_t threshold) {
  check(y, "y");
  check(t, "t");
  TORCH_CHECK(y.sizes() == t.sizes() && y.scalar_type() == t.scalar_type(), "y and t must match in shape and dtype");
  uint32_t lo, hi;
  keys(seed, lo, hi);
  const uint32_t thr = static_cast<uint32_t>(threshold);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "dropout_add_", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    at::parallel_for(0, y.numel(), kGrain, [&](int64_t b, int64_t e) { add_range(yp, tp, b, e, lo, hi, thr); });
  });
}


#ifdef __AVX2__
// ---- fused LoRA products with the dropout inside (AVX2 + FMA) ----------------------------------
// The skinny LoRA matmuls ([tokens, in] x [in, r] with r = 8..64) are memory-bound in MKL, and with
// dropout each of them also read a masked copy of x written just before. Here the mask is computed
// in registers (8 lanes at a time, the same hash) and applied where x is read:
//   lora_down      v  = factor * (x . keep) @ A^T          [M, r]   forward (and its recompute)
//   lora_grad_a    gA = factor * gu^T @ (x . keep)         [r, K]   backward, A's gradient
//   lora_up_add_   y += keep . (gu @ A)                    [M, K]   backward, into the base's dx
// r must be a multiple of 8, at most 64 (the Python side falls back to the unfused ops otherwise).
// threshold 0 (p = 0) is no dropout: lora_down and lora_grad_a then skip the hash (lora_down beats
// MKL's skinny GEMM without it too; MKL's addmm_ beats lora_up_add_, which Python then uses).

inline __m256i lowbias32_v(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bU)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

struct Keys {
  uint32_t s1, s2, thr;
};

// all-ones lanes where elements i0 .. i0+7 are kept
inline __m256 keep_v(uint32_t i0, const Keys& k) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i i = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(i0 + k.s1)), lane);
  __m256i h = lowbias32_v(_mm256_xor_si256(lowbias32_v(i), _mm256_set1_epi32(static_cast<int>(k.s2))));
  __m256i ge = _mm256_cmpeq_epi32(_mm256_max_epu32(h, _mm256_set1_epi32(static_cast<int>(k.thr))), h);
  return _mm256_castsi256_ps(ge);
}

// x[0..n) masked into out; element j has flat index i0 + j. threshold 0 (p = 0) keeps everything.
inline void mask_into(const float* x, float* out, int64_t n, uint32_t i0, const Keys& k) {
  if (k.thr == 0) {
    std::memcpy(out, x, n * sizeof(float));
    return;
  }
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(out + j, _mm256_and_ps(_mm256_loadu_ps(x + j), keep_v(i0 + static_cast<uint32_t>(j), k)));
  for (; j < n; ++j) out[j] = keep(i0 + static_cast<uint32_t>(j), k.s1, k.s2, k.thr) ? x[j] : 0.0f;
}

// R rows of v from R masked rows (xb, stride K) and A^T (at, [K, 8*NV])
template <int NV, int R>
void down_block(const float* xb, int64_t K, const float* at, float* v, float factor) {
  __m256 acc[R * NV];  // in registers: the unroll pragmas keep GCC from storing them every iteration
  #pragma GCC unroll 16
  for (int i = 0; i < R * NV; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 a[NV];
    #pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) a[j] = _mm256_loadu_ps(at + k * 8 * NV + 8 * j);
    #pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      __m256 b = _mm256_broadcast_ss(xb + i * K + k);
      #pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) acc[i * NV + j] = _mm256_fmadd_ps(b, a[j], acc[i * NV + j]);
    }
  }
  const __m256 f = _mm256_set1_ps(factor);
  #pragma GCC unroll 16
  for (int i = 0; i < R * NV; ++i) _mm256_storeu_ps(v + 8 * i, _mm256_mul_ps(acc[i], f));
}

template <int NV>
void down_rows(const float* x, const float* at, float* v, int64_t m0, int64_t m1, int64_t K, const Keys& k,
               float factor) {
  constexpr int R = NV == 1 ? 8 : NV == 2 ? 4 : NV <= 4 ? 2 : 1;  // accumulators fit the 16 registers
  std::vector<float> buf(R * K);
  int64_t m = m0;
  for (; m + R <= m1; m += R) {
    #pragma GCC unroll 16
    for (int i = 0; i < R; ++i) mask_into(x + (m + i) * K, buf.data() + i * K, K, static_cast<uint32_t>((m + i) * K), k);
    down_block<NV, R>(buf.data(), K, at, v + m * 8 * NV, factor);
  }
  for (; m < m1; ++m) {
    mask_into(x + m * K, buf.data(), K, static_cast<uint32_t>(m * K), k);
    down_block<NV, 1>(buf.data(), K, at, v + m * 8 * NV, factor);
  }
}

template <int NV>
void down_dispatch(const float* x, const float* at, float* v, int64_t M, int64_t K, const Keys& k, float factor) {
  at::parallel_for(0, M, std::max<int64_t>(8, kGrain / K), [&](int64_t b, int64_t e) { down_rows<NV>(x, at, v, b, e, K, k, factor); });
}

// gA chunk: columns [c0, c0 + w) of factor * gu^T @ (x . keep), w <= kChunk, into ga ([r, K])
constexpr int64_t kChunk = 64, kRowBlock = 64;
constexpr int NJ = 8;  // rows of gA per pass (r is a multiple of 8): 8 accumulators

void grad_a_cols(const float* gu, const float* x, float* ga, int64_t M, int64_t K, int64_t r, int64_t c0, int64_t w,
                 const Keys& k, float factor) {
  float buf[kRowBlock * kChunk];
  std::vector<float> part(r * kChunk, 0.0f);  // [r, kChunk] partial sums over row blocks
  const int64_t wv = w / 8 * 8;
  for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, M - m0);
    for (int64_t i = 0; i < rows; ++i) mask_into(x + (m0 + i) * K + c0, buf + i * kChunk, w, static_cast<uint32_t>((m0 + i) * K + c0), k);
    for (int64_t c = 0; c < wv; c += 8)
      for (int64_t j0 = 0; j0 < r; j0 += NJ) {
        __m256 acc[NJ];
        #pragma GCC unroll 16
        for (int j = 0; j < NJ; ++j) acc[j] = _mm256_loadu_ps(part.data() + (j0 + j) * kChunk + c);
        for (int64_t i = 0; i < rows; ++i) {
          __m256 xv = _mm256_loadu_ps(buf + i * kChunk + c);
          const float* g = gu + (m0 + i) * r + j0;
          #pragma GCC unroll 16
          for (int j = 0; j < NJ; ++j) acc[j] = _mm256_fmadd_ps(_mm256_broadcast_ss(g + j), xv, acc[j]);
        }
        #pragma GCC unroll 16
        for (int j = 0; j < NJ; ++j) _mm256_storeu_ps(part.data() + (j0 + j) * kChunk + c, acc[j]);
      }
    for (int64_t c = wv; c < w; ++c)  // the last few columns of an in_features not a multiple of 8
      for (int64_t j = 0; j < r; ++j) {
        float s = part[j * kChunk + c];
        for (int64_t i = 0; i < rows; ++i) s = std::fma(gu[(m0 + i) * r + j], buf[i * kChunk + c], s);
        part[j * kChunk + c] = s;
      }
  }
  for (int64_t j = 0; j < r; ++j)
    for (int64_t c = 0; c < w; ++c) ga[j * K + c0 + c] = part[j * kChunk + c] * factor;
}

// y[m, k] += keep * sum_j gu[m, j] a[j, k] for R rows starting at m
template <int R>
void up_add_block(float* y, const float* gu, const float* a, int64_t m, int64_t K, int64_t r, const Keys& k) {
  int64_t c = 0;
  for (; c + 8 <= K; c += 8) {
    __m256 acc[R];
    #pragma GCC unroll 16
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < r; ++j) {
      __m256 av = _mm256_loadu_ps(a + j * K + c);
      #pragma GCC unroll 16
      for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(gu + (m + i) * r + j), av, acc[i]);
    }
    #pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      float* yp = y + (m + i) * K + c;
      __m256 t = _mm256_and_ps(acc[i], keep_v(static_cast<uint32_t>((m + i) * K + c), k));
      _mm256_storeu_ps(yp, _mm256_add_ps(_mm256_loadu_ps(yp), t));
    }
  }
  for (; c < K; ++c)
    #pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      float s = 0.0f;
      for (int64_t j = 0; j < r; ++j) s = std::fma(gu[(m + i) * r + j], a[j * K + c], s);
      y[(m + i) * K + c] += keep(static_cast<uint32_t>((m + i) * K + c), k.s1, k.s2, k.thr) ? s : 0.0f;
    }
}

Keys make_keys(int64_t seed, int64_t threshold) {
  Keys k;
  keys(seed, k.s1, k.s2);
  k.thr = static_cast<uint32_t>(threshold);
  return k;
}

void check_lora(const at::Tensor& t, const char* what) {
  check(t, what);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2, what, " must be a 2-D float32 tensor");
}

at::Tensor lora_down(const at::Tensor& x, const at::Tensor& a, int64_t seed, int64_t threshold, double factor) {
  check_lora(x, "x");
  check_lora(a, "A");
  const int64_t M = x.size(0), K = x.size(1), r = a.size(0);
  TORCH_CHECK(a.size(1) == K && r % 8 == 0 && r <= 64, "lora_down: A must be [r, in] with r in 8, 16, .., 64");
  at::Tensor at_ = a.t().contiguous();  // [K, r]
  at::Tensor v = at::empty({M, r}, x.options());
  const Keys k = make_keys(seed, threshold);
  const float* xp = x.data_ptr<float>();
  const float* ap = at_.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  const float f = static_cast<float>(factor);
  switch (r / 8) {
    case 1: down_dispatch<1>(xp, ap, vp, M, K, k, f); break;
    case 2: down_dispatch<2>(xp, ap, vp, M, K, k, f); break;
    case 3: down_dispatch<3>(xp, ap, vp, M, K, k, f); break;
    case 4: down_dispatch<4>(xp, ap, vp, M, K, k, f); break;
    case 5: down_dispatch<5>(xp, ap, vp, M, K, k, f); break;
    case 6: down_dispatch<6>(xp, ap, vp, M, K, k, f); break;
    case 7: down_dispatch<7>(xp, ap, vp, M, K, k, f); break;
    default: down_dispatch<8>(xp, ap, vp, M, K, k, f); break;
  }
  return v;
}

at::Tensor lora_grad_a(const at::Tensor& gu, const at::Tensor& x, int64_t seed, int64_t threshold, double factor) {
  check_lora(gu, "gu");
  check_lora(x, "x");
  const int64_t M = x.size(0), K = x.size(1), r = gu.size(1);
  TORCH_CHECK(gu.size(0) == M && r % 8 == 0 && r <= 64, "lora_grad_a: gu must be [tokens, r] with r in 8, 16, .., 64");
  at::Tensor ga = at::empty({r, K}, x.options());
  const Keys k = make_keys(seed, threshold);
  const float* gp = gu.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* out = ga.data_ptr<float>();
  const float f = static_cast<float>(factor);
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c)
      grad_a_cols(gp, xp, out, M, K, r, c * kChunk, std::min(kChunk, K - c * kChunk), k, f);
  });
  return ga;
}

void lora_up_add_(at::Tensor& y, const at::Tensor& gu, const at::Tensor& a, int64_t seed, int64_t threshold) {
  check_lora(y, "y");
  check_lora(gu, "gu");
  check_lora(a, "A");
  const int64_t M = y.size(0), K = y.size(1), r = a.size(0);
  TORCH_CHECK(a.size(1) == K && gu.size(0) == M && gu.size(1) == r, "lora_up_add_: y [M, K], gu [M, r], A [r, K]");
  const Keys k = make_keys(seed, threshold);
  float* yp = y.data_ptr<float>();
  const float* gp = gu.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(8, kGrain / K), [&](int64_t b, int64_t e) {
    int64_t m = b;
    for (; m + 8 <= e; m += 8) up_add_block<8>(yp, gp, ap, m, K, r, k);
    for (; m < e; ++m) up_add_block<1>(yp, gp, ap, m, K, r, k);
  });
}
#endif  // __AVX2__

}  // namespace

TORCH_LIBRARY_FRAGMENT(qkernels_cpu, m) {
  m.def("dropout_apply(Tensor x, int seed, int threshold) -> Tensor");
  m.def("dropout_add_(Tensor(a!) y, Tensor t, int seed, int threshold) -> ()");
#ifdef __AVX2__
  m.def("lora_down(Tensor x, Tensor a, int seed, int threshold, float factor) -> Tensor");
  m.def("lora_grad_a(Tensor gu, Tensor x, int seed, int threshold, float factor) -> Tensor");
  m.def("lora_up_add_(Tensor(a!) y, Tensor gu, Tensor a, int seed, int threshold) -> ()");
#endif
}

TORCH_LIBRARY_IMPL(qkernels_cpu, CPU, m) {
  m.impl("dropout_apply", &dropout_apply);
  m.impl("dropout_add_", &dropout_add_);
#ifdef __AVX2__
  m.impl("lora_down", &lora_down);
  m.impl("lora_grad_a", &lora_grad_a);
  m.impl("lora_up_add_", &lora_up_add_);
#endif
}
