// What the NF4 CPU kernels (cpu_nf4.cpp) and their AVX-512 decode path (cpu_nf4_avx512.cpp) share:
// the instruction-set macros, a weight's block scales and the view of a weight the kernels read.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
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

// log2 of a power of two (a TORCH_CHECK names `what` otherwise).
int log2_exact(int64_t v, const char* what);
// The view of one weight given as the tensors of qkernels.nf4_args.kernel_args, its output y [M, N].
WeightView view_of(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                   const at::Tensor& quant_map, const std::optional<at::Tensor>& nested_map, double offset,
                   int64_t nested_blocksize, int64_t N, int64_t K, float* y);

#ifdef QK_AVX512
// y_i = x @ W_i.T for fp32 x [M, K] and weights whose rows hold whole scale blocks
// (K % (1 << bshift) == 0, blocksize >= 32): rows of all weights split over threads, grain rows a task.
void gemm512(const float* x, int64_t M, int64_t K, const std::vector<WeightView>& ws, int bshift, int64_t grain);

// The pieces gemm512 is made of, for callers that split the work themselves (cpu_decode_stack.cpp):
// x [n] (n % 32 == 0) with every 32 values as [x0 x2 .. x30 | x1 x3 .. x31], the layout the kernel
// reads; and rows [n0, n1) of w.y [M, w.N] from such a permuted xp [M, K], the same bits however
// the rows are split.
void permute_pairs512(const float* x, int64_t n, float* xp);
void weight_rows512(const float* xp, int64_t M, int64_t K, const WeightView& w, int bshift, int64_t n0, int64_t n1);
#endif

}  // namespace qkernels_nf4
