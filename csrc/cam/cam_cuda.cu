// Fused CAM forward/backward on CUDA. Structural twin of cam_cpu.cpp: the element maths is
// csrc/common/hycam_math.h; here a thread owns one channel j of a tile of tokens, and the
// per-token reductions over channels (dg, dw) go through warp shuffles and shared memory
// in a fixed order. No atomics anywhere: results are bitwise reproducible run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../common/cuda_utils.cuh"
#include "../kernels.h"
#include "cam_kernels.cuh"

namespace hycam {
namespace {

using namespace cam_kernels;

template <typename scalar_t>
const scalar_t* opt_ptr(const OptTensor& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<scalar_t>() : nullptr;
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
    const auto cfg = cam_forward_config(T, d, K, r, sizeof(acc_t));
    TORCH_CHECK_VALUE(cfg.grid.y <= 65535, "hycam.cam_forward: hidden size ", d, " too large");
    auto kernel = cam_forward_kernel<scalar_t, acc_t>;
    cuda::set_smem(kernel, cfg.smem, "cam_forward");
    kernel<<<cfg.grid, cfg.block, cfg.smem, stream>>>(
        h_in.data_ptr<scalar_t>(), opt_ptr<scalar_t>(a), z.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
        B.data_ptr<scalar_t>(), opt_ptr<scalar_t>(b), g.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), T, d, K, r,
        static_cast<acc_t>(scale), placement, cfg.tile);
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
  const auto cfg = cam_backward_config(T, d, K, r, at::elementSize(acc_type), cuda::num_sms());
  auto prow = at::empty({cfg.nJ, T, K, R1}, h_in.options().dtype(acc_type));
  auto pB = at::empty({cfg.S, K, d, R1}, h_in.options().dtype(acc_type));
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_in.scalar_type(), "hycam_cam_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto rows = cam_backward_rows_kernel<scalar_t, acc_t>;
    cuda::set_smem(rows, cfg.smem_rows, "cam_backward");
    rows<<<cfg.grid_rows, cfg.block_rows, cfg.smem_rows, stream>>>(
        go.data_ptr<scalar_t>(), h_in.data_ptr<scalar_t>(), opt_ptr<scalar_t>(a), z.data_ptr<scalar_t>(),
        w.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(), opt_ptr<scalar_t>(b), g.data_ptr<scalar_t>(),
        d_main.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(), prow.data_ptr<acc_t>(), T, d, K, r,
        static_cast<acc_t>(scale), placement, cfg.tile);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    auto cols = cam_backward_cols_kernel<scalar_t, acc_t>;
    cuda::set_smem(cols, cfg.smem_cols, "cam_backward");
    cols<<<cfg.grid_cols, cfg.block_cols, cfg.smem_cols, stream>>>(
        go.data_ptr<scalar_t>(), h_in.data_ptr<scalar_t>(), opt_ptr<scalar_t>(a), w.data_ptr<scalar_t>(),
        B.data_ptr<scalar_t>(), opt_ptr<scalar_t>(b), g.data_ptr<scalar_t>(), pB.data_ptr<acc_t>(), T, d, K, r,
        static_cast<acc_t>(scale), placement, cfg.per_split, cfg.col_tile);
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
