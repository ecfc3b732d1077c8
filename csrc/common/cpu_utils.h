// Small helpers of the CPU kernels: fixed token chunking (deterministic reductions) and widening
// of half/bfloat16 operands to the accumulation type. Compiled once per instruction-set variant
// (csrc/cpu/isa.h), into hycam::<variant>::cpu.
#pragma once

#include "../cpu/kernel_includes.h"
#include "../cpu/isa.h"

// The dtype switch of the kernels' entry points: float64 only in the variant that serves it
// (baseline, see csrc/cpu/isa.h); the others never see it.
#if HYCAM_CPU_FLOAT64
#define HYCAM_CPU_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
#else
#define HYCAM_CPU_DISPATCH(TYPE, NAME, ...)                                                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                 \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)              \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
#endif

namespace hycam {
namespace HYCAM_CPU_ISA {
namespace cpu {

// Token chunks whose boundaries depend only on T (never on the thread count): reductions over
// tokens sum per-chunk partials in chunk order, so every result is bitwise reproducible.
struct Chunks {
  int64_t T, n;
  explicit Chunks(int64_t tokens) : T(tokens), n(std::max<int64_t>(1, std::min<int64_t>(16, (tokens + 63) / 64))) {}
  int64_t begin(int64_t c) const { return c * T / n; }
  int64_t end(int64_t c) const { return (c + 1) * T / n; }
};

// A contiguous tensor's data as acc_t: a pointer to it when the types match, else a widened copy.
template <typename scalar_t, typename acc_t>
struct Widened {
  std::vector<acc_t> buf;
  const acc_t* ptr = nullptr;
  explicit Widened(const at::Tensor& t) {
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      ptr = t.data_ptr<scalar_t>();
    } else {
      const scalar_t* src = t.data_ptr<scalar_t>();
      buf.resize(t.numel());
      for (int64_t i = 0; i < t.numel(); ++i) buf[i] = static_cast<acc_t>(src[i]);
      ptr = buf.data();
    }
  }
};

template <typename scalar_t, typename acc_t>
inline void widen_row(const scalar_t* src, acc_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
}

// Sum partial buffers [n, m] over n in order into acc [m].
template <typename acc_t>
inline void reduce_partials(const std::vector<acc_t>& part, int64_t n, int64_t m, acc_t* out) {
  at::parallel_for(0, m, 4096, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      acc_t s = 0;
      for (int64_t c = 0; c < n; ++c) s += part[c * m + q];
      out[q] = s;
    }
  });
}

}  // namespace cpu
}  // namespace HYCAM_CPU_ISA
}  // namespace hycam
