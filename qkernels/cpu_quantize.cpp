// NF4 quantization on CPU in one pass over the weight: per block of `blocksize` consecutive
// elements, the absmax, then every element's code, packed two per byte (element 2k in the high
// nibble of byte k). Registered as torch.ops.qkernels_cpu.quantize_nf4; qkernels/cpu_quantize.py
// calls it. A second op, quantize_absmax_dq, double-quantizes the absmax given its mean (which
// the caller computes with torch, because torch's sum order, and so the mean's last bit, depends
// on the thread count): on small weights the ~15 torch ops of the reference cost as much as the
// kernel itself.
//
// The output is the torch reference's (qformats/nf4.py) byte for byte, by doing the same fp32
// operations in the same order:
// - absmax = max over the block of the magnitude bits (sign cleared) compared as integers, then
//   widened to fp32 (exact for every non-NaN value; NaN payloads depend on the conversion
//   routine, so the op returns how many blocks have a NaN absmax, and the Python side sends such
//   a weight to the reference);
// - r = 1.0f / absmax (IEEE division, as torch.reciprocal); v = fp32(x) * r (no FMA: the file
//   is compiled with -ffp-contract=off, and there is nothing to fuse anyway);
// - code = number of fp32 midpoints strictly below v, NaN counted as 0 (bucketize(nan_to_num));
//   +-inf compare like +-FLT_MAX. An all-zero block has r = inf and every 0 * inf = NaN: code 7.
// - a partial last block is zero-padded: the zeros leave the absmax alone and take code 7.
// Double quantization, for finite absmax and offset (the caller sends anything else to qformats):
// c = absmax - offset; nested = max |c| per 256; code = number of the dynamic map's fp32 midpoints
// strictly below nan_to_num(c * (1.0f / nested)) (an all-equal block: 0 * inf = NaN, coded as 0).

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define QK_QUANT_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define QK_QUANT_AVX512 1  // the codes 16 lanes at a time; the same fp32 operations, so the same bytes
#endif
#endif

namespace {

constexpr int kMids = 15;    // midpoints between the 16 NF4 code values
constexpr int kMaxBlock = 4096;

// The three source types: raw bits, their magnitude mask, and the fp32 value.
struct F16 {
  using Bits = uint16_t;
  static constexpr Bits kMagnitude = 0x7FFF;
  static float to_float(Bits b) { return c10::detail::fp16_ieee_to_fp32_value(b); }
};
struct BF16 {
  using Bits = uint16_t;
  static constexpr Bits kMagnitude = 0x7FFF;
  static float to_float(Bits b) {
    const uint32_t w = uint32_t{b} << 16;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
  }
};
struct F32 {
  using Bits = uint32_t;
  static constexpr Bits kMagnitude = 0x7FFFFFFF;
  static float to_float(Bits b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  }
};

inline uint8_t code_of(float v, const float* mids) {
  if (v != v) v = 0.f;  // NaN -> 0, as nan_to_num
  uint8_t c = 0;
  for (int i = 0; i < kMids; ++i) c += v > mids[i];
  return c;
}

template <typename T>
typename T::Bits block_max_bits_scalar(const typename T::Bits* x, int64_t n) {
  typename T::Bits m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max<typename T::Bits>(m, x[i] & T::kMagnitude);
  return m;
}

template <typename T>
void codes_scalar(const typename T::Bits* x, int64_t n, float r, const float* mids, uint8_t* out) {
  for (int64_t k = 0; k < n / 2; ++k) {
    const uint8_t hi = code_of(T::to_float(x[2 * k]) * r, mids);
    const uint8_t lo = code_of(T::to_float(x[2 * k + 1]) * r, mids);
    out[k] = static_cast<uint8_t>(hi << 4 | lo);
  }
}

#ifdef QK_QUANT_AVX2
// 8 source elements as fp32.
inline __m256 load8(const uint16_t* x, F16) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
inline __m256 load8(const uint16_t* x, BF16) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m256 load8(const uint32_t* x, F32) { return _mm256_loadu_ps(reinterpret_cast<const float*>(x)); }

// Integer max of the magnitude bits over a block (a multiple of 32 elements).
inline uint16_t block_max_bits(const uint16_t* x, int64_t n, F16) {
  const __m256i mask = _mm256_set1_epi16(0x7FFF);
  __m256i m = _mm256_setzero_si256();
  for (int64_t i = 0; i < n; i += 16)
    m = _mm256_max_epi16(m, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), mask));
  __m128i h = _mm_max_epi16(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  // The masked values are non-negative int16: a signed max is the unsigned one, and
  // minpos of the complement finds it.
  h = _mm_minpos_epu16(_mm_xor_si128(h, _mm_set1_epi16(-1)));
  return static_cast<uint16_t>(~_mm_cvtsi128_si32(h));
}
inline uint16_t block_max_bits(const uint16_t* x, int64_t n, BF16) { return block_max_bits(x, n, F16{}); }
inline uint32_t block_max_bits(const uint32_t* x, int64_t n, F32) {
  const __m256i mask = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i m = _mm256_setzero_si256();
  for (int64_t i = 0; i < n; i += 8)
    m = _mm256_max_epi32(m, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), mask));
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), m);
  return *std::max_element(lanes, lanes + 8);
}

