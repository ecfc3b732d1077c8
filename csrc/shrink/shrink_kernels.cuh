// Kernels of the grouped specialist GEMMs (launched by shrink_cuda.cu). All K specialists are one
// [K*r, d] weight, so the shrink reads x once as a shared-memory tiled GEMM; the backward's
// reductions over tokens write per-split partials summed in a fixed order (no atomics). Compiles
// with nvcc, and with a C++ compiler under HYCAM_CUDA_EMULATION (python_tests/test_cuda_emulation.py).
#pragma once

#include "../common/cuda_device.cuh"
#include "../common/hycam_math.h"

namespace hycam {
namespace shrink_kernels {

constexpr int kThreads = 256;  // all tiled kernels: 16 x 16 threads
constexpr int kTM = 32;        // rows (tokens or outputs) per tile
constexpr int kTN = 64;        // columns (outputs or channels) per tile
constexpr int kTK = 32;        // reduction depth per shared-memory stage

// C[m, n] = sum_q L(m, q) * R(q, n) for one [kTM, kTN] tile, L and R loaded through functors
// that return 0 out of range. Thread (ty, tx) owns rows ty + 16 * a (a < 2), cols tx + 16 * c (c < 4).
// kRByQ: R is stored with q contiguous (R(q, n) = base[n * ld + q]): consecutive threads then load
// consecutive q so that the global loads coalesce.
template <typename acc_t, bool kRByQ = false, typename LoadL, typename LoadR>
HYCAM_DEVICE void tile_gemm(int64_t m0, int64_t n0, int64_t q_begin, int64_t q_end, LoadL loadL,
                                          LoadR loadR, acc_t (&acc)[2][4]) {
  HYCAM_SHARED acc_t Ls[kTM][kTK + 1];
  HYCAM_SHARED acc_t Rs[kTK][kTN + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int64_t q0 = q_begin; q0 < q_end; q0 += kTK) {
    for (int e = threadIdx.x; e < kTM * kTK; e += kThreads) {
      const int mm = e / kTK, qq = e % kTK;
      Ls[mm][qq] = (q0 + qq < q_end) ? loadL(m0 + mm, q0 + qq) : acc_t(0);
    }
    for (int e = threadIdx.x; e < kTK * kTN; e += kThreads) {
      const int qq = kRByQ ? e % kTK : e / kTN, nn = kRByQ ? e / kTK : e % kTN;
      Rs[qq][nn] = (q0 + qq < q_end) ? loadR(q0 + qq, n0 + nn) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int qq = 0; qq < kTK; ++qq) {
      const acc_t l0 = Ls[ty][qq], l1 = Ls[ty + 16][qq];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const acc_t rv = Rs[qq][tx + 16 * c];
        acc[0][c] += l0 * rv;
        acc[1][c] += l1 * rv;
      }
    }
    __syncthreads();
  }
}

// p[t, o] = a[o] + sum_j x[t, j] A[o, j]      (o = k * r + i)
template <typename scalar_t, typename acc_t>
HYCAM_GLOBAL void shrink_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ A,
                              const scalar_t* __restrict__ ab, scalar_t* __restrict__ p, int64_t T, int64_t d,
                              int64_t KR) {
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(kTM), o0 = blockIdx.y * static_cast<int64_t>(kTN);
  acc_t acc[2][4] = {};
  tile_gemm<acc_t, /*kRByQ=*/true>(
      t0, o0, 0, d,
      [&](int64_t t, int64_t j) { return t < T ? static_cast<acc_t>(x[t * d + j]) : acc_t(0); },
      [&](int64_t j, int64_t o) { return o < KR ? static_cast<acc_t>(A[o * d + j]) : acc_t(0); }, acc);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int m = 0; m < 2; ++m)
    for (int c = 0; c < 4; ++c) {
      const int64_t t = t0 + ty + 16 * m, o = o0 + tx + 16 * c;
      if (t < T && o < KR) p[t * KR + o] = static_cast<scalar_t>((ab ? static_cast<acc_t>(ab[o]) : acc_t(0)) + acc[m][c]);
    }
}

// w[t, k, :] = N_k p[t, k, :] + n_k
template <typename scalar_t, typename acc_t>
HYCAM_GLOBAL void mix_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ N,
                           const scalar_t* __restrict__ nb, scalar_t* __restrict__ w, int64_t T, int64_t K,
                           int64_t r) {
  const int64_t n = T * K * r;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < n;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = q % r, tk = q / r, k = tk % K;
    acc_t v = nb ? static_cast<acc_t>(nb[k * r + i]) : acc_t(0);
    for (int64_t m = 0; m < r; ++m) v += static_cast<acc_t>(N[(k * r + i) * r + m]) * static_cast<acc_t>(p[tk * r + m]);
    w[q] = static_cast<scalar_t>(v);
  }
}

// dp[t, k, :] = N_k^T dw[t, k, :]   (acc_t)
template <typename scalar_t, typename acc_t>
HYCAM_GLOBAL void dp_kernel(const scalar_t* __restrict__ dw, const scalar_t* __restrict__ N, acc_t* __restrict__ dp,
                          int64_t T, int64_t K, int64_t r) {
  const int64_t n = T * K * r;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < n;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = q % r, tk = q / r, k = tk % K;
    acc_t v = 0;
    for (int64_t i = 0; i < r; ++i) v += static_cast<acc_t>(N[(k * r + i) * r + m]) * static_cast<acc_t>(dw[tk * r + i]);
    dp[q] = v;
  }
}

