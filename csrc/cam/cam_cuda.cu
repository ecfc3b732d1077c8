// Fused CAM forward/backward on CUDA. Structural twin of cam_cpu.cpp: the element maths is
// csrc/common/hycam_math.h; here a thread owns one channel j of a tile of tokens, and the
// per-token reductions over channels (dg, dw) go through warp shuffles and shared memory
// in a fixed order. No atomics anywhere: results are bitwise reproducible run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../common/cuda_utils.cuh"
#include "../common/hycam_math.h"
#include "../kernels.h"

namespace hycam {
namespace {

constexpr int kFwdThreads = 256;    // channels per forward block
constexpr int kRowThreads = 256;    // threads of the backward row kernel
constexpr int kChanPerThread = 4;   // channels per thread in the backward row kernel
constexpr int kColThreads = 128;    // channels per dB block

template <typename scalar_t>
const scalar_t* opt_ptr(const OptTensor& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<scalar_t>() : nullptr;
}

// Tokens per tile so that the staged [tile, K, per_token] values fit in `budget` bytes.
inline int64_t tile_for(int64_t per_token_bytes, int64_t budget, int64_t max_tile) {
  return std::max<int64_t>(1, std::min<int64_t>(max_tile, budget / std::max<int64_t>(per_token_bytes, 1)));
}

// ---------------------------------------------------------------------------------------
// forward: grid (token tiles, channel blocks); w and g of the tile staged in shared memory
// ---------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void cam_forward_kernel(const scalar_t* __restrict__ h_in, const scalar_t* __restrict__ a,
                                   const scalar_t* __restrict__ z, const scalar_t* __restrict__ w,
                                   const scalar_t* __restrict__ B, const scalar_t* __restrict__ b,
                                   const scalar_t* __restrict__ g, scalar_t* __restrict__ out, int64_t T, int64_t d,
                                   int64_t K, int64_t r, acc_t s, int64_t placement, int64_t tile) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* ws = reinterpret_cast<acc_t*>(smem_raw);  // [tile, K, r]
  acc_t* gs = ws + tile * K * r;                   // [tile, K]
  const int64_t t0 = blockIdx.x * tile;
  const int64_t nt = min(tile, T - t0);
  for (int64_t q = threadIdx.x; q < nt * K * r; q += blockDim.x) ws[q] = static_cast<acc_t>(w[t0 * K * r + q]);
  for (int64_t q = threadIdx.x; q < nt * K; q += blockDim.x) gs[q] = static_cast<acc_t>(g[t0 * K + q]);
  __syncthreads();
  const int64_t j = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= d) return;
  for (int64_t tt = 0; tt < nt; ++tt) {
    acc_t spec = 0;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t gk = gs[tt * K + k];
      if (gk == acc_t(0)) continue;  // hard routing: only the routed specialist
      const acc_t bias = b ? static_cast<acc_t>(b[k * d + j]) : acc_t(0);
      const acc_t u = expand_channel<scalar_t, acc_t>(B + idx_kdr(k, j, 0, d, r), ws + (tt * K + k) * r, bias, r);
      spec += gk * silu(s * u);
    }
    const int64_t e = idx_td(t0 + tt, j, d);
    const acc_t c = cam_value(static_cast<acc_t>(z[e]), spec);
    const acc_t av = a ? static_cast<acc_t>(a[e]) : acc_t(0);
    out[e] = static_cast<scalar_t>(modulate(placement, static_cast<acc_t>(h_in[e]), av, c));
  }
}

