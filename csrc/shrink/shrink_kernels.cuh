// Kernels of the grouped specialist GEMMs (launched by shrink_cuda.cu). All K specialists are one
// [K*r, d] weight, so the shrink reads x once as a shared-memory tiled GEMM; the backward's
// reductions over tokens write per-split partials summed in a fixed order (no atomics). Global
// memory is read and written only through cuda::ld / cuda::st / mma::copy16 (plain accesses under
// nvcc, counted under the emulation). Compiles with nvcc, and with a C++ compiler under
// HYCAM_CUDA_EMULATION (csrc/emulation/cuda_emulation.h; the emulation tests and
// benchmarks/gpu_model.py).
#pragma once

#include "../common/cuda_device.cuh"
#include "../common/cuda_mma.cuh"
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
      [&](int64_t t, int64_t j) { return t < T ? static_cast<acc_t>(cuda::ld(x + t * d + j)) : acc_t(0); },
      [&](int64_t j, int64_t o) { return o < KR ? static_cast<acc_t>(cuda::ld(A + o * d + j)) : acc_t(0); }, acc);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int m = 0; m < 2; ++m)
    for (int c = 0; c < 4; ++c) {
      const int64_t t = t0 + ty + 16 * m, o = o0 + tx + 16 * c;
      if (t < T && o < KR)
        cuda::st(p + t * KR + o,
                 static_cast<scalar_t>((ab ? static_cast<acc_t>(cuda::ld(ab + o)) : acc_t(0)) + acc[m][c]));
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
    acc_t v = nb ? static_cast<acc_t>(cuda::ld(nb + k * r + i)) : acc_t(0);
    for (int64_t m = 0; m < r; ++m)
      v += static_cast<acc_t>(cuda::ld(N + (k * r + i) * r + m)) * static_cast<acc_t>(cuda::ld(p + tk * r + m));
    cuda::st(w + q, static_cast<scalar_t>(v));
  }
}

// dp[t, k, :] = N_k^T dw[t, k, :]   (acc_t; dp_lo, if given, gets it rounded to scalar_t for the
// tensor-core kernels, as the reference rounds its matmul outputs)
template <typename scalar_t, typename acc_t>
HYCAM_GLOBAL void dp_kernel(const scalar_t* __restrict__ dw, const scalar_t* __restrict__ N, acc_t* __restrict__ dp,
                          scalar_t* __restrict__ dp_lo, int64_t T, int64_t K, int64_t r) {
  const int64_t n = T * K * r;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < n;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = q % r, tk = q / r, k = tk % K;
    acc_t v = 0;
    for (int64_t i = 0; i < r; ++i)
      v += static_cast<acc_t>(cuda::ld(N + (k * r + i) * r + m)) * static_cast<acc_t>(cuda::ld(dw + tk * r + i));
    cuda::st(dp + q, v);
    if (dp_lo) cuda::st(dp_lo + q, static_cast<scalar_t>(v));
  }
}

