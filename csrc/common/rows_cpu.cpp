// The float row kernels, compiled for AVX2+FMA and for baseline x86-64 (GCC function
// multi-versioning: the loader picks the best clone for the CPU it runs on).
#include "cpu_rows.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HYCAM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HYCAM_CLONES
#endif

namespace hycam {
namespace rows {

HYCAM_CLONES void axpy_f(float alpha, const float* x, float* y, int64_t n) { axpy(alpha, x, y, n); }

HYCAM_CLONES float dot_f(const float* a, const float* b, int64_t n) { return dot(a, b, n); }

HYCAM_CLONES void gemv_t_f(const float* M, int64_t ldm, const float* c, int64_t m, float* y, int64_t n) {
  gemv_t(M, ldm, c, m, y, n);
}

HYCAM_CLONES void gemv_n_f(const float* M, int64_t ldm, const float* x, int64_t m, int64_t n, float* out) {
  gemv_n(M, ldm, x, m, n, out);
}

HYCAM_CLONES void dots4_f(const float* X, int64_t ldx, const float* A, int64_t lda, int64_t m, int64_t n, float* C) {
  dots4(X, ldx, A, lda, m, n, C);
}

HYCAM_CLONES void expand_block_f(const float* Bt, const float* bias, const float* W, int64_t ldw, int64_t nq, int64_t r,
                                 int64_t d, float* U, int64_t ldu) {
  expand_block(Bt, bias, W, ldw, nq, r, d, U, ldu);
}

HYCAM_CLONES void sigmoid_scaled_f(const float* u, float s, float* sg, int64_t n) { sigmoid_scaled(u, s, sg, n); }

HYCAM_CLONES void gate_accum_from_sigmoid_f(const float* u, const float* sg, float s, float g, float* spec,
                                            int64_t n) {
  gate_accum_from_sigmoid(u, sg, s, g, spec, n);
}

HYCAM_CLONES float gate_dot_f(const float* gc, const float* u, const float* sg, float s, int64_t n) {
  return gate_dot(gc, u, sg, s, n);
}

HYCAM_CLONES void specialist_grad_row_f(const float* gc, const float* u, const float* sg, float s, float g,
                                        float* du, int64_t n) {
  specialist_grad_row(gc, u, sg, s, g, du, n);
}

HYCAM_CLONES void cam_epilogue_f(const float* h, const float* a, const float* z, const float* sgz, const float* spec,
                                 float* out, int64_t n, int64_t placement) {
  cam_epilogue(h, a, z, sgz, spec, out, n, placement);
}

HYCAM_CLONES void cam_backward_epilogue_f(const float* go, const float* h, const float* a, const float* z,
                                          const float* sgz, const float* spec, float* d_main, float* dz, float* gc,
                                          int64_t n, int64_t placement) {
  cam_backward_epilogue(go, h, a, z, sgz, spec, d_main, dz, gc, n, placement);
}

}  // namespace rows
}  // namespace hycam