// The 15 sorted midpoints laid out for a 4-step binary search over 8 lanes: step 1 compares with
// mid[7], step 2 with mid[3] or mid[11], step 3 with mid[1|5|9|13], step 4 with an even one.
struct MidTables {
  __m256 m7, m3, m11, odd, even;
#ifdef QK_QUANT_AVX512
  __m512 all, all7;  // all 15 midpoints in one register (lane 15 unused), and mid[7] broadcast
#endif
  explicit MidTables(const float* mids)
      : m7(_mm256_set1_ps(mids[7])), m3(_mm256_set1_ps(mids[3])), m11(_mm256_set1_ps(mids[11])),
        odd(_mm256_setr_ps(mids[1], mids[5], mids[9], mids[13], 0.f, 0.f, 0.f, 0.f)),
        even(_mm256_setr_ps(mids[0], mids[2], mids[4], mids[6], mids[8], mids[10], mids[12], mids[14])) {
#ifdef QK_QUANT_AVX512
    all = _mm512_setr_ps(mids[0], mids[1], mids[2], mids[3], mids[4], mids[5], mids[6], mids[7], mids[8], mids[9],
                         mids[10], mids[11], mids[12], mids[13], mids[14], 0.f);
    all7 = _mm512_set1_ps(mids[7]);
#endif
  }
};

// Codes of 8 fp32 values as int32 lanes: the number of midpoints strictly below each, found by a
// binary search (c += step where mid[c + step - 1] < v), ~17 instructions where counting all 15
// compares takes 31.
inline __m256i codes8(__m256 v, const MidTables& t) {
  v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));  // NaN -> +0
  const __m256 g8 = _mm256_cmp_ps(v, t.m7, _CMP_GT_OQ);
  const __m256 g4 = _mm256_cmp_ps(v, _mm256_blendv_ps(t.m3, t.m11, g8), _CMP_GT_OQ);
  __m256i c = _mm256_or_si256(_mm256_and_si256(_mm256_castps_si256(g8), _mm256_set1_epi32(8)),
                              _mm256_and_si256(_mm256_castps_si256(g4), _mm256_set1_epi32(4)));
  const __m256 g2 = _mm256_cmp_ps(v, _mm256_permutevar8x32_ps(t.odd, _mm256_srli_epi32(c, 2)), _CMP_GT_OQ);
  c = _mm256_or_si256(c, _mm256_and_si256(_mm256_castps_si256(g2), _mm256_set1_epi32(2)));
  const __m256 g1 = _mm256_cmp_ps(v, _mm256_permutevar8x32_ps(t.even, _mm256_srli_epi32(c, 1)), _CMP_GT_OQ);
  return _mm256_sub_epi32(c, _mm256_castps_si256(g1));
}