// ---------------------------------------------------------------------------------------
// backward, rows: d_main, dz (elementwise) and per-channel-block partials of dg and dw
// (reductions over channels) -> prow [nJ, T, K, r + 1] (index r holds dg)
// ---------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void cam_backward_rows_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ h_in,
                                         const scalar_t* __restrict__ a, const scalar_t* __restrict__ z,
                                         const scalar_t* __restrict__ w, const scalar_t* __restrict__ B,
                                         const scalar_t* __restrict__ b, const scalar_t* __restrict__ g,
                                         scalar_t* __restrict__ d_main, scalar_t* __restrict__ dz,
                                         acc_t* __restrict__ prow, int64_t T, int64_t d, int64_t K, int64_t r, acc_t s,
                                         int64_t placement, int64_t tile) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t R1 = r + 1;
  const int nwarps = blockDim.x / 32, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  acc_t* ws = reinterpret_cast<acc_t*>(smem_raw);  // [tile, K, r]
  acc_t* gs = ws + tile * K * r;                   // [tile, K]
  acc_t* red = gs + tile * K;                      // [nwarps, tile, K, R1]
  const int64_t t0 = blockIdx.x * tile;
  const int64_t nt = min(tile, T - t0);
  for (int64_t q = threadIdx.x; q < nt * K * r; q += blockDim.x) ws[q] = static_cast<acc_t>(w[t0 * K * r + q]);
  for (int64_t q = threadIdx.x; q < nt * K; q += blockDim.x) gs[q] = static_cast<acc_t>(g[t0 * K + q]);
  __syncthreads();
  const int64_t jbase = blockIdx.y * static_cast<int64_t>(blockDim.x) * kChanPerThread + threadIdx.x;

  for (int64_t tt = 0; tt < nt; ++tt) {
    const int64_t t = t0 + tt;
    acc_t gcv[kChanPerThread];
#pragma unroll
    for (int c = 0; c < kChanPerThread; ++c) {
      const int64_t j = jbase + static_cast<int64_t>(c) * blockDim.x;
      gcv[c] = 0;
      if (j < d) {
        acc_t spec = 0;
        for (int64_t k = 0; k < K; ++k) {
          const acc_t gk = gs[tt * K + k];
          if (gk == acc_t(0)) continue;
          const acc_t bias = b ? static_cast<acc_t>(b[k * d + j]) : acc_t(0);
          spec += gk * silu(s * expand_channel<scalar_t, acc_t>(B + idx_kdr(k, j, 0, d, r), ws + (tt * K + k) * r,
                                                                 bias, r));
        }
        const int64_t e = idx_td(t, j, d);
        const acc_t zv = static_cast<acc_t>(z[e]);
        const acc_t gov = static_cast<acc_t>(go[e]);
        const acc_t av = a ? static_cast<acc_t>(a[e]) : acc_t(0);
        gcv[c] = gate_grad(placement, gov, static_cast<acc_t>(h_in[e]), av);
        d_main[e] = static_cast<scalar_t>(gov * cam_value(zv, spec));
        dz[e] = static_cast<scalar_t>(gcv[c] * silu_grad(zv));
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
          const acc_t bias = b ? static_cast<acc_t>(b[k * d + j]) : acc_t(0);
          const acc_t u = expand_channel<scalar_t, acc_t>(B + idx_kdr(k, j, 0, d, r), ws + (tt * K + k) * r, bias, r);
          pdg += gcv[c] * silu(s * u);
          if (gk != acc_t(0)) duv[c] = specialist_grad(gcv[c], gk, s, u);
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
            if (j < d) v += duv[c] * static_cast<acc_t>(B[idx_kdr(k, j, i, d, r)]);
          }
          v = cuda::warp_sum(v);
        }
        if (lane == 0) slot[i] = v;
      }
    }
  }
  __syncthreads();
  const int64_t per_warp = tile * K * R1;
  acc_t* dst = prow + (static_cast<int64_t>(blockIdx.y) * T + t0) * K * R1;
  for (int64_t q = threadIdx.x; q < nt * K * R1; q += blockDim.x) {
    acc_t v = 0;
    for (int wi = 0; wi < nwarps; ++wi) v += red[wi * per_warp + q];  // fixed order
    dst[q] = v;
  }
}

