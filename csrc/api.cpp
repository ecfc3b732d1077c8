// The hycam op library: schemas, every host-side argument check, and device dispatch.
// Kernels: csrc/cam/ (fused CAM forward/backward) and csrc/shrink/ (grouped specialist GEMMs).
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <sstream>
#include <string>
#include <vector>

#include "common/hycam_math.h"
#include "kernels.h"

namespace hycam {
namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// Check one tensor argument: its rank, its sizes (-1 = any), its dtype and device against `ref`.
void check_arg(const char* op, const char* name, const at::Tensor& t, std::vector<int64_t> sizes,
               const at::Tensor* ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.defined(), "hycam.", op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.dim() == static_cast<int64_t>(sizes.size()), "hycam.", op, ": ", name, " must be a ",
                    sizes.size(), "-D tensor, got shape ", shape_str(t));
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] >= 0) {
      TORCH_CHECK_VALUE(t.size(i) == sizes[i], "hycam.", op, ": ", name, " has shape ", shape_str(t),
                        " but dimension ", i, " must be ", sizes[i]);
    }
  }
  auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, "hycam.",
                   op, ": ", name, " must be float16, bfloat16, float32 or float64, got ", st);
  if (ref != nullptr) {
    TORCH_CHECK_TYPE(st == ref->scalar_type(), "hycam.", op, ": ", name, " has dtype ", st, " but ", ref_name,
                     " has dtype ", ref->scalar_type(), "; all tensors must share one dtype");
    TORCH_CHECK_VALUE(t.device() == ref->device(), "hycam.", op, ": ", name, " is on ", t.device(), " but ",
                      ref_name, " is on ", ref->device(), "; all tensors must be on one device");
  }
}

void check_opt(const char* op, const char* name, const OptTensor& t, std::vector<int64_t> sizes,
               const at::Tensor* ref, const char* ref_name) {
  if (t.has_value() && t->defined()) check_arg(op, name, *t, std::move(sizes), ref, ref_name);
}

// An optional argument for the implementations: contiguous, or undefined when absent.
at::Tensor contig(const OptTensor& t) {
  if (t.has_value() && t->defined()) return t->contiguous();
  return at::Tensor();
}

void check_device_supported(const char* op, const at::Tensor& t) {
  if (t.is_cuda()) {
#ifndef HYCAM_WITH_CUDA
    TORCH_CHECK(false, "hycam.", op, ": got CUDA tensors but hycam_ext was built without CUDA kernels; "
                "rebuild on a machine with nvcc and a CUDA build of torch (and HYCAM_FORCE_CPU unset)");
#endif
  } else {
    TORCH_CHECK_VALUE(t.is_cpu(), "hycam.", op, ": unsupported device ", t.device(), " (CPU and CUDA only)");
  }
}

Placement check_placement(const char* op, int64_t placement, const OptTensor& a) {
  const auto residual = static_cast<int64_t>(Placement::RESIDUAL);
  const auto attention = static_cast<int64_t>(Placement::ATTENTION);
  TORCH_CHECK_VALUE(placement == residual || placement == attention, "hycam.", op, ": placement must be ", residual,
                    " (residual) or ", attention, " (attention), got ", placement);
  TORCH_CHECK_VALUE(placement == residual || (a.has_value() && a->defined()), "hycam.", op, ": placement ",
                    attention, " (attention) needs the attention output a");
  return static_cast<Placement>(placement);
}

