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

template <typename scalar_t>
const scalar_t* opt_ptr(const OptTensor& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<scalar_t>() : nullptr;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// z_bias is only [d]: a view off a 16-byte boundary (a flat parameter buffer) is copied rather
// than letting it turn off the 16-byte accesses of every [T, d] stream.
OptTensor aligned_z_bias(const OptTensor& z_bias) {
  if (z_bias.has_value() && z_bias->defined() && !aligned16(z_bias->data_ptr())) return z_bias->clone();
  return z_bias;
}

// 16-byte row accesses: rows of a multiple of 16 bytes and every [T, d] base 16-byte aligned.
bool rows_vectorisable(int64_t d, int64_t elem, std::initializer_list<const void*> ptrs) {
  if ((d * elem) % 16 != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

void check_tiling(int64_t lpr, int64_t K, int64_t r, const char* op) {
  TORCH_CHECK_VALUE(lpr > 0, "hycam.", op, ": num_specialists * rank = ", K * r,
                    " (num_specialists ", K, ", rank ", r,
                    ") is too large for the CUDA CAM kernels, which stage B in shared memory (",
                    kSmemBudget / 1024, " KiB per block); reduce rank or num_specialists");
}

}  // namespace

at::Tensor cam_forward_cuda(const at::Tensor& h_in, const OptTensor& a, const at::Tensor& z, const at::Tensor& w,
                            const at::Tensor& B, const OptTensor& b, const at::Tensor& g, double scale,
                            int64_t placement, const OptTensor& z_bias_in) {
  c10::cuda::CUDAGuard guard(h_in.device());
  auto out = at::empty_like(h_in);
  const int64_t T = h_in.size(0), d = h_in.size(1), K = B.size(0), r = B.size(2);
  if (T == 0 || d == 0) return out;
  const OptTensor z_bias = aligned_z_bias(z_bias_in);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_in.scalar_type(), "hycam_cam_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t elem = sizeof(scalar_t);
    const auto cfg = cam_forward_config(T, d, K, r, elem, sizeof(acc_t));
    check_tiling(cfg.lpr, K, r, "cam_forward");
    TORCH_CHECK_VALUE(cfg.grid.y <= 65535, "hycam.cam_forward: hidden size ", d,
                      " needs more than 65535 channel tiles of ", cfg.lpr * 16 / elem, "; reduce the hidden size");
    const scalar_t* ap = opt_ptr<scalar_t>(a);
    const scalar_t* zbp = opt_ptr<scalar_t>(z_bias);
    const bool vec_io = rows_vectorisable(d, elem, {h_in.data_ptr(), ap, z.data_ptr(), zbp, out.data_ptr()});
    const bool vec_B = (d * r * elem) % 16 == 0 && aligned16(B.data_ptr());
    auto kernel = cam_forward_kernel<scalar_t, acc_t>;
    cuda::set_smem(kernel, cfg.smem, "cam_forward");
    kernel<<<cfg.grid, cfg.block, cfg.smem, stream>>>(
        h_in.data_ptr<scalar_t>(), ap, z.data_ptr<scalar_t>(), zbp, w.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(),
        opt_ptr<scalar_t>(b), g.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), T, d, K, r, static_cast<acc_t>(scale),
        placement, cfg.lpr, cfg.tile, vec_io, vec_B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

CamBackwardOut cam_backward_cuda(const at::Tensor& go, const at::Tensor& h_in, const OptTensor& a,
                                 const at::Tensor& z, const at::Tensor& w, const at::Tensor& B, const OptTensor& b,
                                 const at::Tensor& g, double scale, int64_t placement, const OptTensor& z_bias_in) {
  c10::cuda::CUDAGuard guard(h_in.device());
  const int64_t T = h_in.size(0), d = h_in.size(1), K = B.size(0), r = B.size(2), R1 = r + 1;
  const OptTensor z_bias = aligned_z_bias(z_bias_in);
  const bool has_zb = z_bias.has_value() && z_bias->defined();
  auto d_main = at::empty_like(h_in);
  auto dz = at::empty_like(z);
  if (T == 0 || d == 0) {
    return {d_main, dz, at::zeros_like(g), at::zeros_like(w), at::zeros_like(B), at::zeros({K, d}, B.options()),
            at::zeros({has_zb ? d : 0}, z.options())};
  }
  const auto acc_type = h_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t elem = h_in.element_size();
  const auto cfg = cam_backward_config(T, d, K, r, elem, at::elementSize(acc_type), has_zb);
  check_tiling(cfg.lpr, K, r, "cam_backward");
  auto pdw = at::empty({cfg.nJ, T, K, r}, h_in.options().dtype(acc_type));  // routed pairs only
  auto pdg = at::empty({cfg.nJ, T, K}, h_in.options().dtype(acc_type));
  auto dw = at::empty_like(w, at::MemoryFormat::Contiguous);
  auto dg = at::empty_like(g, at::MemoryFormat::Contiguous);
  // dB and db, then (with z_bias) the sum of dz
  auto pB = at::empty({cfg.S, K * R1 + (has_zb ? 1 : 0), d}, h_in.options().dtype(acc_type));
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_in.scalar_type(), "hycam_cam_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = opt_ptr<scalar_t>(a);
    const scalar_t* zbp = opt_ptr<scalar_t>(z_bias);
    const bool vec_io = rows_vectorisable(
        d, elem, {go.data_ptr(), h_in.data_ptr(), ap, z.data_ptr(), zbp, d_main.data_ptr(), dz.data_ptr()});
    const bool vec_B = (d * r * elem) % 16 == 0 && aligned16(B.data_ptr());
    using M = typename cuda::MmaType<scalar_t>::type;
    if constexpr (!std::is_void_v<M>) {  // the backward's expand runs on tensor cores (bf16/fp16 mma)
      TORCH_CHECK(at::cuda::getCurrentDeviceProperties()->major >= 8,
                  "hycam.cam_backward: float16/bfloat16 on CUDA needs a GPU of compute capability 8.0 or newer");
    }
    auto kernel = cam_backward_kernel<scalar_t, acc_t, M>;
    cuda::set_smem(kernel, cfg.smem, "cam_backward");
    kernel<<<cfg.grid, cfg.block, cfg.smem, stream>>>(
        go.data_ptr<scalar_t>(), h_in.data_ptr<scalar_t>(), ap, z.data_ptr<scalar_t>(), zbp, w.data_ptr<scalar_t>(),
        B.data_ptr<scalar_t>(), opt_ptr<scalar_t>(b), g.data_ptr<scalar_t>(), d_main.data_ptr<scalar_t>(),
        dz.data_ptr<scalar_t>(), pdw.data_ptr<acc_t>(), pdg.data_ptr<acc_t>(), pB.data_ptr<acc_t>(), T, d, K, r,
        static_cast<acc_t>(scale), placement, cfg.lpr, cfg.per_split, vec_io, vec_B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t n = T * K * (r + 1);
    sum_dwdg_kernel<scalar_t, acc_t><<<cuda::grid_1d(n), 256, 0, stream>>>(
        pdw.data_ptr<acc_t>(), pdg.data_ptr<acc_t>(), g.data_ptr<scalar_t>(), cfg.nJ, T * K, r,
        dw.data_ptr<scalar_t>(), dg.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  auto sums = cuda::sum_partials(pB);  // [K * R1 (+ 1), d]
  auto cols_sum = sums.narrow(0, 0, K * R1).view({K, R1, d});
  // every output its own tensor: .to()/.contiguous() may otherwise return views of one buffer
  auto fresh = [](const at::Tensor& t, at::ScalarType st) {
    return t.to(st, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
  };
  auto dB = fresh(cols_sum.narrow(1, 0, r).transpose(1, 2), B.scalar_type());
  auto db = fresh(cols_sum.select(1, r), B.scalar_type());
  auto dzb = has_zb ? fresh(sums.select(0, K * R1), z.scalar_type()) : at::empty({0}, z.options());
  return {d_main, dz, dg, dw, dB, db, dzb};
}

}  // namespace hycam