// dx[t, j] = sum_o dp[t, o] A[o, j]
template <typename scalar_t, typename acc_t>
HYCAM_GLOBAL void dx_kernel(const acc_t* __restrict__ dp, const scalar_t* __restrict__ A, scalar_t* __restrict__ dx,
                          int64_t T, int64_t d, int64_t KR) {
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(kTM), j0 = blockIdx.y * static_cast<int64_t>(kTN);
  acc_t acc[2][4] = {};
  tile_gemm<acc_t>(
      t0, j0, 0, KR, [&](int64_t t, int64_t o) { return t < T ? dp[t * KR + o] : acc_t(0); },
      [&](int64_t o, int64_t j) { return j < d ? static_cast<acc_t>(A[o * d + j]) : acc_t(0); }, acc);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int m = 0; m < 2; ++m)
    for (int c = 0; c < 4; ++c) {
      const int64_t t = t0 + ty + 16 * m, j = j0 + tx + 16 * c;
      if (t < T && j < d) dx[t * d + j] = static_cast<scalar_t>(acc[m][c]);
    }
}

// partial dA[split, o, j] = sum_{t in split} dp[t, o] x[t, j]
template <typename scalar_t, typename acc_t>
HYCAM_GLOBAL void dA_kernel(const acc_t* __restrict__ dp, const scalar_t* __restrict__ x, acc_t* __restrict__ part,
                          int64_t T, int64_t d, int64_t KR, int64_t per_split) {
  const int64_t o0 = blockIdx.x * static_cast<int64_t>(kTM), j0 = blockIdx.y * static_cast<int64_t>(kTN);
  const int64_t split = blockIdx.z, ts0 = split * per_split, ts1 = min(T, ts0 + per_split);
  acc_t acc[2][4] = {};
  tile_gemm<acc_t>(
      o0, j0, ts0, ts1, [&](int64_t o, int64_t t) { return o < KR ? dp[t * KR + o] : acc_t(0); },
      [&](int64_t t, int64_t j) { return j < d ? static_cast<acc_t>(x[t * d + j]) : acc_t(0); }, acc);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int m = 0; m < 2; ++m)
    for (int c = 0; c < 4; ++c) {
      const int64_t o = o0 + ty + 16 * m, j = j0 + tx + 16 * c;
      if (o < KR && j < d) part[(split * KR + o) * d + j] = acc[m][c];
    }
}

// partials over token splits of da [KR], dN [K, r, r], dn [KR], packed as [split, KR + K*r*r + KR]
template <typename scalar_t, typename acc_t>
HYCAM_GLOBAL void small_reductions_kernel(const acc_t* __restrict__ dp, const scalar_t* __restrict__ dw,
                                        const scalar_t* __restrict__ p, acc_t* __restrict__ part, int64_t T,
                                        int64_t K, int64_t r, int64_t per_split) {
  const int64_t KR = K * r, nq = 2 * KR + K * r * r;
  const int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (q >= nq) return;
  const int64_t split = blockIdx.y, ts0 = split * per_split, ts1 = min(T, ts0 + per_split);
  acc_t v = 0;
  if (q < KR) {
    for (int64_t t = ts0; t < ts1; ++t) v += dp[t * KR + q];
  } else if (q < KR + K * r * r) {
    const int64_t e = q - KR, m = e % r, ki = e / r;  // ki = k * r + i
    const int64_t k = ki / r;
    for (int64_t t = ts0; t < ts1; ++t)
      v += static_cast<acc_t>(dw[t * KR + ki]) * static_cast<acc_t>(p[t * KR + k * r + m]);
  } else {
    const int64_t o = q - KR - K * r * r;
    for (int64_t t = ts0; t < ts1; ++t) v += static_cast<acc_t>(dw[t * KR + o]);
  }
  part[split * nq + q] = v;
}

inline int64_t grid_1d(int64_t n) {
  const int64_t g = cuda::ceil_div(n, 256);
  return g < 1 ? 1 : (g > 65535 ? 65535 : g);
}

// launch configuration of the backward (host side; shared with the emulation test)
struct ShrinkBackwardConfig {
  int64_t nO, nJ, S, per_split, nq;
};

inline ShrinkBackwardConfig shrink_backward_config(int64_t T, int64_t d, int64_t K, int64_t r, int64_t num_sms) {
  ShrinkBackwardConfig c;
  const int64_t KR = K * r;
  c.nO = cuda::ceil_div(KR, kTM);
  c.nJ = cuda::ceil_div(d, kTN);
  int64_t S = cuda::ceil_div(2 * num_sms, c.nO * c.nJ > 0 ? c.nO * c.nJ : 1);
  S = S < 32 ? S : 32;
  const int64_t chunks = cuda::ceil_div(T, kTK);
  S = S < chunks ? S : chunks;
  c.S = S > 1 ? S : 1;
  c.per_split = cuda::ceil_div(T, c.S);
  c.nq = 2 * KR + K * r * r;
  return c;
}

}  // namespace shrink_kernels
}  // namespace hycam
