// The per-element and per-row maths of HyCAM, shared verbatim by the CPU kernels (tested on
// every machine) and the CUDA kernels (which differ only in how rows and channels map to
// threads). Formulas: docs/formulas.md. acc_t is float for half/bfloat16/float, double
// for double.
#pragma once

#include <cmath>
#include <cstdint>

#include "placement.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HYCAM_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define HYCAM_HD inline __attribute__((always_inline))  // inlined into every vector loop
#else
#define HYCAM_HD inline
#endif

namespace hycam {

#if !defined(__CUDA_ARCH__)
// Branch-free expf for the CPU kernels (Cephes-style range reduction and polynomial, relative
// error < 2 ulp) that compilers vectorise, unlike libm's expf. Special values as expf: +inf for
// x > 88.376, 0 below -87.34 (no subnormals), NaN in -> NaN out.
HYCAM_HD float fast_expf(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447505531f;
  const bool nan = x != x;
  float xc = nan ? 0.0f : (x < lo ? lo : (x > hi ? hi : x));
  const float t = xc * 1.44269504088896341f + 0.5f;
  int32_t n = static_cast<int32_t>(t);
  n -= static_cast<float>(n) > t ? 1 : 0;  // floor
  const float nf = static_cast<float>(n);
  const float r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;  // xc - n ln2, Cody-Waite
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float p2;
  __builtin_memcpy(&p2, &bits, sizeof(p2));
  float res = y * p2;
  res = x > hi ? __builtin_huge_valf() : res;
  res = x < lo ? 0.0f : res;
  return nan ? x : res;
}
#endif

template <typename acc_t>
HYCAM_HD acc_t exp_(acc_t v) {
#if defined(__CUDA_ARCH__)
  return ::exp(v);  // float and double overloads of the CUDA math library
#else
  if constexpr (sizeof(acc_t) == sizeof(float)) {
    return fast_expf(v);
  } else {
    return std::exp(v);
  }
#endif
}

template <typename acc_t>
HYCAM_HD acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + exp_(-v));
}

// silu and its derivative from a precomputed sg = sigmoid(v) (one exp serves both)
template <typename acc_t>
HYCAM_HD acc_t silu_from_sigmoid(acc_t v, acc_t sg) {
  return v * sg;
}

template <typename acc_t>
HYCAM_HD acc_t silu_grad_from_sigmoid(acc_t v, acc_t sg) {
  return sg * (acc_t(1) + v * (acc_t(1) - sg));
}

// silu(v) = v * sigma(v)
template <typename acc_t>
HYCAM_HD acc_t silu(acc_t v) {
  return silu_from_sigmoid(v, sigmoid(v));
}

// Output of one element given the gated specialist sum spec = sum_k g_k e_k.
//   residual:  (h_in + a) * c     attention: h_in + a * c,   c = 1 + silu(z) + spec
template <typename acc_t>
HYCAM_HD acc_t cam_value(acc_t z, acc_t spec) {
  return acc_t(1) + silu(z) + spec;
}

template <typename acc_t>
HYCAM_HD acc_t modulate(Placement placement, acc_t h_in, acc_t a, acc_t c) {
  return placement == Placement::RESIDUAL ? (h_in + a) * c : h_in + a * c;
}

// gc = dL/dc for one element: go * h (residual, h = h_in + a) or go * a (attention).
template <typename acc_t>
HYCAM_HD acc_t gate_grad(Placement placement, acc_t go, acc_t h_in, acc_t a) {
  return placement == Placement::RESIDUAL ? go * (h_in + a) : go * a;
}

// Layout helpers (int64 throughout): row-major [T, d], [T, K, r], [K, d, r], [K, r, d], [K, r, r].
HYCAM_HD int64_t idx_td(int64_t t, int64_t j, int64_t d) { return t * d + j; }
HYCAM_HD int64_t idx_tkr(int64_t t, int64_t k, int64_t i, int64_t K, int64_t r) { return (t * K + k) * r + i; }
HYCAM_HD int64_t idx_kdr(int64_t k, int64_t j, int64_t i, int64_t d, int64_t r) { return (k * d + j) * r + i; }
HYCAM_HD int64_t idx_krd(int64_t k, int64_t i, int64_t j, int64_t r, int64_t d) { return (k * r + i) * d + j; }

}  // namespace hycam
