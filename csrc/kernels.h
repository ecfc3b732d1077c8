// Declarations of the device implementations behind the ops of csrc/api.cpp. Every argument
// has been checked there (shapes, dtypes, devices, contiguity); implementations may assume it.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <string>
#include <tuple>
#include <vector>

namespace hycam {

using OptTensor = c10::optional<at::Tensor>;

// The CPU implementations, one set per instruction-set variant (csrc/cpu/isa.h), with these types:
// p, w [T, K, r]
using ShrinkFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& x, const at::Tensor& A, const OptTensor& A_bias,
                                                    const at::Tensor& N, const OptTensor& N_bias);
// dx [T, d], dA [K, r, d], dA_bias [K, r], dN [K, r, r], dN_bias [K, r]
using ShrinkBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& dw, const at::Tensor& x, const at::Tensor& p, const at::Tensor& A, const at::Tensor& N);
// z_bias [d] (optional): c = 1 + silu(z + z_bias) + ...
using CamForwardFn = at::Tensor(const at::Tensor& h_in, const OptTensor& a, const at::Tensor& z, const at::Tensor& w,
                                const at::Tensor& B, const OptTensor& b, const at::Tensor& g, double scale,
                                int64_t placement, const OptTensor& z_bias);
// d_main [T, d], dz [T, d], dg [T, K], dw [T, K, r], dB [K, d, r], db [K, d], dz_bias [d] = sum_t dz
// (an empty tensor when z_bias is absent)
using CamBackwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using CamBackwardFn = CamBackwardOut(const at::Tensor& go, const at::Tensor& h_in, const OptTensor& a,
                                     const at::Tensor& z, const at::Tensor& w, const at::Tensor& B,
                                     const OptTensor& b, const at::Tensor& g, double scale, int64_t placement,
                                     const OptTensor& z_bias);

struct CpuKernels {
  const char* isa;  // the variant's name: "baseline", "avx2"
  ShrinkFn* shrink;
  ShrinkBackwardFn* shrink_backward;
  CamForwardFn* cam_forward;
  CamBackwardFn* cam_backward;
};

// The variant that runs tensors of `dtype` in this process (csrc/cpu/dispatch_cpu.cpp).
const CpuKernels& cpu_kernels(at::ScalarType dtype);
// The instruction-set variants this binary holds, best last ("baseline", then "avx2" where built).
std::vector<std::string> cpu_isa_variants();

#ifdef HYCAM_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> shrink_cuda(const at::Tensor& x, const at::Tensor& A, const OptTensor& A_bias,
                                               const at::Tensor& N, const OptTensor& N_bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shrink_backward_cuda(
    const at::Tensor& dw, const at::Tensor& x, const at::Tensor& p, const at::Tensor& A, const at::Tensor& N);
CamForwardFn cam_forward_cuda;
CamBackwardFn cam_backward_cuda;
#endif

}  // namespace hycam
