// What the NF4 CPU kernels (cpu_nf4.cpp) and their AVX-512 decode path (cpu_nf4_avx512.cpp) share:
// the instruction-set macros, a weight's block scales and the view of a weight the kernels read.
#pragma once

#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QK_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define QK_AVX512 1
#endif

namespace qkernels_nf4 {

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

// One weight as the kernels read it.
struct WeightView {
  const uint8_t* packed;
  const float* qmap;
  BlockScales scales;
  int64_t N;
  float* y;  // its output, [M, N]
};

#ifdef QK_AVX512
// y_i = x @ W_i.T for fp32 x [M, K] and weights whose rows hold whole scale blocks
// (K % (1 << bshift) == 0, blocksize >= 32): rows of all weights split over threads, grain rows a task.
void gemm512(const float* x, int64_t M, int64_t K, const std::vector<WeightView>& ws, int bshift, int64_t grain);
#endif

}  // namespace qkernels_nf4