// 32 elements -> 16 packed bytes.
template <typename T>
inline void codes32(const typename T::Bits* x, __m256 r, const MidTables& mids, uint8_t* out) {
  const __m256i c0 = codes8(_mm256_mul_ps(load8(x, T{}), r), mids);
  const __m256i c1 = codes8(_mm256_mul_ps(load8(x + 8, T{}), r), mids);
  const __m256i c2 = codes8(_mm256_mul_ps(load8(x + 16, T{}), r), mids);
  const __m256i c3 = codes8(_mm256_mul_ps(load8(x + 24, T{}), r), mids);
  // int32 -> bytes; the packs interleave 128-bit lanes, the permute puts elements 0..31 in order.
  const __m256i b = _mm256_permutevar8x32_epi32(
      _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3)),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  // Each 16-bit lane holds (even code, odd code) in (low, high) byte: even << 4 | odd.
  const __m256i pairs = _mm256_and_si256(_mm256_or_si256(_mm256_slli_epi16(b, 4), _mm256_srli_epi16(b, 8)),
                                         _mm256_set1_epi16(0xFF));
  const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packus_epi16(pairs, pairs), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(bytes));
}

#ifdef QK_QUANT_AVX512
inline __m512 load16(const uint16_t* x, F16) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}
inline __m512 load16(const uint16_t* x, BF16) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16(const uint32_t* x, F32) { return _mm512_loadu_ps(reinterpret_cast<const float*>(x)); }

// codes8's binary search on 16 lanes, each step's midpoint fetched by one vpermps from `all`:
// c += 8 where mid[7] < v, then += 4, 2, 1 where mid[c + 3], mid[c + 1], mid[c] < v.
inline __m512i codes16(__m512 v, const MidTables& t) {
  v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);  // NaN -> +0
  __m512i c = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(v, t.all7, _CMP_GT_OQ), _mm512_set1_epi32(8));
  __mmask16 k = _mm512_cmp_ps_mask(v, _mm512_permutexvar_ps(_mm512_add_epi32(c, _mm512_set1_epi32(3)), t.all),
                                   _CMP_GT_OQ);
  c = _mm512_mask_add_epi32(c, k, c, _mm512_set1_epi32(4));
  k = _mm512_cmp_ps_mask(v, _mm512_permutexvar_ps(_mm512_add_epi32(c, _mm512_set1_epi32(1)), t.all), _CMP_GT_OQ);
  c = _mm512_mask_add_epi32(c, k, c, _mm512_set1_epi32(2));
  k = _mm512_cmp_ps_mask(v, _mm512_permutexvar_ps(c, t.all), _CMP_GT_OQ);
  return _mm512_mask_add_epi32(c, k, c, _mm512_set1_epi32(1));
}

// 32 elements -> 16 packed bytes (element 2k in the high nibble of byte k).
template <typename T>
inline void codes32(const typename T::Bits* x, __m512 r, const MidTables& mids, uint8_t* out) {
  const __m128i b0 = _mm512_cvtepi32_epi8(codes16(_mm512_mul_ps(load16(x, T{}), r), mids));
  const __m128i b1 = _mm512_cvtepi32_epi8(codes16(_mm512_mul_ps(load16(x + 16, T{}), r), mids));
  const __m256i w = _mm256_inserti128_si256(_mm256_castsi128_si256(b0), b1, 1);
  const __m256i pairs = _mm256_and_si256(_mm256_or_si256(_mm256_slli_epi16(w, 4), _mm256_srli_epi16(w, 8)),
                                         _mm256_set1_epi16(0xFF));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtepi16_epi8(pairs));
}
#endif
#endif

#ifdef QK_QUANT_AVX2
using Mids = MidTables;
#else
using Mids = const float*;
#endif