// dx[t, j] = sum_o dp[t, o] A[o, j]
template <typename scalar_t, typename acc_t>
HYCAM_GLOBAL void dx_kernel(const acc_t* __restrict__ dp, const scalar_t* __restrict__ A, scalar_t* __restrict__ dx,
                          int64_t T, int64_t d, int64_t KR) {
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(kTM), j0 = blockIdx.y * static_cast<int64_t>(kTN);
  acc_t acc[2][4] = {};
  tile_gemm<acc_t>(
      t0, j0, 0, KR, [&](int64_t t, int64_t o) { return t < T ? cuda::ld(dp + t * KR + o) : acc_t(0); },
      [&](int64_t o, int64_t j) { return j < d ? static_cast<acc_t>(cuda::ld(A + o * d + j)) : acc_t(0); }, acc);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int m = 0; m < 2; ++m)
    for (int c = 0; c < 4; ++c) {
      const int64_t t = t0 + ty + 16 * m, j = j0 + tx + 16 * c;
      if (t < T && j < d) cuda::st(dx + t * d + j, static_cast<scalar_t>(acc[m][c]));
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
      o0, j0, ts0, ts1, [&](int64_t o, int64_t t) { return o < KR ? cuda::ld(dp + t * KR + o) : acc_t(0); },
      [&](int64_t t, int64_t j) { return j < d ? static_cast<acc_t>(cuda::ld(x + t * d + j)) : acc_t(0); }, acc);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int m = 0; m < 2; ++m)
    for (int c = 0; c < 4; ++c) {
      const int64_t o = o0 + ty + 16 * m, j = j0 + tx + 16 * c;
      if (o < KR && j < d) cuda::st(part + (split * KR + o) * d + j, acc[m][c]);
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
    for (int64_t t = ts0; t < ts1; ++t) v += cuda::ld(dp + t * KR + q);
  } else if (q < KR + K * r * r) {
    const int64_t e = q - KR, m = e % r, ki = e / r;  // ki = k * r + i
    const int64_t k = ki / r;
    for (int64_t t = ts0; t < ts1; ++t)
      v += static_cast<acc_t>(cuda::ld(dw + t * KR + ki)) * static_cast<acc_t>(cuda::ld(p + t * KR + k * r + m));
  } else {
    const int64_t o = q - KR - K * r * r;
    for (int64_t t = ts0; t < ts1; ++t) v += static_cast<acc_t>(cuda::ld(dw + t * KR + o));
  }
  cuda::st(part + split * nq + q, v);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core versions of shrink_kernel, dx_kernel and dA_kernel for half and bfloat16 (float
// accumulation). A block of 4 warps computes a [kMM, kMN] float tile of C[m, n] = sum_q L(m, q)
// R(q, n); each warp owns 32 x 32 of it as 2 x 2 wmma tiles. Operands are staged in shared memory
// with 16-byte copies where the global rows allow it (row length a multiple of 8 elements and a
// 16-byte aligned base), element by element with zero fill at the edges otherwise.
constexpr int kMThreads = 128;
constexpr int kMM = 64, kMN = 64, kMK = 32;
constexpr int kPad = 8;  // keeps every wmma tile pointer 32-byte aligned and spreads banks
// row stride of the float result tile: 8 words off a multiple of 32, so that the four rows of a
// half-warp's 64-bit accumulator stores fall on different banks (kMN + 4: 2-way conflicts)
constexpr int kCS = kMN + 8;
static_assert(kMN == kTN, "the launchers' grid checks assume one output-tile width for both paths");

// Copy the [R, C] window at (r0, c0) of a row-major global matrix (row stride ld, valid while
// row < r_end and col < c_end) into s (row stride C + kPad), zero outside.
template <int R, int C, typename T>
HYCAM_DEVICE void load_window(T* s, const T* __restrict__ g, int64_t ld, int64_t r0, int64_t r_end, int64_t c0,
                              int64_t c_end, bool vec) {
  constexpr int kChunks = R * C / 8;
  for (int e = threadIdx.x; e < kChunks; e += kMThreads) {
    const int rr = e / (C / 8), cc = (e % (C / 8)) * 8;
    const int64_t row = r0 + rr, col = c0 + cc;
    T* dst = s + rr * (C + kPad) + cc;
    if (vec && row < r_end && col + 8 <= c_end) {
      mma::copy16(dst, g + row * ld + col);
    } else {
      for (int u = 0; u < 8; ++u) {
        if (row < r_end && col + u < c_end) {
          dst[u] = cuda::ld(g + row * ld + col + u);
        } else {
          mma::from_float(0.f, dst[u]);
        }
      }
    }
  }
}

// Global operand of tc_gemm: element (row, col) at p[row * ld + col].
template <typename T>
struct Operand {
  const T* p;
  int64_t ld;
  bool vec;  // 16-byte copies allowed
};

// Host side: 16-byte copies need rows of a multiple of 8 elements and a 16-byte aligned base.
template <typename T>
inline Operand<T> make_operand(const T* p, int64_t ld) {
  return Operand<T>{p, ld, ld % 8 == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0};
}

// kLmq: L is stored [m][q] in global memory (else [q][m]); kRnq: R is stored [n][q] (else [q][n]).
// m < m_end, n < n_end, q in [q_begin, q_end). Returns the block's [kMM][kMN + 4] float tile in
// shared memory (row stride kCS), readable by all threads on return.
template <bool kLmq, bool kRnq, typename T>
HYCAM_DEVICE const float* tc_gemm(Operand<T> L, Operand<T> R, int64_t m0, int64_t m_end, int64_t n0, int64_t n_end,
                                  int64_t q_begin, int64_t q_end) {
  constexpr int kLS = kLmq ? kMK + kPad : kMM + kPad;  // row stride of the staged L
  constexpr int kRS = kRnq ? kMK + kPad : kMN + kPad;
  struct alignas(32) Smem {
    T L[kLmq ? kMM * kLS : kMK * kLS];
    T R[kRnq ? kMN * kRS : kMK * kRS];
    float C[kMM * kCS];
  };
  HYCAM_SHARED Smem sm;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  mma::FragC acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) mma::zero(acc[i][j]);
  for (int64_t q0 = q_begin; q0 < q_end; q0 += kMK) {
    if (kLmq) {
      load_window<kMM, kMK>(sm.L, L.p, L.ld, m0, m_end, q0, q_end, L.vec);
    } else {
      load_window<kMK, kMM>(sm.L, L.p, L.ld, q0, q_end, m0, m_end, L.vec);
    }
    if (kRnq) {
      load_window<kMN, kMK>(sm.R, R.p, R.ld, n0, n_end, q0, q_end, R.vec);
    } else {
      load_window<kMK, kMN>(sm.R, R.p, R.ld, q0, q_end, n0, n_end, R.vec);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kMK; kk += mma::kTile) {
      mma::FragA<T, kLmq> a[2];
      mma::FragB<T, !kRnq> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int mi = (wm * 2 + i) * mma::kTile;
        mma::load_a<kLmq>(a[i], kLmq ? sm.L + mi * kLS + kk : sm.L + kk * kLS + mi, kLS);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int nj = (wn * 2 + j) * mma::kTile;
        mma::load_b<!kRnq>(b[j], kRnq ? sm.R + nj * kRS + kk : sm.R + kk * kRS + nj, kRS);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) mma::mma(acc[i][j], a[i], b[j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      mma::store(sm.C + (wm * 2 + i) * mma::kTile * kCS + (wn * 2 + j) * mma::kTile, acc[i][j], kCS);
  __syncthreads();
  return sm.C;
}

// store(m, n, value) for every element of the block's result tile at (m0, n0) inside the matrix.
template <typename Store>
HYCAM_DEVICE void tile_epilogue(const float* C, int64_t m0, int64_t m_end, int64_t n0, int64_t n_end, Store store) {
  for (int e = threadIdx.x; e < kMM * kMN; e += kMThreads) {
    const int mm = e / kMN, nn = e % kMN;
    if (m0 + mm < m_end && n0 + nn < n_end) store(m0 + mm, n0 + nn, C[mm * kCS + nn]);
  }
}

// Split-K over d (without it the grid is ceil(T / kMM) * ceil(KR / kMN) blocks: 128 at the
// design shape, fewer than an H100 has SMs): partial p[split, t, o] = sum_{j in split} x[t, j]
// A[o, j]; grid (ceil(T / kMM), ceil(KR / kMN), SK); shrink_finish_kernel adds the SK partials in
// order, adds the bias and rounds.
template <typename T>
HYCAM_GLOBAL void shrink_tc_kernel(Operand<T> x, Operand<T> A, float* __restrict__ part, int64_t num_tokens,
                                   int64_t d, int64_t KR, int64_t per_split) {
#if HYCAM_MMA_AVAILABLE
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(kMM), o0 = blockIdx.y * static_cast<int64_t>(kMN);
  const int64_t split = blockIdx.z, q0 = split * per_split, q1 = min(d, q0 + per_split);
  const float* C = tc_gemm</*kLmq=*/true, /*kRnq=*/true>(x, A, t0, num_tokens, o0, KR, q0, q1);
  tile_epilogue(C, t0, num_tokens, o0, KR,
                [&](int64_t t, int64_t o, float v) { cuda::st(part + (split * num_tokens + t) * KR + o, v); });
#endif
}

// p[t, o] = round(a[o] + sum_{s < SK} part[s, t, o]), summed in split order; n = T * KR.
template <typename T>
HYCAM_GLOBAL void shrink_finish_kernel(const float* __restrict__ part, int64_t SK, const T* __restrict__ ab,
                                       T* __restrict__ p, int64_t n, int64_t KR) {
#if HYCAM_MMA_AVAILABLE
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < n;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int64_t sk = 0; sk < SK; ++sk) v += cuda::ld(part + sk * n + q);
    if (ab) v += mma::to_float(cuda::ld(ab + q % KR));
    T out;
    mma::from_float(v, out);
    cuda::st(p + q, out);
  }
#endif
}

// Split-K of the shrink, from d only (never from the GPU): one split per 1024 channels, at most 4,
// each a multiple of kMK channels.
struct ShrinkSplitK {
  int64_t SK, per_split;
};
inline ShrinkSplitK shrink_split_k(int64_t d) {
  int64_t SK = cuda::ceil_div(d, 1024);
  SK = SK < 4 ? SK : 4;
  SK = SK > 1 ? SK : 1;
  int64_t per = cuda::ceil_div(cuda::ceil_div(d, SK), kMK) * kMK;
  per = per > kMK ? per : kMK;  // d == 0: one empty split
  const int64_t n = cuda::ceil_div(d, per);
  return ShrinkSplitK{n > 1 ? n : 1, per};
}

// dx[t, j] = sum_o dp[t, o] A[o, j] with dp rounded to T; grid (ceil(T / kMM), ceil(d / kMN)).
template <typename T>
HYCAM_GLOBAL void dx_tc_kernel(Operand<T> dp, Operand<T> A, T* __restrict__ dx, int64_t num_tokens, int64_t d, int64_t KR) {
#if HYCAM_MMA_AVAILABLE
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(kMM), j0 = blockIdx.y * static_cast<int64_t>(kMN);
  const float* C = tc_gemm</*kLmq=*/true, /*kRnq=*/false>(dp, A, t0, num_tokens, j0, d, 0, KR);
  tile_epilogue(C, t0, num_tokens, j0, d, [&](int64_t t, int64_t j, float v) {
    T out;
    mma::from_float(v, out);
    cuda::st(dx + t * d + j, out);
  });
#endif
}

// partial dA[split, o, j] = sum_{t in split} dp[t, o] x[t, j]; grid (ceil(KR / kMM), ceil(d / kMN), S).
template <typename T>
HYCAM_GLOBAL void dA_tc_kernel(Operand<T> dp, Operand<T> x, float* __restrict__ part, int64_t num_tokens, int64_t d,
                               int64_t KR, int64_t per_split) {
#if HYCAM_MMA_AVAILABLE
  const int64_t o0 = blockIdx.x * static_cast<int64_t>(kMM), j0 = blockIdx.y * static_cast<int64_t>(kMN);
  const int64_t split = blockIdx.z, ts0 = split * per_split, ts1 = min(num_tokens, ts0 + per_split);
  const float* C = tc_gemm</*kLmq=*/false, /*kRnq=*/false>(dp, x, o0, KR, j0, d, ts0, ts1);
  tile_epilogue(C, o0, KR, j0, d, [&](int64_t o, int64_t j, float v) { cuda::st(part + (split * KR + o) * d + j, v); });
#endif
}

// launch configuration of the backward (host side; shared with the emulation test)
constexpr int64_t kSmallSplitTokens = 128, kMaxSmallSplits = 64;
struct ShrinkBackwardConfig {
  int64_t nO, nJ, S, per_split, nq;
  int64_t S_small, per_small;  // token splits of small_reductions_kernel (partials pSmall [S_small, nq])
};

// tensor_cores: the dA tiles are kMM rows (dA_tc_kernel) instead of kTM (dA_kernel). The token
// split counts depend on T only (never on the GPU, so the results are the same on every GPU
// model): dA one split per 1024 tokens, at most 8; small_reductions_kernel, whose threads each walk
// their split's tokens one by one (latency-bound: a few dependent loads per step), one split per
// 128 tokens, at most 64.
inline ShrinkBackwardConfig shrink_backward_config(int64_t T, int64_t d, int64_t K, int64_t r,
                                                   bool tensor_cores = false) {
  ShrinkBackwardConfig c;
  const int64_t KR = K * r;
  c.nO = cuda::ceil_div(KR, tensor_cores ? kMM : kTM);
  c.nJ = cuda::ceil_div(d, kTN);
  int64_t S = cuda::ceil_div(T, 1024);
  S = S < 8 ? S : 8;
  c.S = S > 1 ? S : 1;
  c.per_split = cuda::ceil_div(T, c.S);
  c.nq = 2 * KR + K * r * r;
  int64_t Ss = cuda::ceil_div(T, kSmallSplitTokens);
  Ss = Ss < kMaxSmallSplits ? Ss : kMaxSmallSplits;
  c.S_small = Ss > 1 ? Ss : 1;
  c.per_small = cuda::ceil_div(T, c.S_small);
  return c;
}

}  // namespace shrink_kernels
}  // namespace hycam
