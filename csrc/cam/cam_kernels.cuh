// Kernels of the fused CAM forward/backward (launched by cam_cuda.cu). A thread owns one channel
// j of a tile of tokens; the per-token reductions over channels (dg, dw) go through warp shuffles
// and shared memory in a fixed order, the reductions over tokens (dB, db) through per-split
// partials. No atomics: results are bitwise reproducible. The element maths is hycam_math.h,
// shared with the CPU kernels (cam_cpu.cpp). Global memory is read and written only through
// cuda::ld / cuda::st (cuda::will_load before expand_channel, whose loads are in hycam_math.h),
// plain accesses under nvcc, counted under the emulation. Compiles with nvcc, and with a C++
// compiler under HYCAM_CUDA_EMULATION (python_tests/test_cuda_emulation.py, benchmarks/gpu_model.py).
#pragma once

#include "../common/cuda_device.cuh"
#include "../common/hycam_math.h"

namespace hycam {
namespace cam_kernels {

constexpr int kFwdThreads = 256;    // channels per forward block
constexpr int kRowThreads = 256;    // threads of the backward row kernel
constexpr int kChanPerThread = 4;   // channels per thread in the backward row kernel
constexpr int kColThreads = 128;    // channels per dB block

// ---------------------------------------------------------------------------------------
// forward: grid (token tiles, channel blocks); w and g of the tile staged in shared memory
// ---------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
HYCAM_GLOBAL void cam_forward_kernel(const scalar_t* __restrict__ h_in, const scalar_t* __restrict__ a,
                                   const scalar_t* __restrict__ z, const scalar_t* __restrict__ w,
                                   const scalar_t* __restrict__ B, const scalar_t* __restrict__ b,
                                   const scalar_t* __restrict__ g, scalar_t* __restrict__ out, int64_t T, int64_t d,
                                   int64_t K, int64_t r, acc_t s, int64_t placement, int64_t tile) {
  HYCAM_DYNAMIC_SMEM(smem_raw);
  acc_t* ws = reinterpret_cast<acc_t*>(smem_raw);  // [tile, K, r]
  acc_t* gs = ws + tile * K * r;                   // [tile, K]
  const int64_t t0 = blockIdx.x * tile;
  const int64_t nt = min(tile, T - t0);
  for (int64_t q = threadIdx.x; q < nt * K * r; q += blockDim.x)
    ws[q] = static_cast<acc_t>(cuda::ld(w + t0 * K * r + q));
  for (int64_t q = threadIdx.x; q < nt * K; q += blockDim.x) gs[q] = static_cast<acc_t>(cuda::ld(g + t0 * K + q));
  __syncthreads();
  const int64_t j = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= d) return;
  for (int64_t tt = 0; tt < nt; ++tt) {
    acc_t spec = 0;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t gk = gs[tt * K + k];
      if (gk == acc_t(0)) continue;  // hard routing: only the routed specialist
      const acc_t bias = b ? static_cast<acc_t>(cuda::ld(b + k * d + j)) : acc_t(0);
      cuda::will_load(B + idx_kdr(k, j, 0, d, r), r);
      const acc_t u = expand_channel<scalar_t, acc_t>(B + idx_kdr(k, j, 0, d, r), ws + (tt * K + k) * r, bias, r);
      spec += gk * silu(s * u);
    }
    const int64_t e = idx_td(t0 + tt, j, d);
    const acc_t c = cam_value(static_cast<acc_t>(cuda::ld(z + e)), spec);
    const acc_t av = a ? static_cast<acc_t>(cuda::ld(a + e)) : acc_t(0);
    cuda::st(out + e, static_cast<scalar_t>(modulate(placement, static_cast<acc_t>(cuda::ld(h_in + e)), av, c)));
  }
}