// One whole block (blocksize elements, a multiple of 32): its absmax and blocksize/2 bytes.
template <typename T>
void quantize_block(const typename T::Bits* x, int64_t bs, const Mids& mids, float* absmax, uint8_t* out) {
#ifdef QK_QUANT_AVX2
  const float a = T::to_float(block_max_bits(x, bs, T{}));
  *absmax = a;
#ifdef QK_QUANT_AVX512
  const __m512 r = _mm512_set1_ps(1.0f / a);
#else
  const __m256 r = _mm256_set1_ps(1.0f / a);
#endif
  for (int64_t i = 0; i < bs; i += 32) codes32<T>(x + i, r, mids, out + i / 2);
#else
  const float a = T::to_float(block_max_bits_scalar<T>(x, bs));
  *absmax = a;
  codes_scalar<T>(x, bs, 1.0f / a, mids, out);
#endif
}

// Blocks [b0, b1); returns how many of them have a NaN absmax.
template <typename T>
int64_t quantize_blocks(const typename T::Bits* x, int64_t n, int64_t bs, const float* midpoints, float* absmax,
                        uint8_t* packed, int64_t b0, int64_t b1) {
  const Mids mids(midpoints);
  int64_t nan_blocks = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, len = std::min(bs, n - start);
    if (len == bs) {
      quantize_block<T>(x + start, bs, mids, absmax + b, packed + start / 2);
    } else {  // the partial last block, zero-padded; only its real bytes are written
      typename T::Bits tail[kMaxBlock] = {};
      uint8_t bytes[kMaxBlock / 2];
      std::memcpy(tail, x + start, len * sizeof(typename T::Bits));
      quantize_block<T>(tail, bs, mids, absmax + b, bytes);
      std::memcpy(packed + start / 2, bytes, (len + 1) / 2);
    }
    nan_blocks += absmax[b] != absmax[b];
  }
  return nan_blocks;
}

// fn(b0, b1) over blocks [0, n_blocks): on one thread below `grain` blocks per thread, else on up to
// torch's thread count in tasks of ~kTaskElements that threads take as they come free. Not
// at::parallel_for: it gives each thread one fixed share, so on a busy machine a thread the OS
// deschedules holds the whole op for its time slice (measured: 2 threads slower than 1).
constexpr int64_t kTaskElements = 1 << 16;

template <typename F>
void parallel_blocks(int64_t n_blocks, int64_t blocksize, int64_t grain_elements, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, grain_elements / blocksize);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n_blocks + grain - 1) / grain);
#ifdef _OPENMP
  if (threads > 1 && !at::in_parallel_region()) {
    const int64_t task = std::max<int64_t>(1, kTaskElements / blocksize);
    const int64_t n_tasks = (n_blocks + task - 1) / task;
#pragma omp parallel for schedule(dynamic, 1) num_threads(static_cast<int>(threads))
    for (int64_t t = 0; t < n_tasks; ++t) fn(t * task, std::min(n_blocks, (t + 1) * task));
    return;
  }
#endif
  fn(0, n_blocks);
}

// flat: contiguous 1-D fp16/bf16/fp32; absmax: fp32 [ceil(n/bs)]; packed: uint8 [ceil(n/2)].
// Blocks are split over torch's intra-op threads when there are `grain_elements` per thread.
// Returns the number of blocks whose absmax is NaN (a NaN in the weight).
int64_t quantize_nf4(const at::Tensor& flat, const at::Tensor& midpoints, int64_t blocksize, at::Tensor absmax,
                  at::Tensor packed, int64_t grain_elements) {
  const int64_t n = flat.numel();
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK(flat.is_contiguous() && flat.dim() == 1, "quantize_nf4: the weight must be contiguous 1-D");
  TORCH_CHECK(blocksize >= 32 && blocksize <= kMaxBlock && (blocksize & (blocksize - 1)) == 0,
              "quantize_nf4: blocksize must be a power of two from 32 to 4096, got ", blocksize);
  TORCH_CHECK(midpoints.scalar_type() == at::kFloat && midpoints.is_contiguous() && midpoints.numel() == kMids,
              "quantize_nf4: midpoints must be 15 contiguous float32");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() && absmax.numel() == n_blocks,
              "quantize_nf4: absmax must be contiguous float32 with one entry per block");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == (n + 1) / 2,
              "quantize_nf4: packed must be contiguous uint8 of ceil(numel / 2) bytes");
  const float* mids = midpoints.data_ptr<float>();
  float* am = absmax.data_ptr<float>();
  uint8_t* pk = packed.data_ptr<uint8_t>();
  const void* src = flat.data_ptr();
  const at::ScalarType st = flat.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat,
              "quantize_nf4: the weight must be float16, bfloat16 or float32, got ", st);
  std::atomic<int64_t> nan_blocks{0};
  parallel_blocks(n_blocks, blocksize, grain_elements, [&](int64_t b0, int64_t b1) {
    int64_t nans;
    if (st == at::kHalf)
      nans = quantize_blocks<F16>(static_cast<const uint16_t*>(src), n, blocksize, mids, am, pk, b0, b1);
    else if (st == at::kBFloat16)
      nans = quantize_blocks<BF16>(static_cast<const uint16_t*>(src), n, blocksize, mids, am, pk, b0, b1);
    else
      nans = quantize_blocks<F32>(static_cast<const uint32_t*>(src), n, blocksize, mids, am, pk, b0, b1);
    nan_blocks += nans;
  });
  return nan_blocks.load();
}