// ---------------------------------------------------------------------------------------
// backward, columns: per-split partials of dB_k[j, :] and db_k[j] (reductions over tokens)
// grid (channel blocks, token splits, K) -> pB [S, K, d, r + 1] (index r holds db)
// ---------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void cam_backward_cols_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ h_in,
                                         const scalar_t* __restrict__ a, const scalar_t* __restrict__ w,
                                         const scalar_t* __restrict__ B, const scalar_t* __restrict__ b,
                                         const scalar_t* __restrict__ g, acc_t* __restrict__ pB, int64_t T,
                                         int64_t d, int64_t K, int64_t r, acc_t s, int64_t placement,
                                         int64_t per_split, int64_t tile) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t R1 = r + 1;
  acc_t* acc = reinterpret_cast<acc_t*>(smem_raw);  // [R1, blockDim.x]: column tid is this thread's
  acc_t* ws = acc + R1 * blockDim.x;                  // [tile, r]  w[t, k, :]
  acc_t* gs = ws + tile * r;                          // [tile]     g[t, k]
  const int64_t k = blockIdx.z, split = blockIdx.y;
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t i = 0; i < R1; ++i) acc[i * blockDim.x + threadIdx.x] = 0;
  const int64_t ts0 = split * per_split, ts1 = min(T, ts0 + per_split);
  const acc_t bias = (b && j < d) ? static_cast<acc_t>(b[k * d + j]) : acc_t(0);
  for (int64_t t0 = ts0; t0 < ts1; t0 += tile) {
    const int64_t nt = min(tile, ts1 - t0);
    __syncthreads();
    for (int64_t q = threadIdx.x; q < nt * r; q += blockDim.x) {
      const int64_t tt = q / r, i = q % r;
      ws[q] = static_cast<acc_t>(w[idx_tkr(t0 + tt, k, i, K, r)]);
    }
    for (int64_t q = threadIdx.x; q < nt; q += blockDim.x) gs[q] = static_cast<acc_t>(g[(t0 + q) * K + k]);
    __syncthreads();
    if (j >= d) continue;
    for (int64_t tt = 0; tt < nt; ++tt) {
      const acc_t gk = gs[tt];
      if (gk == acc_t(0)) continue;  // hard routing: only tokens routed to k contribute
      const int64_t e = idx_td(t0 + tt, j, d);
      const acc_t av = a ? static_cast<acc_t>(a[e]) : acc_t(0);
      const acc_t gc = gate_grad(placement, static_cast<acc_t>(go[e]), static_cast<acc_t>(h_in[e]), av);
      const acc_t u = expand_channel<scalar_t, acc_t>(B + idx_kdr(k, j, 0, d, r), ws + tt * r, bias, r);
      const acc_t du = specialist_grad(gc, gk, s, u);
      for (int64_t i = 0; i < r; ++i) acc[i * blockDim.x + threadIdx.x] += du * ws[tt * r + i];
      acc[r * blockDim.x + threadIdx.x] += du;
    }
  }
  if (j >= d) return;
  acc_t* dst = pB + ((split * K + k) * d + j) * R1;
  for (int64_t i = 0; i < R1; ++i) dst[i] = acc[i * blockDim.x + threadIdx.x];
}

}  // namespace

