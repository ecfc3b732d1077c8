// Grouped specialist GEMMs on CUDA, twin of shrink_cpu.cpp. All K specialists are one
// [K*r, d] weight, so the shrink reads x once as a shared-memory tiled GEMM; the backward's
// reductions over tokens write per-split partials summed in a fixed order (no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../common/cuda_utils.cuh"
#include "../common/hycam_math.h"
#include "../kernels.h"

namespace hycam {
namespace {

constexpr int kThreads = 256;  // all tiled kernels: 16 x 16 threads
constexpr int kTM = 32;        // rows (tokens or outputs) per tile
constexpr int kTN = 64;        // columns (outputs or channels) per tile
constexpr int kTK = 32;        // reduction depth per shared-memory stage

// C[m, n] = sum_q L(m, q) * R(q, n) for one [kTM, kTN] tile, L and R loaded through functors
// that return 0 out of range. Thread (ty, tx) owns rows ty + 16 * a (a < 2), cols tx + 16 * c (c < 4).
// kRByQ: R is stored with q contiguous (R(q, n) = base[n * ld + q]): consecutive threads then load
// consecutive q so that the global loads coalesce.
template <typename acc_t, bool kRByQ = false, typename LoadL, typename LoadR>
__device__ __forceinline__ void tile_gemm(int64_t m0, int64_t n0, int64_t q_begin, int64_t q_end, LoadL loadL,
                                          LoadR loadR, acc_t (&acc)[2][4]) {
  __shared__ acc_t Ls[kTM][kTK + 1];
  __shared__ acc_t Rs[kTK][kTN + 1];
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
__global__ void shrink_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ A,
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
__global__ void mix_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ N,
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
__global__ void dp_kernel(const scalar_t* __restrict__ dw, const scalar_t* __restrict__ N, acc_t* __restrict__ dp,
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
__global__ void dx_kernel(const acc_t* __restrict__ dp, const scalar_t* __restrict__ A, scalar_t* __restrict__ dx,
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
__global__ void dA_kernel(const acc_t* __restrict__ dp, const scalar_t* __restrict__ x, acc_t* __restrict__ part,
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
__global__ void small_reductions_kernel(const acc_t* __restrict__ dp, const scalar_t* __restrict__ dw,
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

inline int64_t grid_1d(int64_t n) { return std::max<int64_t>(1, std::min<int64_t>(cuda::ceil_div(n, 256), 65535)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> shrink_cuda(const at::Tensor& x, const at::Tensor& A, const OptTensor& A_bias,
                                               const at::Tensor& N, const OptTensor& N_bias) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), d = x.size(1), K = A.size(0), r = A.size(1), KR = K * r;
  auto p = at::empty({T, K, r}, x.options());
  auto w = at::empty({T, K, r}, x.options());
  if (T == 0) return {p, w};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hycam_shrink_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ab = (A_bias.has_value() && A_bias->defined()) ? A_bias->data_ptr<scalar_t>() : nullptr;
    const scalar_t* nb = (N_bias.has_value() && N_bias->defined()) ? N_bias->data_ptr<scalar_t>() : nullptr;
    const dim3 grid(cuda::ceil_div(T, kTM), cuda::ceil_div(KR, kTN));
    shrink_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), ab,
                                                                  p.data_ptr<scalar_t>(), T, d, KR);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mix_kernel<scalar_t, acc_t><<<grid_1d(T * KR), 256, 0, stream>>>(p.data_ptr<scalar_t>(), N.data_ptr<scalar_t>(),
                                                                     nb, w.data_ptr<scalar_t>(), T, K, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {p, w};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shrink_backward_cuda(
    const at::Tensor& dw, const at::Tensor& x, const at::Tensor& p, const at::Tensor& A, const at::Tensor& N) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), d = x.size(1), K = A.size(0), r = A.size(1), KR = K * r;
  if (T == 0) {
    return {at::zeros_like(x), at::zeros_like(A), at::zeros({K, r}, A.options()), at::zeros_like(N),
            at::zeros({K, r}, N.options())};
  }
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto dx = at::empty_like(x);
  auto dp = at::empty({T, KR}, x.options().dtype(acc_type));
  const int64_t nO = cuda::ceil_div(KR, kTM), nJ = cuda::ceil_div(d, kTN);
  const int64_t S = std::max<int64_t>(1, std::min<int64_t>({cuda::ceil_div(2 * cuda::num_sms(),
                                                                            std::max<int64_t>(1, nO * nJ)),
                                                             32, cuda::ceil_div(T, kTK)}));
  const int64_t per_split = cuda::ceil_div(T, S);
  const int64_t nq = 2 * KR + K * r * r;
  auto pA = at::empty({S, KR, d}, x.options().dtype(acc_type));
  auto pSmall = at::empty({S, nq}, x.options().dtype(acc_type));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hycam_shrink_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dp_kernel<scalar_t, acc_t><<<grid_1d(T * KR), 256, 0, stream>>>(dw.data_ptr<scalar_t>(), N.data_ptr<scalar_t>(),
                                                                    dp.data_ptr<acc_t>(), T, K, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (d > 0) {  // d == 0: dx and dA are empty (a grid dimension of 0 is invalid)
      dx_kernel<scalar_t, acc_t><<<dim3(cuda::ceil_div(T, kTM), nJ), kThreads, 0, stream>>>(
          dp.data_ptr<acc_t>(), A.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), T, d, KR);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dA_kernel<scalar_t, acc_t><<<dim3(nO, nJ, S), kThreads, 0, stream>>>(
          dp.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), pA.data_ptr<acc_t>(), T, d, KR, per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    small_reductions_kernel<scalar_t, acc_t><<<dim3(cuda::ceil_div(nq, 256), S), 256, 0, stream>>>(
        dp.data_ptr<acc_t>(), dw.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), pSmall.data_ptr<acc_t>(), T, K, r,
        per_split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // every output its own tensor: .to() of the same dtype would return views of one buffer
  auto fresh = [](const at::Tensor& t, at::ScalarType st) {
    return t.to(st, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
  };
  auto dA = fresh(cuda::sum_partials(pA).view({K, r, d}), A.scalar_type());
  auto small = cuda::sum_partials(pSmall);
  auto dAb = fresh(small.narrow(0, 0, KR).view({K, r}), A.scalar_type());
  auto dN = fresh(small.narrow(0, KR, K * r * r).view({K, r, r}), N.scalar_type());
  auto dNb = fresh(small.narrow(0, KR + K * r * r, KR).view({K, r}), N.scalar_type());
  return {dx, dA, dAb, dN, dNb};
}

}  // namespace hycam