// ---------------------------------------------------------------------------------------
// backward, rows: d_main, dz (elementwise) and per-channel-block partials of dg and dw
// (reductions over channels) -> prow [nJ, T, K, r + 1] (index r holds dg)
// ---------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
HYCAM_GLOBAL void cam_backward_rows_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ h_in,
                                         const scalar_t* __restrict__ a, const scalar_t* __restrict__ z,
                                         const scalar_t* __restrict__ w, const scalar_t* __restrict__ B,
                                         const scalar_t* __restrict__ b, const scalar_t* __restrict__ g,
                                         scalar_t* __restrict__ d_main, scalar_t* __restrict__ dz,
                                         acc_t* __restrict__ prow, int64_t T, int64_t d, int64_t K, int64_t r, acc_t s,
                                         int64_t placement, int64_t tile) {
  HYCAM_DYNAMIC_SMEM(smem_raw);
  const int64_t R1 = r + 1;
  const int nwarps = blockDim.x / 32, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  acc_t* ws = reinterpret_cast<acc_t*>(smem_raw);  // [tile, K, r]
  acc_t* gs = ws + tile * K * r;                   // [tile, K]
  acc_t* red = gs + tile * K;                      // [nwarps, tile, K, R1]
  const int64_t t0 = blockIdx.x * tile;
  const int64_t nt = min(tile, T - t0);
  for (int64_t q = threadIdx.x; q < nt * K * r; q += blockDim.x)
    ws[q] = static_cast<acc_t>(cuda::ld(w + t0 * K * r + q));
  for (int64_t q = threadIdx.x; q < nt * K; q += blockDim.x) gs[q] = static_cast<acc_t>(cuda::ld(g + t0 * K + q));
  __syncthreads();
  const int64_t jbase = blockIdx.y * static_cast<int64_t>(blockDim.x) * kChanPerThread + threadIdx.x;

  for (int64_t tt = 0; tt < nt; ++tt) {
    const int64_t t = t0 + tt;
    // gc = dL/dc does not depend on the specialists: one pass over k then serves spec (for
    // d_main), dg and dw, expanding each specialist once per channel
    acc_t gov[kChanPerThread], gcv[kChanPerThread], spec[kChanPerThread];
#pragma unroll
    for (int c = 0; c < kChanPerThread; ++c) {
      const int64_t j = jbase + static_cast<int64_t>(c) * blockDim.x;
      gov[c] = gcv[c] = spec[c] = 0;
      if (j < d) {
        const int64_t e = idx_td(t, j, d);
        const acc_t av = a ? static_cast<acc_t>(cuda::ld(a + e)) : acc_t(0);
        gov[c] = static_cast<acc_t>(cuda::ld(go + e));
        gcv[c] = gate_grad(placement, gov[c], static_cast<acc_t>(cuda::ld(h_in + e)), av);
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      const acc_t gk = gs[tt * K + k];  // the same for the whole block: branches are uniform
      acc_t pdg = 0;
      acc_t duv[kChanPerThread];
#pragma unroll
      for (int c = 0; c < kChanPerThread; ++c) {
        const int64_t j = jbase + static_cast<int64_t>(c) * blockDim.x;
        duv[c] = 0;
        if (j < d) {
          const acc_t bias = b ? static_cast<acc_t>(cuda::ld(b + k * d + j)) : acc_t(0);
          cuda::will_load(B + idx_kdr(k, j, 0, d, r), r);
          const acc_t v = s * expand_channel<scalar_t, acc_t>(B + idx_kdr(k, j, 0, d, r), ws + (tt * K + k) * r,
                                                               bias, r);
          const acc_t sg = sigmoid(v);
          const acc_t ek = silu_from_sigmoid(v, sg);
          pdg += gcv[c] * ek;
          if (gk != acc_t(0)) {  // hard routing: only the routed specialist
            spec[c] += gk * ek;
            duv[c] = gcv[c] * gk * s * silu_grad_from_sigmoid(v, sg);
          }
        }
      }
      acc_t* slot = red + ((static_cast<int64_t>(warp) * tile + tt) * K + k) * R1;
      pdg = cuda::warp_sum(pdg);
      if (lane == 0) slot[r] = pdg;
      for (int64_t i = 0; i < r; ++i) {
        acc_t v = 0;
        if (gk != acc_t(0)) {
#pragma unroll
          for (int c = 0; c < kChanPerThread; ++c) {
            const int64_t j = jbase + static_cast<int64_t>(c) * blockDim.x;
            if (j < d) v += duv[c] * static_cast<acc_t>(cuda::ld(B + idx_kdr(k, j, i, d, r)));
          }
          v = cuda::warp_sum(v);
        }
        if (lane == 0) slot[i] = v;
      }
    }
#pragma unroll
    for (int c = 0; c < kChanPerThread; ++c) {
      const int64_t j = jbase + static_cast<int64_t>(c) * blockDim.x;
      if (j < d) {
        const int64_t e = idx_td(t, j, d);
        const acc_t zv = static_cast<acc_t>(cuda::ld(z + e)), sz = sigmoid(zv);
        cuda::st(d_main + e, static_cast<scalar_t>(gov[c] * (acc_t(1) + silu_from_sigmoid(zv, sz) + spec[c])));
        cuda::st(dz + e, static_cast<scalar_t>(gcv[c] * silu_grad_from_sigmoid(zv, sz)));
      }
    }
  }
  __syncthreads();
  const int64_t per_warp = tile * K * R1;
  acc_t* dst = prow + (static_cast<int64_t>(blockIdx.y) * T + t0) * K * R1;
  for (int64_t q = threadIdx.x; q < nt * K * R1; q += blockDim.x) {
    acc_t v = 0;
    for (int wi = 0; wi < nwarps; ++wi) v += red[wi * per_warp + q];  // fixed order
    cuda::st(dst + q, v);
  }
}

// ---------------------------------------------------------------------------------------
// backward, columns: per-split partials of dB_k[j, :] and db_k[j] (reductions over tokens)
// grid (channel blocks, token splits, K) -> pB [S, K, d, r + 1] (index r holds db)
// ---------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
HYCAM_GLOBAL void cam_backward_cols_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ h_in,
                                         const scalar_t* __restrict__ a, const scalar_t* __restrict__ w,
                                         const scalar_t* __restrict__ B, const scalar_t* __restrict__ b,
                                         const scalar_t* __restrict__ g, acc_t* __restrict__ pB, int64_t T,
                                         int64_t d, int64_t K, int64_t r, acc_t s, int64_t placement,
                                         int64_t per_split, int64_t tile) {
  HYCAM_DYNAMIC_SMEM(smem_raw);
  const int64_t R1 = r + 1;
  acc_t* acc = reinterpret_cast<acc_t*>(smem_raw);  // [R1, blockDim.x]: column tid is this thread's
  acc_t* ws = acc + R1 * blockDim.x;                  // [tile, r]  w[t, k, :]
  acc_t* gs = ws + tile * r;                          // [tile]     g[t, k]
  const int64_t k = blockIdx.z, split = blockIdx.y;
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t i = 0; i < R1; ++i) acc[i * blockDim.x + threadIdx.x] = 0;
  const int64_t ts0 = split * per_split, ts1 = min(T, ts0 + per_split);
  const acc_t bias = (b && j < d) ? static_cast<acc_t>(cuda::ld(b + k * d + j)) : acc_t(0);
  for (int64_t t0 = ts0; t0 < ts1; t0 += tile) {
    const int64_t nt = min(tile, ts1 - t0);
    __syncthreads();
    for (int64_t q = threadIdx.x; q < nt * r; q += blockDim.x) {
      const int64_t tt = q / r, i = q % r;
      ws[q] = static_cast<acc_t>(cuda::ld(w + idx_tkr(t0 + tt, k, i, K, r)));
    }
    for (int64_t q = threadIdx.x; q < nt; q += blockDim.x) gs[q] = static_cast<acc_t>(cuda::ld(g + (t0 + q) * K + k));
    __syncthreads();
    if (j >= d) continue;
    for (int64_t tt = 0; tt < nt; ++tt) {
      const acc_t gk = gs[tt];
      if (gk == acc_t(0)) continue;  // hard routing: only tokens routed to k contribute
      const int64_t e = idx_td(t0 + tt, j, d);
      const acc_t av = a ? static_cast<acc_t>(cuda::ld(a + e)) : acc_t(0);
      const acc_t gc =
          gate_grad(placement, static_cast<acc_t>(cuda::ld(go + e)), static_cast<acc_t>(cuda::ld(h_in + e)), av);
      cuda::will_load(B + idx_kdr(k, j, 0, d, r), r);
      const acc_t u = expand_channel<scalar_t, acc_t>(B + idx_kdr(k, j, 0, d, r), ws + tt * r, bias, r);
      const acc_t du = specialist_grad(gc, gk, s, u);
      for (int64_t i = 0; i < r; ++i) acc[i * blockDim.x + threadIdx.x] += du * ws[tt * r + i];
      acc[r * blockDim.x + threadIdx.x] += du;
    }
  }
  if (j >= d) return;
  acc_t* dst = pB + ((split * K + k) * d + j) * R1;
  for (int64_t i = 0; i < R1; ++i) cuda::st(dst + i, acc[i * blockDim.x + threadIdx.x]);
}

