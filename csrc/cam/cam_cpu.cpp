// Fused CAM forward/backward on CPU. One token row at a time: the K specialist rows u_k are
// expanded into a small per-thread buffer (never a [K, T, d] tensor), then gated, added to
// 1 + silu(z) and applied to h. The element maths is csrc/common/hycam_math.h, shared with CUDA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../common/cpu_utils.h"
#include "../common/hycam_math.h"
#include "../kernels.h"

namespace hycam {
namespace {

// B [K, d, r] -> Bt [K, r, d] in acc_t, so that expanding a row is K*r contiguous axpys.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> transpose_B(const at::Tensor& B) {
  const int64_t K = B.size(0), d = B.size(1), r = B.size(2);
  const scalar_t* src = B.data_ptr<scalar_t>();
  std::vector<acc_t> Bt(K * r * d);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < d; ++j)
      for (int64_t i = 0; i < r; ++i) Bt[idx_krd(k, i, j, r, d)] = static_cast<acc_t>(src[idx_kdr(k, j, i, d, r)]);
  return Bt;
}

template <typename scalar_t, typename acc_t>
std::vector<acc_t> widen_bias(const OptTensor& b, int64_t n) {
  std::vector<acc_t> out(n, acc_t(0));
  if (b.has_value() && b->defined()) {
    const scalar_t* src = b->data_ptr<scalar_t>();
    for (int64_t q = 0; q < n; ++q) out[q] = static_cast<acc_t>(src[q]);
  }
  return out;
}

// u[k, :] = b_k + sum_i w[t, k, i] * Bt[k, i, :]  (same summation order as expand_channel)
template <typename scalar_t, typename acc_t>
inline void expand_row(const acc_t* Bt, const acc_t* bias, const scalar_t* wt, int64_t k, int64_t r, int64_t d,
                       acc_t* u) {
  std::copy(bias + k * d, bias + (k + 1) * d, u);
  for (int64_t i = 0; i < r; ++i)
    cpu::axpy(static_cast<acc_t>(wt[k * r + i]), Bt + (k * r + i) * d, u, d);
}

template <typename scalar_t>
void cam_forward_impl(const at::Tensor& h_in, const OptTensor& a, const at::Tensor& z, const at::Tensor& w,
                      const at::Tensor& B, const OptTensor& b, const at::Tensor& g, double scale, int64_t placement,
                      at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = h_in.size(0), d = h_in.size(1), K = B.size(0), r = B.size(2);
  const acc_t s = static_cast<acc_t>(scale);
  const auto Bt = transpose_B<scalar_t, acc_t>(B);
  const auto bias = widen_bias<scalar_t, acc_t>(b, K * d);
  const scalar_t* hp = h_in.data_ptr<scalar_t>();
  const scalar_t* ap = (a.has_value() && a->defined()) ? a->data_ptr<scalar_t>() : nullptr;
  const scalar_t* zp = z.data_ptr<scalar_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const scalar_t* gp = g.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> u(d), spec(d);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(spec.begin(), spec.end(), acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const acc_t gk = static_cast<acc_t>(gp[t * K + k]);
        if (gk == acc_t(0)) continue;  // hard routing: only the routed specialist is computed
        expand_row<scalar_t, acc_t>(Bt.data(), bias.data(), wp + t * K * r, k, r, d, u.data());
        for (int64_t j = 0; j < d; ++j) spec[j] += gk * silu(s * u[j]);
      }
      const int64_t row = t * d;
      for (int64_t j = 0; j < d; ++j) {
        const acc_t c = cam_value(static_cast<acc_t>(zp[row + j]), spec[j]);
        const acc_t av = ap ? static_cast<acc_t>(ap[row + j]) : acc_t(0);
        op[row + j] = static_cast<scalar_t>(modulate(placement, static_cast<acc_t>(hp[row + j]), av, c));
      }
    }
  });
}

