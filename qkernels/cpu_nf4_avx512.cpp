// The AVX-512 decode path of the NF4 CPU kernels (cpu_nf4.cpp's gemm calls gemm512).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_nf4.h"

#ifdef QK_AVX512
namespace qkernels_nf4 {
namespace {

// The decode fast path, for weights whose rows hold whole scale blocks (K % blocksize == 0,
// blocksize a multiple of 32: every real checkpoint). The 16 code values fit one zmm register;
// multiplied by a block's scale they are that block's dequantized values (the reference's
// rounding: one fp32 product), so a 16-entry lookup of nibbles widened to dwords (vpermps reads
// the low 4 bits of each index: the low nibble needs no mask) yields weights ready to FMA with x.
// 16 packed bytes give the even elements (high nibbles) and the odd ones (low nibbles) of 32
// columns: xp holds x with every 32 columns as [x0 x2 .. x30 | x1 x3 .. x31].
constexpr int64_t kPrefetchBytes = 4096;  // one core needs software prefetch to stream at DRAM speed

// The fp32 scales of blocks [b0, b1) into out, 16 at a time, with the same two fp32 roundings as
// BlockScales. The 256-entry nested code map is held as 8 pairs of zmm tables: vpermt2ps looks up
// 32 entries by an index's low 5 bits, and code bits 5..7 pick the pair through a blend tree (a
// third of the time of two vgatherdps, which are slow on AMD cores).
void decode_scales(const BlockScales& s, int64_t b0, int64_t b1, float* out) {
  if (s.absmax) {
    std::memcpy(out, s.absmax + b0, (b1 - b0) * sizeof(float));
    return;
  }
  __m512 map[16];
  for (int i = 0; i < 16; ++i) map[i] = _mm512_loadu_ps(s.nested_map + 16 * i);
  const __m512 offset = _mm512_set1_ps(s.offset);
  int64_t b = b0;
  for (; b + 16 <= b1; b += 16) {
    const __m512i code = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.codes + b)));
    __m512 pick[8];
    for (int q = 0; q < 8; ++q) pick[q] = _mm512_permutex2var_ps(map[2 * q], code, map[2 * q + 1]);
    for (int bit = 5, width = 8; width > 1; ++bit, width /= 2) {
      const __mmask16 high = _mm512_test_epi32_mask(code, _mm512_set1_epi32(1 << bit));
      for (int q = 0; q < width / 2; ++q) pick[q] = _mm512_mask_blend_ps(high, pick[2 * q], pick[2 * q + 1]);
    }
    __m512 nested;
    if ((b >> s.nested_shift) == ((b + 15) >> s.nested_shift)) {
      nested = _mm512_set1_ps(s.nested_absmax[b >> s.nested_shift]);
    } else {
      alignas(64) float lanes[16];
      for (int i = 0; i < 16; ++i) lanes[i] = s.nested_absmax[(b + i) >> s.nested_shift];
      nested = _mm512_load_ps(lanes);
    }
    _mm512_storeu_ps(out + (b - b0), _mm512_add_ps(_mm512_mul_ps(pick[0], nested), offset));
  }
  for (; b < b1; ++b) out[b - b0] = s(b);
}

// y[m, n..n+NB) for MB rows of x: each decoded weight vector serves MB rows of x, each x vector
// NB rows of W; two accumulators per pair (even and odd columns) for MB <= 2 (few
// pairs), so FMA chains overlap. scales: the tile's first block, nblk blocks per row.
template <int MB, int NB>
void tile512(const float* xp, int64_t K, const uint8_t* packed, __m512 table, const float* scales, int bshift,
             int64_t n, int64_t N, float* y, const uint8_t* prefetch_end) {
  constexpr int kAcc = MB <= 2 ? 2 : 1;  // by MB alone: the sums do not depend on how rows are split
  const int64_t half = K / 2, nblk = K >> bshift, bs = int64_t{1} << bshift;
  const uint8_t* rows = packed + n * half;
  for (const uint8_t* p = rows + kPrefetchBytes; p < rows + kPrefetchBytes + NB * half && p < prefetch_end; p += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
  __m512 acc[MB][NB][kAcc];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j)
      for (int a = 0; a < kAcc; ++a) acc[m][j][a] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < nblk; ++blk) {
    __m512 t[NB];
    for (int j = 0; j < NB; ++j) t[j] = _mm512_mul_ps(table, _mm512_set1_ps(scales[j * nblk + blk]));
    for (int64_t k = blk * bs; k < (blk + 1) * bs; k += 32) {
      __m512 even[NB], odd[NB];
      for (int j = 0; j < NB; ++j) {
        const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + j * half + k / 2)));
        even[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(z, 4), t[j]);
        odd[j] = _mm512_permutexvar_ps(z, t[j]);
      }
      for (int m = 0; m < MB; ++m) {
        const __m512 xe = _mm512_loadu_ps(xp + m * K + k), xo = _mm512_loadu_ps(xp + m * K + k + 16);
        for (int j = 0; j < NB; ++j) {
          acc[m][j][0] = _mm512_fmadd_ps(even[j], xe, acc[m][j][0]);
          acc[m][j][kAcc - 1] = _mm512_fmadd_ps(odd[j], xo, acc[m][j][kAcc - 1]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j)
      y[m * N + n + j] = _mm512_reduce_add_ps(kAcc == 2 ? _mm512_add_ps(acc[m][j][0], acc[m][j][kAcc - 1]) : acc[m][j][0]);
}

template <int MB>
void rows512(const float* xp, int64_t K, const uint8_t* packed, __m512 table, const float* scales, int bshift,
             int64_t n0, int64_t n1, int64_t N, float* y, const uint8_t* prefetch_end) {
  constexpr int NB = MB <= 2 ? 4 : 2;
  const int64_t nblk = K >> bshift;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) tile512<MB, NB>(xp, K, packed, table, scales + (n - n0) * nblk, bshift, n, N, y, prefetch_end);
  for (; n < n1; ++n) tile512<MB, 1>(xp, K, packed, table, scales + (n - n0) * nblk, bshift, n, N, y, prefetch_end);
}

}  // namespace

