// Grouped specialist GEMMs on CUDA, twin of shrink_cpu.cpp. All K specialists are one
// [K*r, d] weight, so the shrink reads x once as a shared-memory tiled GEMM; the backward's
// reductions over tokens write per-split partials summed in a fixed order (no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../common/cuda_utils.cuh"
#include "../kernels.h"
#include "shrink_kernels.cuh"

namespace hycam {

using namespace shrink_kernels;

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
  const auto cfg = shrink_backward_config(T, d, K, r, cuda::num_sms());
  const int64_t nO = cfg.nO, nJ = cfg.nJ, S = cfg.S, per_split = cfg.per_split, nq = cfg.nq;
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
