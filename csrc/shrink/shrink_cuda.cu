// Grouped specialist GEMMs on CUDA, twin of shrink_cpu.cpp. All K specialists are one
// [K*r, d] weight, so the shrink reads x once as a shared-memory tiled GEMM; the backward's
// reductions over tokens write per-split partials summed in a fixed order (no atomics); split
// counts depend on the shape only, so results are the same on every GPU model.
// half/bfloat16 on sm_80+ use the tensor-core kernels (*_tc_kernel) for the three [T, d] GEMMs
// (x -> p, dp -> dx, dp -> dA); float/double, older GPUs and HYCAM_TENSOR_CORES=0 use the
// CUDA-core tiles.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstdlib>
#include <string>
#include <type_traits>

#include "../common/cuda_utils.cuh"
#include "../kernels.h"
#include "shrink_kernels.cuh"

namespace hycam {

using namespace shrink_kernels;

namespace {

// half/bfloat16 on sm_80+, unless HYCAM_TENSOR_CORES=0 (read on every call, so that tests can
// compare both paths in one process).
bool use_tensor_cores(at::ScalarType st) {
  if (st != at::kHalf && st != at::kBFloat16) return false;
  const char* v = std::getenv("HYCAM_TENSOR_CORES");
  if (v != nullptr && std::string(v) == "0") return false;
  return at::cuda::getCurrentDeviceProperties()->major >= 8;
}

template <typename M, typename S>
Operand<M> operand(const S* p, int64_t ld) {
  return make_operand(reinterpret_cast<const M*>(p), ld);
}

// Tensor-core launches, templates of the torch dtype S so that `if constexpr` drops them for
// float/double (only reached when use_tensor_cores(dtype)).
template <typename S>
void launch_shrink_tc(const S* x, const S* A, const S* ab, S* p, float* part, const ShrinkSplitK& sk, int64_t T,
                      int64_t d, int64_t KR, cudaStream_t stream) {
  using M = typename cuda::MmaType<S>::type;
  if constexpr (!std::is_void_v<M>) {
    const dim3 grid(cuda::ceil_div(T, kMM), cuda::ceil_div(KR, kMN), sk.SK);
    shrink_tc_kernel<M><<<grid, kMThreads, 0, stream>>>(operand<M>(x, d), operand<M>(A, d), part, T, d, KR,
                                                        sk.per_split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    shrink_finish_kernel<M><<<cuda::grid_1d(T * KR), 256, 0, stream>>>(part, sk.SK, reinterpret_cast<const M*>(ab),
                                                                 reinterpret_cast<M*>(p), T * KR, KR);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    TORCH_INTERNAL_ASSERT(false, "hycam: no tensor-core shrink for this dtype");
  }
}

template <typename S>
void launch_shrink_backward_tc(const S* dp_lo, const S* x, const S* A, S* dx, float* pA, int64_t T, int64_t d,
                               int64_t KR, const ShrinkBackwardConfig& cfg, cudaStream_t stream) {
  using M = typename cuda::MmaType<S>::type;
  if constexpr (!std::is_void_v<M>) {
    const auto dpo = operand<M>(dp_lo, KR);
    dx_tc_kernel<M><<<dim3(cuda::ceil_div(T, kMM), cfg.nJ), kMThreads, 0, stream>>>(
        dpo, operand<M>(A, d), reinterpret_cast<M*>(dx), T, d, KR);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dA_tc_kernel<M><<<dim3(cfg.nO, cfg.nJ, cfg.S), kMThreads, 0, stream>>>(dpo, operand<M>(x, d), pA, T, d, KR,
                                                                          cfg.per_split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    TORCH_INTERNAL_ASSERT(false, "hycam: no tensor-core shrink backward for this dtype");
  }
}

}  // namespace

ShrinkOut shrink_cuda(const ShrinkArgs& args) {
  const at::Tensor &x = args.x, &A = args.A, &N = args.N;
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = args.T, d = args.d, K = args.K, r = args.r, KR = K * r;
  auto p = at::empty({T, K, r}, x.options());
  auto w = at::empty({T, K, r}, x.options());
  if (T == 0) return {p, w};
  // grid.y counts output tiles of kMN (tensor cores) or kTN columns: both 64
  TORCH_CHECK_VALUE(cuda::ceil_div(KR, kTN) <= 65535, "hycam.shrink: num_specialists * rank = ", KR,
                    " needs more than 65535 tiles of ", kTN, " outputs; reduce rank or num_specialists");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hycam_shrink_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ab = data_or_null<scalar_t>(args.A_bias);
    const scalar_t* nb = data_or_null<scalar_t>(args.N_bias);
    if (use_tensor_cores(x.scalar_type())) {
      const auto sk = shrink_split_k(d);
      auto part = at::empty({sk.SK, T, KR}, x.options().dtype(at::kFloat));
      launch_shrink_tc<scalar_t>(x.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), ab, p.data_ptr<scalar_t>(),
                                 part.data_ptr<float>(), sk, T, d, KR, stream);
    } else {
      const dim3 grid(cuda::ceil_div(T, kTM), cuda::ceil_div(KR, kTN));
      shrink_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                                                                    ab, p.data_ptr<scalar_t>(), T, d, KR);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    mix_kernel<scalar_t, acc_t><<<cuda::grid_1d(T * KR), 256, 0, stream>>>(
        p.data_ptr<scalar_t>(), N.data_ptr<scalar_t>(), nb, w.data_ptr<scalar_t>(), T, K, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {p, w};
}

ShrinkBackwardOut shrink_backward_cuda(const ShrinkBackwardArgs& args) {
  const at::Tensor &dw = args.dw, &x = args.x, &p = args.p, &A = args.A, &N = args.N;
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = args.T, d = args.d, K = args.K, r = args.r, KR = K * r;
  if (T == 0) {
    return {at::zeros_like(x), at::zeros_like(A), at::zeros({K, r}, A.options()), at::zeros_like(N),
            at::zeros({K, r}, N.options())};
  }
  // grid.y of dx / dA counts tiles of kTN channels
  TORCH_CHECK_VALUE(cuda::ceil_div(d, kTN) <= 65535, "hycam.shrink_backward: hidden size ", d,
                    " needs more than 65535 tiles of ", kTN, " channels; reduce the hidden size");
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto dx = at::empty_like(x);
  auto dp = at::empty({T, KR}, x.options().dtype(acc_type));
  const bool tc = use_tensor_cores(x.scalar_type());
  const auto cfg = shrink_backward_config(T, d, K, r, tc);
  const int64_t nO = cfg.nO, nJ = cfg.nJ, S = cfg.S, per_split = cfg.per_split, nq = cfg.nq;
  auto pA = at::empty({S, KR, d}, x.options().dtype(acc_type));
  auto pSmall = at::empty({cfg.S_small, nq}, x.options().dtype(acc_type));
  auto dp_lo = tc ? at::empty({T, KR}, x.options()) : at::Tensor();  // dp rounded for the tensor cores
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hycam_shrink_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dp_kernel<scalar_t, acc_t><<<cuda::grid_1d(T * KR), 256, 0, stream>>>(
        dw.data_ptr<scalar_t>(), N.data_ptr<scalar_t>(), dp.data_ptr<acc_t>(),
        tc ? dp_lo.data_ptr<scalar_t>() : nullptr, T, K, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (d > 0) {  // d == 0: dx and dA are empty (a grid dimension of 0 is invalid)
      if (tc) {
        launch_shrink_backward_tc<scalar_t>(dp_lo.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                            A.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), pA.data_ptr<float>(), T,
                                            d, KR, cfg, stream);
      } else {
        dx_kernel<scalar_t, acc_t><<<dim3(cuda::ceil_div(T, kTM), nJ), kThreads, 0, stream>>>(
            dp.data_ptr<acc_t>(), A.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), T, d, KR);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        dA_kernel<scalar_t, acc_t><<<dim3(nO, nJ, S), kThreads, 0, stream>>>(
            dp.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), pA.data_ptr<acc_t>(), T, d, KR, per_split);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    small_reductions_kernel<scalar_t, acc_t><<<dim3(cuda::ceil_div(nq, 256), cfg.S_small), 256, 0, stream>>>(
        dp.data_ptr<acc_t>(), dw.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), pSmall.data_ptr<acc_t>(), T, K, r,
        cfg.per_small);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto dA = fresh(cuda::sum_partials(pA).view({K, r, d}), A.scalar_type());
  auto small = cuda::sum_partials(pSmall);
  auto dAb = fresh(small.narrow(0, 0, KR).view({K, r}), A.scalar_type());
  auto dN = fresh(small.narrow(0, KR, K * r * r).view({K, r, r}), N.scalar_type());
  auto dNb = fresh(small.narrow(0, KR + K * r * r, KR).view({K, r}), N.scalar_type());
  return {dx, dA, dAb, dN, dNb};
}

}  // namespace hycam