at::Tensor cam_forward_cuda(const at::Tensor& h_in, const OptTensor& a, const at::Tensor& z, const at::Tensor& w,
                            const at::Tensor& B, const OptTensor& b, const at::Tensor& g, double scale,
                            int64_t placement) {
  c10::cuda::CUDAGuard guard(h_in.device());
  auto out = at::empty_like(h_in);
  const int64_t T = h_in.size(0), d = h_in.size(1), K = B.size(0), r = B.size(2);
  if (T == 0 || d == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_in.scalar_type(), "hycam_cam_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t tile = tile_for((K * r + K) * sizeof(acc_t), 32 * 1024, 16);
    const size_t smem = tile * (K * r + K) * sizeof(acc_t);
    auto kernel = cam_forward_kernel<scalar_t, acc_t>;
    cuda::set_smem(kernel, smem, "cam_forward");
    const dim3 grid(cuda::ceil_div(T, tile), cuda::ceil_div(d, kFwdThreads));
    TORCH_CHECK_VALUE(grid.y <= 65535, "hycam.cam_forward: hidden size ", d, " too large");
    kernel<<<grid, kFwdThreads, smem, stream>>>(h_in.data_ptr<scalar_t>(), opt_ptr<scalar_t>(a),
                                                z.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                                B.data_ptr<scalar_t>(), opt_ptr<scalar_t>(b), g.data_ptr<scalar_t>(),
                                                out.data_ptr<scalar_t>(), T, d, K, r, static_cast<acc_t>(scale),
                                                placement, tile);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cam_backward_cuda(
    const at::Tensor& go, const at::Tensor& h_in, const OptTensor& a, const at::Tensor& z, const at::Tensor& w,
    const at::Tensor& B, const OptTensor& b, const at::Tensor& g, double scale, int64_t placement) {
  c10::cuda::CUDAGuard guard(h_in.device());
  const int64_t T = h_in.size(0), d = h_in.size(1), K = B.size(0), r = B.size(2), R1 = r + 1;
  auto d_main = at::empty_like(h_in);
  auto dz = at::empty_like(z);
  if (T == 0 || d == 0) {
    return {d_main, dz, at::zeros_like(g), at::zeros_like(w), at::zeros_like(B), at::zeros({K, d}, B.options())};
  }
  const auto acc_type = h_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t nJ = cuda::ceil_div(d, static_cast<int64_t>(kRowThreads) * kChanPerThread);
  auto prow = at::empty({nJ, T, K, R1}, h_in.options().dtype(acc_type));
  const int64_t nCol = cuda::ceil_div(d, kColThreads);
  const int64_t col_tile = 32;
  const int64_t S = std::max<int64_t>(1, std::min<int64_t>({cuda::ceil_div(4 * cuda::num_sms(), nCol * K), 16,
                                                             cuda::ceil_div(T, col_tile)}));
  const int64_t per_split = cuda::ceil_div(T, S);
  auto pB = at::empty({S, K, d, R1}, h_in.options().dtype(acc_type));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_in.scalar_type(), "hycam_cam_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int nwarps = kRowThreads / 32;
    const int64_t per_token = (K * r + K + nwarps * K * R1) * sizeof(acc_t);
    const int64_t tile = tile_for(per_token, 40 * 1024, 8);
    const size_t smem_rows = tile * per_token;
    auto rows = cam_backward_rows_kernel<scalar_t, acc_t>;
    cuda::set_smem(rows, smem_rows, "cam_backward");
    const dim3 grid_rows(cuda::ceil_div(T, tile), nJ);
    rows<<<grid_rows, kRowThreads, smem_rows, stream>>>(
        go.data_ptr<scalar_t>(), h_in.data_ptr<scalar_t>(), opt_ptr<scalar_t>(a), z.data_ptr<scalar_t>(),
        w.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(), opt_ptr<scalar_t>(b), g.data_ptr<scalar_t>(),
        d_main.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(), prow.data_ptr<acc_t>(), T, d, K, r,
        static_cast<acc_t>(scale), placement, tile);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const size_t smem_cols = (R1 * kColThreads + col_tile * r + col_tile) * sizeof(acc_t);
    auto cols = cam_backward_cols_kernel<scalar_t, acc_t>;
    cuda::set_smem(cols, smem_cols, "cam_backward");
    const dim3 grid_cols(nCol, S, K);
    cols<<<grid_cols, kColThreads, smem_cols, stream>>>(
        go.data_ptr<scalar_t>(), h_in.data_ptr<scalar_t>(), opt_ptr<scalar_t>(a), w.data_ptr<scalar_t>(),
        B.data_ptr<scalar_t>(), opt_ptr<scalar_t>(b), g.data_ptr<scalar_t>(), pB.data_ptr<acc_t>(), T, d, K, r,
        static_cast<acc_t>(scale), placement, per_split, col_tile);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  auto rows_sum = cuda::sum_partials(prow);  // [T, K, R1]
  auto cols_sum = cuda::sum_partials(pB);    // [K, d, R1]
  // every output its own tensor: .to()/.contiguous() may otherwise return views of one buffer
  auto fresh = [](const at::Tensor& t, at::ScalarType st) {
    return t.to(st, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
  };
  auto dw = fresh(rows_sum.narrow(2, 0, r), w.scalar_type());
  auto dg = fresh(rows_sum.select(2, r), g.scalar_type());
  auto dB = fresh(cols_sum.narrow(2, 0, r), B.scalar_type());
  auto db = fresh(cols_sum.select(2, r), B.scalar_type());
  return {d_main, dz, dg, dw, dB, db};
}

}  // namespace hycam