// Checks the arguments of a CAM op ([T, d], [T, K, r], [K, d, r] ...) and fills `args` with them,
// contiguous, and the sizes.
void cam_args(const char* op, const at::Tensor& h_in, const OptTensor& a, const at::Tensor& z, const at::Tensor& w,
              const at::Tensor& B, const OptTensor& b, const at::Tensor& g, double scale, int64_t placement,
              const OptTensor& z_bias, CamArgs& args) {
  TORCH_CHECK_VALUE(h_in.defined() && h_in.dim() == 2, "hycam.", op, ": h_in must be a 2-D tensor [T, d], got ",
                    h_in.defined() ? shape_str(h_in) : std::string("undefined"));
  TORCH_CHECK_VALUE(B.defined() && B.dim() == 3, "hycam.", op, ": B must be a 3-D tensor [K, d, r], got ",
                    B.defined() ? shape_str(B) : std::string("undefined"));
  const int64_t T = h_in.size(0), d = h_in.size(1), K = B.size(0), r = B.size(2);
  check_arg(op, "h_in", h_in, {T, d}, nullptr, nullptr);
  check_opt(op, "a", a, {T, d}, &h_in, "h_in");
  check_arg(op, "z", z, {T, d}, &h_in, "h_in");
  check_opt(op, "z_bias", z_bias, {d}, &h_in, "h_in");
  check_arg(op, "B", B, {K, d, r}, &h_in, "h_in");
  check_opt(op, "b", b, {K, d}, &h_in, "h_in");
  check_arg(op, "w", w, {T, K, r}, &h_in, "h_in");
  check_arg(op, "g", g, {T, K}, &h_in, "h_in");
  TORCH_CHECK_VALUE(K >= 1 && r >= 1, "hycam.", op, ": B must have K >= 1 specialists and rank r >= 1, got ",
                    shape_str(B));
  check_device_supported(op, h_in);
  args.placement = check_placement(op, placement, a);
  args.h_in = h_in.contiguous();
  args.a = contig(a);
  args.z = z.contiguous();
  args.z_bias = contig(z_bias);
  args.w = w.contiguous();
  args.B = B.contiguous();
  args.b = contig(b);
  args.g = g.contiguous();
  args.scale = scale;
  args.T = T;
  args.d = d;
  args.K = K;
  args.r = r;
}

ShrinkOut shrink(const at::Tensor& x, const at::Tensor& A, const OptTensor& A_bias, const at::Tensor& N,
                 const OptTensor& N_bias) {
  const char* op = "shrink";
  TORCH_CHECK_VALUE(x.defined() && x.dim() == 2, "hycam.shrink: x must be a 2-D tensor [T, d], got ",
                    x.defined() ? shape_str(x) : std::string("undefined"));
  TORCH_CHECK_VALUE(A.defined() && A.dim() == 3, "hycam.shrink: A must be a 3-D tensor [K, r, d], got ",
                    A.defined() ? shape_str(A) : std::string("undefined"));
  const int64_t T = x.size(0), d = x.size(1), K = A.size(0), r = A.size(1);
  check_arg(op, "x", x, {T, d}, nullptr, nullptr);
  check_arg(op, "A", A, {K, r, d}, &x, "x");
  check_opt(op, "A_bias", A_bias, {K, r}, &x, "x");
  check_arg(op, "N", N, {K, r, r}, &x, "x");
  check_opt(op, "N_bias", N_bias, {K, r}, &x, "x");
  TORCH_CHECK_VALUE(K >= 1 && r >= 1, "hycam.shrink: A must have K >= 1 and r >= 1, got ", shape_str(A));
  check_device_supported(op, x);
  const ShrinkArgs args{x.contiguous(), A.contiguous(), contig(A_bias), N.contiguous(), contig(N_bias), T, d, K, r};
#ifdef HYCAM_WITH_CUDA
  if (x.is_cuda()) return shrink_cuda(args);
#endif
  return cpu_kernels(x.scalar_type()).shrink(args);
}

ShrinkBackwardOut shrink_backward(const at::Tensor& dw, const at::Tensor& x, const at::Tensor& p, const at::Tensor& A,
                                  const at::Tensor& N) {
  const char* op = "shrink_backward";
  TORCH_CHECK_VALUE(x.defined() && x.dim() == 2, "hycam.shrink_backward: x must be a 2-D tensor [T, d]");
  TORCH_CHECK_VALUE(A.defined() && A.dim() == 3, "hycam.shrink_backward: A must be a 3-D tensor [K, r, d]");
  const int64_t T = x.size(0), d = x.size(1), K = A.size(0), r = A.size(1);
  check_arg(op, "x", x, {T, d}, nullptr, nullptr);
  check_arg(op, "dw", dw, {T, K, r}, &x, "x");
  check_arg(op, "p", p, {T, K, r}, &x, "x");
  check_arg(op, "A", A, {K, r, d}, &x, "x");
  check_arg(op, "N", N, {K, r, r}, &x, "x");
  TORCH_CHECK_VALUE(K >= 1 && r >= 1, "hycam.shrink_backward: A must have K >= 1 and r >= 1, got ", shape_str(A));
  check_device_supported(op, x);
  const ShrinkBackwardArgs args{dw.contiguous(), x.contiguous(), p.contiguous(), A.contiguous(), N.contiguous(),
                                T, d, K, r};
#ifdef HYCAM_WITH_CUDA
  if (x.is_cuda()) return shrink_backward_cuda(args);
#endif
  return cpu_kernels(x.scalar_type()).shrink_backward(args);
}

