// Fused CAM forward/backward on CUDA: host side (checks, launch configuration, partial sums).
// The kernels and their geometry are described in cam_kernels.cuh; the element maths is
// csrc/common/hycam_math.h, shared with cam_cpu.cpp. No atomics anywhere: results are bitwise
// reproducible run to run and across GPU models.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <type_traits>

#include "../common/cuda_utils.cuh"
#include "../kernels.h"
#include "cam_kernels.cuh"

namespace hycam {
namespace {

using namespace cam_kernels;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// z_bias is only [d]: a view off a 16-byte boundary (a flat parameter buffer) is copied rather
// than letting it turn off the 16-byte accesses of every [T, d] stream.
at::Tensor aligned_z_bias(const at::Tensor& z_bias) {
  if (z_bias.defined() && !aligned16(z_bias.data_ptr())) return z_bias.clone();
  return z_bias;
}

// The kernels' inputs (both kernels); the launchers add the outputs and the launch geometry.
template <typename scalar_t, typename acc_t>
CamParams<scalar_t, acc_t> kernel_inputs(const CamArgs& args, const at::Tensor& z_bias) {
  CamParams<scalar_t, acc_t> p;
  p.h_in = args.h_in.data_ptr<scalar_t>();
  p.a = data_or_null<scalar_t>(args.a);
  p.z = args.z.data_ptr<scalar_t>();
  p.z_bias = data_or_null<scalar_t>(z_bias);
  p.w = args.w.data_ptr<scalar_t>();
  p.B = args.B.data_ptr<scalar_t>();
  p.b = data_or_null<scalar_t>(args.b);
  p.g = args.g.data_ptr<scalar_t>();
  p.T = args.T;
  p.d = args.d;
  p.K = args.K;
  p.r = args.r;
  p.scale = static_cast<acc_t>(args.scale);
  p.placement = args.placement;
  return p;
}

void check_tiling(int64_t lpr, int64_t K, int64_t r, const char* op) {
  TORCH_CHECK_VALUE(lpr > 0, "hycam.", op, ": num_specialists * rank = ", K * r,
                    " (num_specialists ", K, ", rank ", r,
                    ") is too large for the CUDA CAM kernels, which stage B in shared memory (",
                    kSmemBudget / 1024, " KiB per block); reduce rank or num_specialists");
}

}  // namespace

at::Tensor cam_forward_cuda(const CamArgs& args) {
  c10::cuda::CUDAGuard guard(args.h_in.device());
  auto out = at::empty_like(args.h_in);
  const int64_t T = args.T, d = args.d, K = args.K, r = args.r;
  if (T == 0 || d == 0) return out;
  const at::Tensor z_bias = aligned_z_bias(args.z_bias);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.h_in.scalar_type(), "hycam_cam_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t elem = sizeof(scalar_t);
    const auto cfg = cam_forward_config(T, d, K, r, elem, sizeof(acc_t));
    check_tiling(cfg.lpr, K, r, "cam_forward");
    TORCH_CHECK_VALUE(cfg.grid.y <= 65535, "hycam.cam_forward: hidden size ", d,
                      " needs more than 65535 channel tiles of ", cfg.lpr * 16 / elem, "; reduce the hidden size");
    auto p = kernel_inputs<scalar_t, acc_t>(args, z_bias);
    p.out = out.data_ptr<scalar_t>();
    p.lpr = cfg.lpr;
    p.tile = cfg.tile;
    set_vector_access(p);
    auto kernel = cam_forward_kernel<scalar_t, acc_t>;
    cuda::set_smem(kernel, cfg.smem, "cam_forward");
    kernel<<<cfg.grid, cfg.block, cfg.smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

CamBackwardOut cam_backward_cuda(const CamBackwardArgs& args) {
  c10::cuda::CUDAGuard guard(args.h_in.device());
  const int64_t T = args.T, d = args.d, K = args.K, r = args.r, R1 = r + 1;
  const at::Tensor z_bias = aligned_z_bias(args.z_bias);
  const bool has_zb = z_bias.defined();
  const auto& h_in = args.h_in;
  auto d_main = at::empty_like(h_in);
  auto dz = at::empty_like(args.z);
  if (T == 0 || d == 0) {
    return {d_main, dz, at::zeros_like(args.g), at::zeros_like(args.w), at::zeros_like(args.B),
            at::zeros({K, d}, args.B.options()), at::zeros({has_zb ? d : 0}, args.z.options())};
  }
  const auto acc_type = h_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t elem = h_in.element_size();
  const auto cfg = cam_backward_config(T, d, K, r, elem, at::elementSize(acc_type), has_zb);
  check_tiling(cfg.lpr, K, r, "cam_backward");
  auto pdw = at::empty({cfg.nJ, T, K, r}, h_in.options().dtype(acc_type));  // routed pairs only
  auto pdg = at::empty({cfg.nJ, T, K}, h_in.options().dtype(acc_type));
  auto dw = at::empty_like(args.w, at::MemoryFormat::Contiguous);
  auto dg = at::empty_like(args.g, at::MemoryFormat::Contiguous);
  // dB and db, then (with z_bias) the sum of dz
  auto pB = at::empty({cfg.S, K * R1 + (has_zb ? 1 : 0), d}, h_in.options().dtype(acc_type));
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_in.scalar_type(), "hycam_cam_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto p = kernel_inputs<scalar_t, acc_t>(args, z_bias);
    p.go = args.go.data_ptr<scalar_t>();
    p.d_main = d_main.data_ptr<scalar_t>();
    p.dz = dz.data_ptr<scalar_t>();
    p.pdw = pdw.data_ptr<acc_t>();
    p.pdg = pdg.data_ptr<acc_t>();
    p.pB = pB.data_ptr<acc_t>();
    p.lpr = cfg.lpr;
    p.per_split = cfg.per_split;
    set_vector_access(p);
    using M = typename cuda::MmaType<scalar_t>::type;
    if constexpr (!std::is_void_v<M>) {  // the backward's expand runs on tensor cores (bf16/fp16 mma)
      TORCH_CHECK(at::cuda::getCurrentDeviceProperties()->major >= 8,
                  "hycam.cam_backward: float16/bfloat16 on CUDA needs a GPU of compute capability 8.0 or newer");
    }
    auto kernel = cam_backward_kernel<scalar_t, acc_t, M>;
    cuda::set_smem(kernel, cfg.smem, "cam_backward");
    kernel<<<cfg.grid, cfg.block, cfg.smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t n = T * K * (r + 1);
    sum_dwdg_kernel<scalar_t, acc_t><<<cuda::grid_1d(n), 256, 0, stream>>>(
        pdw.data_ptr<acc_t>(), pdg.data_ptr<acc_t>(), args.g.data_ptr<scalar_t>(), cfg.nJ, T * K, r,
        dw.data_ptr<scalar_t>(), dg.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  auto sums = cuda::sum_partials(pB);  // [K * R1 (+ 1), d]
  auto cols_sum = sums.narrow(0, 0, K * R1).view({K, R1, d});
  auto dB = fresh(cols_sum.narrow(1, 0, r).transpose(1, 2), args.B.scalar_type());
  auto db = fresh(cols_sum.select(1, r), args.B.scalar_type());
  auto dzb = has_zb ? fresh(sums.select(0, K * R1), args.z.scalar_type()) : at::empty({0}, args.z.options());
  return {d_main, dz, dg, dw, dB, db, dzb};
}

}  // namespace hycam