// Rows [n0, n1) of one weight for all M rows of x: the rows' scales decoded once into a per-thread
// buffer, then slices of rows that stay in L2 while every group of up to 8 rows of x passes over
// them (only the first pass reads DRAM, so only it prefetches).
void weight_rows512(const float* xp, int64_t M, int64_t K, const WeightView& w, int bshift, int64_t n0, int64_t n1) {
  thread_local std::vector<float> scales;
  const int64_t nblk = K >> bshift;
  scales.resize(std::max<size_t>(scales.size(), (n1 - n0) * nblk));
  decode_scales(w.scales, n0 * nblk, n1 * nblk, scales.data());
  const __m512 table = _mm512_loadu_ps(w.qmap);
  const uint8_t* end = w.packed + n1 * (K / 2);
  // The tiles prefetch kPrefetchBytes ahead of themselves: the first ones get theirs here.
  for (const uint8_t* p = w.packed + n0 * (K / 2); p < w.packed + n0 * (K / 2) + kPrefetchBytes && p < end; p += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
  constexpr int64_t kSliceRows = 64;
  for (int64_t s0 = n0; s0 < n1; s0 += kSliceRows) {
    const int64_t s1 = std::min(n1, s0 + kSliceRows);
    const float* sc = scales.data() + (s0 - n0) * nblk;
    for (int64_t m = 0; m < M;) {
      const int64_t left = M - m;
      const int mb = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
      const uint8_t* pf = m == 0 ? end : nullptr;
      const float* xm = xp + m * K;
      float* ym = w.y + m * w.N;
      if (mb == 8) rows512<8>(xm, K, w.packed, table, sc, bshift, s0, s1, w.N, ym, pf);
      else if (mb == 4) rows512<4>(xm, K, w.packed, table, sc, bshift, s0, s1, w.N, ym, pf);
      else if (mb == 2) rows512<2>(xm, K, w.packed, table, sc, bshift, s0, s1, w.N, ym, pf);
      else rows512<1>(xm, K, w.packed, table, sc, bshift, s0, s1, w.N, ym, pf);
      m += mb;
    }
  }
}

void permute_pairs512(const float* x, int64_t n, float* xp) {
  for (int64_t i = 0; i < n; i += 32)
    for (int t = 0; t < 16; ++t) {
      xp[i + t] = x[i + 2 * t];
      xp[i + 16 + t] = x[i + 2 * t + 1];
    }
}

// Every weight in one parallel region: the rows of all of them, end to end, split over threads.
void gemm512(const float* x, int64_t M, int64_t K, const std::vector<WeightView>& ws, int bshift, int64_t grain) {
  thread_local std::vector<float> xperm;
  xperm.resize(std::max<size_t>(xperm.size(), M * K));
  permute_pairs512(x, M * K, xperm.data());
  const float* xp = xperm.data();
  int64_t rows = 0;
  for (const WeightView& w : ws) rows += w.N;
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    int64_t first = 0;
    for (const WeightView& w : ws) {
      const int64_t a = std::max(r0, first), b = std::min(r1, first + w.N);
      if (a < b) weight_rows512(xp, M, K, w, bshift, a - first, b - first);
      first += w.N;
    }
  });
}

}  // namespace qkernels_nf4
#endif
