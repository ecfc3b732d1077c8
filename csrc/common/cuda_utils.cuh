// Host-side helpers of the CUDA launchers: deterministic partial-sum reduction, shared-memory
// opt-in. Device-side helpers: cuda_device.cuh.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_device.cuh"

namespace hycam {
namespace cuda {

// Sum a partial buffer [S, n...] over its first dimension (deterministically) on the current stream.
inline at::Tensor sum_partials(const at::Tensor& part) {
  const int64_t S = part.size(0), n = part.numel() / std::max<int64_t>(S, 1);
  auto out = at::empty(part.sizes().slice(1), part.options());
  if (n == 0) return out;
  if (S == 0) return out.zero_();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, threads), 65535);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(part.scalar_type(), "hycam_sum_partials", [&] {
    sum_partials_kernel<scalar_t><<<blocks, threads, 0, stream>>>(part.data_ptr<scalar_t>(), S, n,
                                                                  out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The wmma element type of a torch dtype (void: no tensor-core path).
template <typename S>
struct MmaType {
  using type = void;
};
template <>
struct MmaType<c10::Half> {
  using type = __half;
};
template <>
struct MmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// Dynamic shared memory above 48 KiB needs an opt-in per kernel; fail clearly past the device limit.
template <typename Kernel>
inline void set_smem(Kernel kernel, size_t bytes, const char* what) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK_VALUE(bytes <= static_cast<size_t>(optin), "hycam.", what, ": needs ", bytes,
                    " bytes of shared memory per block, more than this GPU offers (", optin,
                    "); reduce num_specialists * rank");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

}  // namespace cuda
}  // namespace hycam