// ---------------------------------------------------------------------------------------
// launch configurations (host side; shared with the emulation test)
// ---------------------------------------------------------------------------------------
struct CamForwardConfig {
  int64_t tile;
  size_t smem;
  dim3 grid, block;
};

inline CamForwardConfig cam_forward_config(int64_t T, int64_t d, int64_t K, int64_t r, size_t acc_bytes) {
  CamForwardConfig c;
  c.tile = cuda::tile_for((K * r + K) * acc_bytes, 32 * 1024, 16);
  c.smem = c.tile * (K * r + K) * acc_bytes;
  c.grid = dim3(cuda::ceil_div(T, c.tile), cuda::ceil_div(d, kFwdThreads));
  c.block = dim3(kFwdThreads);
  return c;
}

struct CamBackwardConfig {
  int64_t nJ, tile, nCol, col_tile, S, per_split;
  size_t smem_rows, smem_cols;
  dim3 grid_rows, block_rows, grid_cols, block_cols;
};

// prow [nJ, T, K, r + 1] and pB [S, K, d, r + 1] are the partial buffers of the two kernels.
inline CamBackwardConfig cam_backward_config(int64_t T, int64_t d, int64_t K, int64_t r, size_t acc_bytes,
                                             int64_t num_sms) {
  CamBackwardConfig c;
  const int64_t R1 = r + 1, nwarps = kRowThreads / 32;
  c.nJ = cuda::ceil_div(d, static_cast<int64_t>(kRowThreads) * kChanPerThread);
  const int64_t per_token = (K * r + K + nwarps * K * R1) * acc_bytes;
  c.tile = cuda::tile_for(per_token, 40 * 1024, 8);
  c.smem_rows = c.tile * per_token;
  c.grid_rows = dim3(cuda::ceil_div(T, c.tile), c.nJ);
  c.block_rows = dim3(kRowThreads);
  c.nCol = cuda::ceil_div(d, kColThreads);
  c.col_tile = 32;
  int64_t S = cuda::ceil_div(4 * num_sms, c.nCol * K > 0 ? c.nCol * K : 1);
  S = S < 16 ? S : 16;
  const int64_t tiles = cuda::ceil_div(T, c.col_tile);
  S = S < tiles ? S : tiles;
  c.S = S > 1 ? S : 1;
  c.per_split = cuda::ceil_div(T, c.S);
  c.smem_cols = (R1 * kColThreads + c.col_tile * r + c.col_tile) * acc_bytes;
  c.grid_cols = dim3(c.nCol, c.S, K);
  c.block_cols = dim3(kColThreads);
  return c;
}

}  // namespace cam_kernels
}  // namespace hycam