// flat: contiguous 1-D fp16/bf16/fp32; absmax: fp32 [ceil(n/bs)]: the block absmax alone, the same
// values quantize_nf4 computes (a partial last block zero-padded). The quantizer's pre-pass over
// the source (its double-quant offsets, non-finite weights) needs only these; skipping the codes
// makes it memory-bound. Returns the number of blocks whose absmax is not finite (a NaN or inf in
// the block).
int64_t block_absmax(const at::Tensor& flat, int64_t blocksize, at::Tensor absmax, int64_t grain_elements) {
  const int64_t n = flat.numel();
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK(flat.is_contiguous() && flat.dim() == 1, "block_absmax: the tensor must be contiguous 1-D");
  TORCH_CHECK(blocksize >= 32 && blocksize <= kMaxBlock && (blocksize & (blocksize - 1)) == 0,
              "block_absmax: blocksize must be a power of two from 32 to 4096, got ", blocksize);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() && absmax.numel() == n_blocks,
              "block_absmax: absmax must be contiguous float32 with one entry per block");
  const at::ScalarType st = flat.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat,
              "block_absmax: the tensor must be float16, bfloat16 or float32, got ", st);
  float* am = absmax.data_ptr<float>();
  const void* src = flat.data_ptr();
  std::atomic<int64_t> nonfinite_blocks{0};
  parallel_blocks(n_blocks, blocksize, grain_elements, [&](int64_t b0, int64_t b1) {
    int64_t nonfinite = 0;
    auto run = [&](auto type, const auto* x) {
      using T = decltype(type);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
#ifdef QK_QUANT_AVX2
        if (len == blocksize) {
          am[b] = T::to_float(block_max_bits(x + start, blocksize, T{}));
        } else {
          am[b] = T::to_float(block_max_bits_scalar<T>(x + start, len));
        }
#else
        am[b] = T::to_float(block_max_bits_scalar<T>(x + start, len));
#endif
        nonfinite += !std::isfinite(am[b]);
      }
    };
    if (st == at::kHalf)
      run(F16{}, static_cast<const uint16_t*>(src));
    else if (st == at::kBFloat16)
      run(BF16{}, static_cast<const uint16_t*>(src));
    else
      run(F32{}, static_cast<const uint32_t*>(src));
    nonfinite_blocks += nonfinite;
  });
  return nonfinite_blocks.load();
}

// Number of the 255 sorted midpoints strictly below v: a branchless binary search over them
// padded to 256 with +inf (never below v, as NaN was replaced by 0).
inline uint8_t nearest_code(float v, const float* mids256) {
  if (v != v) v = 0.f;
  int idx = 0;
  for (int step = 128; step >= 1; step >>= 1) idx += mids256[idx + step - 1] < v ? step : 0;
  return static_cast<uint8_t>(idx);
}

