// LoRA dropout from a seed: the keep/drop decision of element i is a hash of (seed, i), so a mask
// is never stored: the forward applies it to x, and the backward recomputes it where it needs it
// (the masked x for dA, the masked dx). One pass each, vectorized by the compiler (AVX2: 8 lanes).
// qkernels/lora_dropout.py has the same hash in torch, bit for bit, for machines without the
// extension.
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <cstdint>

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(qkernels_cpu, m) {
  m.def("dropout_apply(Tensor x, int seed, int threshold) -> Tensor");
  m.def("dropout_add_(Tensor(a!) y, Tensor t, int seed, int threshold) -> ()");
}

TORCH_LIBRARY_IMPL(qkernels_cpu, CPU, m) {
  m.impl("dropout_apply", &dropout_apply);
  m.impl("dropout_add_", &dropout_add_);
}
