// The arguments of each op, and the device implementations behind the ops of csrc/api.cpp. api.cpp
// checks every argument (shapes, dtypes, devices), makes each tensor contiguous and fills the op's
// argument struct once; the CPU and CUDA implementations take that struct and may assume all of it.
// A new argument of an op is a field here, filled in api.cpp and read where it is used.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <string>
#include <tuple>
#include <vector>

#include "common/placement.h"

namespace hycam {

using OptTensor = c10::optional<at::Tensor>;

// An optional tensor argument: undefined when absent.
template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

// hycam.shrink: p = A x + A_bias, w = N p + N_bias for all K specialists.
struct ShrinkArgs {
  at::Tensor x;       // [T, d]
  at::Tensor A;       // [K, r, d]
  at::Tensor A_bias;  // [K, r] or undefined
  at::Tensor N;       // [K, r, r]
  at::Tensor N_bias;  // [K, r] or undefined
  int64_t T, d, K, r;
};
// p, w [T, K, r]
using ShrinkOut = std::tuple<at::Tensor, at::Tensor>;

// hycam.shrink_backward: the gradients of the shrink given dw.
struct ShrinkBackwardArgs {
  at::Tensor dw;  // [T, K, r]
  at::Tensor x;   // [T, d]
  at::Tensor p;   // [T, K, r], the forward's p
  at::Tensor A;   // [K, r, d]
  at::Tensor N;   // [K, r, r]
  int64_t T, d, K, r;
};
// dx [T, d], dA [K, r, d], dA_bias [K, r], dN [K, r, r], dN_bias [K, r]
using ShrinkBackwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// hycam.cam_forward: out = modulate(placement, h_in, a, c) with c = 1 + silu(z + z_bias) +
// sum_k g[t, k] silu(scale * u_k), u_k = B_k w[t, k] + b_k (docs/formulas.md).
struct CamArgs {
  at::Tensor h_in;    // [T, d]
  at::Tensor a;       // [T, d] or undefined (zeros); required by Placement::ATTENTION
  at::Tensor z;       // [T, d]
  at::Tensor z_bias;  // [d] or undefined
  at::Tensor w;       // [T, K, r]
  at::Tensor B;       // [K, d, r]
  at::Tensor b;       // [K, d] or undefined
  at::Tensor g;       // [T, K]
  double scale;
  Placement placement;
  int64_t T, d, K, r;
};
// hycam.cam_backward: the forward's arguments and the gradient of its output.
struct CamBackwardArgs : CamArgs {
  at::Tensor go;  // [T, d]
};
// d_main [T, d], dz [T, d], dg [T, K], dw [T, K, r], dB [K, d, r], db [K, d], dz_bias [d] = sum_t dz
// (an empty tensor when z_bias is absent)
using CamBackwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using ShrinkFn = ShrinkOut(const ShrinkArgs&);
using ShrinkBackwardFn = ShrinkBackwardOut(const ShrinkBackwardArgs&);
using CamForwardFn = at::Tensor(const CamArgs&);
using CamBackwardFn = CamBackwardOut(const CamBackwardArgs&);

// The CPU implementations, one set per instruction-set variant (csrc/cpu/isa.h).
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
ShrinkFn shrink_cuda;
ShrinkBackwardFn shrink_backward_cuda;
CamForwardFn cam_forward_cuda;
CamBackwardFn cam_backward_cuda;
#endif

// Every output its own tensor of dtype st, contiguous: .to() of the same dtype, or .contiguous(),
// may return a view of a buffer that another output shares.
inline at::Tensor fresh(const at::Tensor& t, at::ScalarType st) {
  return t.to(st, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
}

}  // namespace hycam