#ifdef QK_QUANT_AVX2
// nearest_code of 8 values into out[0..8): the same binary search, the 8 searches side by side
// (a gather per step), so that each step's load no longer waits on the previous compare.
inline void nearest_codes8(__m256 v, const float* mids256, uint8_t* out) {
  v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));  // NaN -> +0
  __m256i idx = _mm256_setzero_si256();
  for (int step = 128; step >= 1; step >>= 1) {
    const __m256 m = _mm256_i32gather_ps(mids256 + step - 1, idx, 4);
    const __m256i below = _mm256_castps_si256(_mm256_cmp_ps(m, v, _CMP_LT_OQ));
    idx = _mm256_add_epi32(idx, _mm256_and_si256(below, _mm256_set1_epi32(step)));
  }
  const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(idx), _mm256_extracti128_si256(idx, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(words, words));
}
#endif

// absmax: finite fp32 [n]; codes: uint8 [n]; nested: fp32 [ceil(n / nested_blocksize)].
void quantize_absmax_dq(const at::Tensor& absmax, double offset, const at::Tensor& midpoints,
                        int64_t nested_blocksize, at::Tensor codes, at::Tensor nested, int64_t grain_elements) {
  const int64_t n = absmax.numel();
  const int64_t n_blocks = (n + nested_blocksize - 1) / nested_blocksize;
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous(), "quantize_absmax_dq: absmax must be "
              "contiguous float32");
  TORCH_CHECK(midpoints.scalar_type() == at::kFloat && midpoints.is_contiguous() && midpoints.numel() == 255,
              "quantize_absmax_dq: midpoints must be 255 contiguous float32");
  TORCH_CHECK(nested_blocksize > 0 && nested_blocksize <= kMaxBlock,
              "quantize_absmax_dq: nested_blocksize must be from 1 to 4096, got ", nested_blocksize);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == n,
              "quantize_absmax_dq: codes must be contiguous uint8, one per absmax");
  TORCH_CHECK(nested.scalar_type() == at::kFloat && nested.is_contiguous() && nested.numel() == n_blocks,
              "quantize_absmax_dq: nested must be contiguous float32, one per nested block");
  float mids256[256];
  std::memcpy(mids256, midpoints.data_ptr<float>(), 255 * sizeof(float));
  mids256[255] = std::numeric_limits<float>::infinity();
  const float off = static_cast<float>(offset);  // an fp32 value passed through a double: exact
  const float* a = absmax.data_ptr<float>();
  uint8_t* c = codes.data_ptr<uint8_t>();
  float* na = nested.data_ptr<float>();
  parallel_blocks(n_blocks, nested_blocksize, grain_elements, [&](int64_t b0, int64_t b1) {
    float centered[kMaxBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * nested_blocksize, len = std::min(nested_blocksize, n - start);
      float m = 0.f;
      for (int64_t i = 0; i < len; ++i) {
        centered[i] = a[start + i] - off;
        m = std::max(m, std::fabs(centered[i]));
      }
      na[b] = m;
      const float r = 1.0f / m;
      int64_t i = 0;
#ifdef QK_QUANT_AVX2
      for (; i + 8 <= len; i += 8)
        nearest_codes8(_mm256_mul_ps(_mm256_loadu_ps(centered + i), _mm256_set1_ps(r)), mids256, c + start + i);
#endif
      for (; i < len; ++i) c[start + i] = nearest_code(centered[i] * r, mids256);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qkernels_cpu, m) {
  m.def(
      "quantize_nf4(Tensor flat, Tensor midpoints, int blocksize, Tensor(a!) absmax, Tensor(b!) packed, "
      "int grain_elements) -> int");
  m.def(
      "quantize_absmax_dq(Tensor absmax, float offset, Tensor midpoints, int nested_blocksize, Tensor(a!) codes, "
      "Tensor(b!) nested, int grain_elements) -> ()");
  m.def("block_absmax(Tensor flat, int blocksize, Tensor(a!) absmax, int grain_elements) -> int");
}

TORCH_LIBRARY_IMPL(qkernels_cpu, CPU, m) {
  m.impl("quantize_nf4", &quantize_nf4);
  m.impl("quantize_absmax_dq", &quantize_absmax_dq);
  m.impl("block_absmax", &block_absmax);
}