template <typename scalar_t>
void cam_backward_impl(const at::Tensor& go, const at::Tensor& h_in, const OptTensor& a, const at::Tensor& z,
                       const at::Tensor& w, const at::Tensor& B, const OptTensor& b, const at::Tensor& g,
                       double scale, int64_t placement, at::Tensor& d_main, at::Tensor& dz, at::Tensor& dg,
                       at::Tensor& dw, at::Tensor& dB, at::Tensor& db) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = h_in.size(0), d = h_in.size(1), K = B.size(0), r = B.size(2);
  const acc_t s = static_cast<acc_t>(scale);
  const auto Bt = transpose_B<scalar_t, acc_t>(B);
  const auto bias = widen_bias<scalar_t, acc_t>(b, K * d);
  const scalar_t* gop = go.data_ptr<scalar_t>();
  const scalar_t* hp = h_in.data_ptr<scalar_t>();
  const scalar_t* ap = (a.has_value() && a->defined()) ? a->data_ptr<scalar_t>() : nullptr;
  const scalar_t* zp = z.data_ptr<scalar_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const scalar_t* gp = g.data_ptr<scalar_t>();
  scalar_t* dmp = d_main.data_ptr<scalar_t>();
  scalar_t* dzp = dz.data_ptr<scalar_t>();
  scalar_t* dgp = dg.data_ptr<scalar_t>();
  scalar_t* dwp = dw.data_ptr<scalar_t>();

  const cpu::Chunks chunks(T);
  const int64_t nB = K * r * d, nb = K * d;
  std::vector<acc_t> dBt_part(chunks.n * nB, acc_t(0)), db_part(chunks.n * nb, acc_t(0));

  at::parallel_for(0, chunks.n, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> U(K * d), E(K * d), gcv(d), du(d);
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* dBt = dBt_part.data() + c * nB;
      acc_t* dbb = db_part.data() + c * nb;
      for (int64_t t = chunks.begin(c); t < chunks.end(c); ++t) {
        const int64_t row = t * d;
        const scalar_t* wt = wp + t * K * r;
        // every specialist's u and e: dg needs all K even under hard routing
        for (int64_t k = 0; k < K; ++k) {
          acc_t* uk = U.data() + k * d;
          acc_t* ek = E.data() + k * d;
          expand_row<scalar_t, acc_t>(Bt.data(), bias.data(), wt, k, r, d, uk);
          for (int64_t j = 0; j < d; ++j) ek[j] = silu(s * uk[j]);
        }
        for (int64_t j = 0; j < d; ++j) {
          acc_t spec = 0;
          for (int64_t k = 0; k < K; ++k) {
            const acc_t gk = static_cast<acc_t>(gp[t * K + k]);
            if (gk != acc_t(0)) spec += gk * E[k * d + j];
          }
          const acc_t zv = static_cast<acc_t>(zp[row + j]);
          const acc_t gov = static_cast<acc_t>(gop[row + j]);
          const acc_t av = ap ? static_cast<acc_t>(ap[row + j]) : acc_t(0);
          const acc_t gcj = gate_grad(placement, gov, static_cast<acc_t>(hp[row + j]), av);
          gcv[j] = gcj;
          dmp[row + j] = static_cast<scalar_t>(gov * cam_value(zv, spec));
          dzp[row + j] = static_cast<scalar_t>(gcj * silu_grad(zv));
        }
        for (int64_t k = 0; k < K; ++k) {
          dgp[t * K + k] = static_cast<scalar_t>(cpu::dot(gcv.data(), E.data() + k * d, d));
          const acc_t gk = static_cast<acc_t>(gp[t * K + k]);
          scalar_t* dwt = dwp + (t * K + k) * r;
          if (gk == acc_t(0)) {  // unrouted (hard routing): no gradient for w, B, b
            for (int64_t i = 0; i < r; ++i) dwt[i] = scalar_t(0);
            continue;
          }
          const acc_t* uk = U.data() + k * d;
          for (int64_t j = 0; j < d; ++j) du[j] = specialist_grad(gcv[j], gk, s, uk[j]);
          for (int64_t i = 0; i < r; ++i) {
            const acc_t* Bti = Bt.data() + (k * r + i) * d;
            dwt[i] = static_cast<scalar_t>(cpu::dot(du.data(), Bti, d));
            cpu::axpy(static_cast<acc_t>(wt[k * r + i]), du.data(), dBt + (k * r + i) * d, d);
          }
          acc_t* dbk = dbb + k * d;
          for (int64_t j = 0; j < d; ++j) dbk[j] += du[j];
        }
      }
    }
  });

  std::vector<acc_t> dBt(nB), dbv(nb);
  cpu::reduce_partials(dBt_part, chunks.n, nB, dBt.data());
  cpu::reduce_partials(db_part, chunks.n, nb, dbv.data());
  scalar_t* dBp = dB.data_ptr<scalar_t>();
  scalar_t* dbp = db.data_ptr<scalar_t>();
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < d; ++j) {
      for (int64_t i = 0; i < r; ++i) dBp[idx_kdr(k, j, i, d, r)] = static_cast<scalar_t>(dBt[idx_krd(k, i, j, r, d)]);
      dbp[k * d + j] = static_cast<scalar_t>(dbv[k * d + j]);
    }
}

}  // namespace

at::Tensor cam_forward_cpu(const at::Tensor& h_in, const OptTensor& a, const at::Tensor& z, const at::Tensor& w,
                           const at::Tensor& B, const OptTensor& b, const at::Tensor& g, double scale,
                           int64_t placement) {
  auto out = at::empty_like(h_in);
  if (h_in.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_in.scalar_type(), "hycam_cam_forward_cpu", [&] {
    cam_forward_impl<scalar_t>(h_in, a, z, w, B, b, g, scale, placement, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cam_backward_cpu(
    const at::Tensor& go, const at::Tensor& h_in, const OptTensor& a, const at::Tensor& z, const at::Tensor& w,
    const at::Tensor& B, const OptTensor& b, const at::Tensor& g, double scale, int64_t placement) {
  auto d_main = at::empty_like(h_in);
  auto dz = at::empty_like(z);
  auto dg = at::empty_like(g);
  auto dw = at::empty_like(w);
  auto dB = at::zeros_like(B);
  auto db = at::zeros({B.size(0), B.size(1)}, B.options());
  if (h_in.numel() == 0) return {d_main, dz, dg.zero_(), dw.zero_(), dB, db};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_in.scalar_type(), "hycam_cam_backward_cpu", [&] {
    cam_backward_impl<scalar_t>(go, h_in, a, z, w, B, b, g, scale, placement, d_main, dz, dg, dw, dB, db);
  });
  return {d_main, dz, dg, dw, dB, db};
}

}  // namespace hycam