at::Tensor cam_forward(const at::Tensor& h_in, const OptTensor& a, const at::Tensor& z, const at::Tensor& w,
                       const at::Tensor& B, const OptTensor& b, const at::Tensor& g, double scale,
                       int64_t placement, const OptTensor& z_bias) {
  CamArgs args;
  cam_args("cam_forward", h_in, a, z, w, B, b, g, scale, placement, z_bias, args);
#ifdef HYCAM_WITH_CUDA
  if (h_in.is_cuda()) return cam_forward_cuda(args);
#endif
  return cpu_kernels(h_in.scalar_type()).cam_forward(args);
}

CamBackwardOut cam_backward(const at::Tensor& go, const at::Tensor& h_in, const OptTensor& a, const at::Tensor& z,
                            const at::Tensor& w, const at::Tensor& B, const OptTensor& b, const at::Tensor& g,
                            double scale, int64_t placement, const OptTensor& z_bias) {
  CamBackwardArgs args;
  cam_args("cam_backward", h_in, a, z, w, B, b, g, scale, placement, z_bias, args);
  check_arg("cam_backward", "go", go, {args.T, args.d}, &h_in, "h_in");
  args.go = go.contiguous();
#ifdef HYCAM_WITH_CUDA
  if (h_in.is_cuda()) return cam_backward_cuda(args);
#endif
  return cpu_kernels(h_in.scalar_type()).cam_backward(args);
}

bool built_with_cuda() {
#ifdef HYCAM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The instruction-set variant of the CPU kernels for float32, bfloat16 and float16 in this
// process (csrc/cpu/isa.h; float64 always runs "baseline").
std::string cpu_isa() { return cpu_kernels(at::kFloat).isa; }

}  // namespace

TORCH_LIBRARY(hycam, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("shrink(Tensor x, Tensor A, Tensor? A_bias, Tensor N, Tensor? N_bias) -> (Tensor, Tensor)", tags);
  m.def("shrink_backward(Tensor dw, Tensor x, Tensor p, Tensor A, Tensor N) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)", tags);
  m.def("cam_forward(Tensor h_in, Tensor? a, Tensor z, Tensor w, Tensor B, Tensor? b, Tensor g, "
        "float scale, int placement, Tensor? z_bias=None) -> Tensor", tags);
  m.def("cam_backward(Tensor go, Tensor h_in, Tensor? a, Tensor z, Tensor w, Tensor B, Tensor? b, "
        "Tensor g, float scale, int placement, Tensor? z_bias=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", tags);
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_isa_variants() -> str[]", &cpu_isa_variants);
}

// One checked entry point per op serves both backends; a CUDA tensor in a CPU-only build gets
// a clear error from check_device_supported instead of a missing-kernel message.
TORCH_LIBRARY_IMPL(hycam, CPU, m) {
  m.impl("shrink", &shrink);
  m.impl("shrink_backward", &shrink_backward);
  m.impl("cam_forward", &cam_forward);
  m.impl("cam_backward", &cam_backward);
}

TORCH_LIBRARY_IMPL(hycam, CUDA, m) {
  m.impl("shrink", &shrink);
  m.impl("shrink_backward", &shrink_backward);
  m.impl("cam_forward", &cam_forward);
  m.impl("cam_backward", &cam_backward);
}

}  // namespace hycam

// `import hycam_ext._C` loads this library (and so runs the registrations above).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
