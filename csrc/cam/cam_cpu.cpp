// Fused CAM forward/backward on CPU. The specialist rows u_k are expanded into small per-thread
// buffers (never a [K, T, d] tensor), up to four tokens per pass over B_k (forward: the routed
// tokens of a 16-token window, grouped by specialist; backward: four consecutive tokens, all K),
// then gated, added to 1 + silu(z) and applied to h one token row at a time. The element maths
// is csrc/common/hycam_math.h, shared with CUDA. Compiled once per instruction-set variant
// (csrc/cpu/isa.h): on its own as the baseline, by csrc/cpu/kernels_avx2_cpu.cpp as avx2.
#include "../cpu/kernel_includes.h"  // std/ATen headers: only through this list (see there)
#include "../cpu/isa.h"
#include "../common/cpu_rows.h"
#include "../common/cpu_utils.h"
#include "../common/hycam_math.h"
#include "../kernels.h"

namespace hycam {
namespace HYCAM_CPU_ISA {  // one copy per instruction-set variant (csrc/cpu/isa.h)
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

// An optional bias of n values in acc_t, zeros when it is absent.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> widen_bias(const at::Tensor& b, int64_t n) {
  std::vector<acc_t> out(n, acc_t(0));
  if (b.defined()) {
    const scalar_t* src = b.data_ptr<scalar_t>();
    for (int64_t q = 0; q < n; ++q) out[q] = static_cast<acc_t>(src[q]);
  }
  return out;
}

// The rank-r activations of specialist k for tokens tok[0..n) as acc_t rows Wb [n, r].
template <typename scalar_t, typename acc_t>
inline void gather_w(const scalar_t* wp, const int64_t* tok, int64_t n, int64_t k, int64_t K, int64_t r, acc_t* Wb) {
  for (int64_t q = 0; q < n; ++q)
    for (int64_t i = 0; i < r; ++i) Wb[q * r + i] = static_cast<acc_t>(wp[(tok[q] * K + k) * r + i]);
}

// A row of a [T, d] tensor as acc_t: the row itself when the types match, else widened into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* row_in(const scalar_t* base, int64_t row, int64_t d, acc_t* buf) {
  if (base == nullptr) return nullptr;
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    return base + row * d;
  } else {
    cpu::widen_row(base + row * d, buf, d);
    return buf;
  }
}

// The row of z as acc_t plus z_bias (widened, nullptr when absent; then in buf).
template <typename scalar_t, typename acc_t>
inline const acc_t* z_row(const scalar_t* zp, const acc_t* zbias, int64_t row, int64_t d, acc_t* buf) {
  if (zbias == nullptr) return row_in<scalar_t, acc_t>(zp, row, d, buf);
  const scalar_t* src = zp + row * d;
  for (int64_t j = 0; j < d; ++j) buf[j] = static_cast<acc_t>(src[j]) + zbias[j];
  return buf;
}

// Where an output row is computed: in place when the types match, else in buf (then narrowed).
template <typename scalar_t, typename acc_t>
inline acc_t* row_out(scalar_t* base, int64_t row, int64_t d, acc_t* buf) {
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    return base + row * d;
  } else {
    return buf;
  }
}

template <typename scalar_t, typename acc_t>
inline void row_store(scalar_t* base, int64_t row, int64_t d, const acc_t* buf) {
  if constexpr (!std::is_same<scalar_t, acc_t>::value) {
    scalar_t* dst = base + row * d;
    for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<scalar_t>(buf[j]);
  }
}

// What both CAM kernels start from: the sizes, B transposed and the biases widened to acc_t, and
// the input rows.
template <typename scalar_t>
struct CamInputs {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t T, d, K, r;
  acc_t s;
  Placement placement;
  std::vector<acc_t> Bt, bias, zbias;
  const acc_t* zbp;  // z_bias in acc_t, nullptr when absent
  const scalar_t *hp, *ap, *zp, *wp, *gp;  // ap: nullptr when a is absent

  explicit CamInputs(const CamArgs& args)
      : T(args.T), d(args.d), K(args.K), r(args.r), s(static_cast<acc_t>(args.scale)), placement(args.placement),
        Bt(transpose_B<scalar_t, acc_t>(args.B)),
        bias(widen_bias<scalar_t, acc_t>(args.b, K * d)),
        zbias(widen_bias<scalar_t, acc_t>(args.z_bias, args.z_bias.defined() ? d : 0)),
        zbp(args.z_bias.defined() ? zbias.data() : nullptr),
        hp(args.h_in.data_ptr<scalar_t>()),
        ap(data_or_null<scalar_t>(args.a)),
        zp(args.z.data_ptr<scalar_t>()),
        wp(args.w.data_ptr<scalar_t>()),
        gp(args.g.data_ptr<scalar_t>()) {}
};

template <typename scalar_t>
void cam_forward_impl(const CamArgs& args, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const CamInputs<scalar_t> in(args);
  const int64_t T = in.T, d = in.d, K = in.K, r = in.r;
  const acc_t s = in.s;
  const auto& Bt = in.Bt;
  const auto& bias = in.bias;
  const scalar_t *hp = in.hp, *ap = in.ap, *zp = in.zp, *wp = in.wp, *gp = in.gp;
  const acc_t* zbp = in.zbp;
  const Placement placement = in.placement;
  scalar_t* op = out.data_ptr<scalar_t>();
  constexpr int64_t kWindow = 16;  // tokens whose specialist expansions are grouped by specialist
  constexpr int64_t kEB = rows::kExpandBlock;
  at::parallel_for(0, T, kWindow, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> U(kEB * d), Wb(kEB * r), sg(d), spec(kWindow * d), hb(d), ab(d), zb(d), ob(d);
    int64_t tok[kEB];
    for (int64_t w0 = t0; w0 < t1; w0 += kWindow) {
      const int64_t w1 = std::min(t1, w0 + kWindow);
      std::fill(spec.begin(), spec.end(), acc_t(0));
      // per specialist, its routed tokens of the window in groups of kEB share one pass over B_k
      // (hard routing: only the routed specialist of each token is computed)
      for (int64_t k = 0; k < K; ++k) {
        int64_t n = 0;
        auto flush = [&] {
          gather_w<scalar_t, acc_t>(wp, tok, n, k, K, r, Wb.data());
          rows::expand_block(Bt.data() + k * r * d, bias.data() + k * d, Wb.data(), r, n, r, d, U.data(), d);
          for (int64_t q = 0; q < n; ++q) {
            const acc_t gk = static_cast<acc_t>(gp[tok[q] * K + k]);
            rows::sigmoid_scaled(U.data() + q * d, s, sg.data(), d);
            rows::gate_accum_from_sigmoid(U.data() + q * d, sg.data(), s, gk, spec.data() + (tok[q] - w0) * d, d);
          }
          n = 0;
        };
        for (int64_t t = w0; t < w1; ++t) {
          if (static_cast<acc_t>(gp[t * K + k]) == acc_t(0)) continue;
          tok[n++] = t;
          if (n == kEB) flush();
        }
        if (n > 0) flush();
      }
      for (int64_t t = w0; t < w1; ++t) {
        acc_t* o = row_out<scalar_t, acc_t>(op, t, d, ob.data());
        const acc_t* zr = z_row<scalar_t, acc_t>(zp, zbp, t, d, zb.data());
        rows::sigmoid_scaled(zr, acc_t(1), sg.data(), d);
        rows::cam_epilogue(row_in<scalar_t, acc_t>(hp, t, d, hb.data()), row_in<scalar_t, acc_t>(ap, t, d, ab.data()),
                           zr, sg.data(), spec.data() + (t - w0) * d, o, d, placement);
        row_store<scalar_t, acc_t>(op, t, d, o);
      }
    }
  });
}

template <typename scalar_t>
void cam_backward_impl(const CamBackwardArgs& args, at::Tensor& d_main, at::Tensor& dz, at::Tensor& dg,
                       at::Tensor& dw, at::Tensor& dB, at::Tensor& db, at::Tensor& dz_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const CamInputs<scalar_t> in(args);
  const int64_t T = in.T, d = in.d, K = in.K, r = in.r;
  const acc_t s = in.s;
  const auto& Bt = in.Bt;
  const auto& bias = in.bias;
  const scalar_t *hp = in.hp, *ap = in.ap, *zp = in.zp, *wp = in.wp, *gp = in.gp;
  const acc_t* zbp = in.zbp;
  const bool has_zb = zbp != nullptr;
  const Placement placement = in.placement;
  const scalar_t* gop = args.go.data_ptr<scalar_t>();
  scalar_t* dmp = d_main.data_ptr<scalar_t>();
  scalar_t* dzp = dz.data_ptr<scalar_t>();
  scalar_t* dgp = dg.data_ptr<scalar_t>();
  scalar_t* dwp = dw.data_ptr<scalar_t>();

  const cpu::Chunks chunks(T);
  const int64_t nB = K * r * d, nb = K * d;
  std::vector<acc_t> dBt_part(chunks.n * nB, acc_t(0)), db_part(chunks.n * nb, acc_t(0));
  std::vector<acc_t> dzb_part(has_zb ? chunks.n * d : 0, acc_t(0));  // sums of dz (unrounded) per chunk

  at::parallel_for(0, chunks.n, 1, [&](int64_t c0, int64_t c1) {
    // U [kEB, K, d]: u of every specialist for a block of tokens (expanded together, one pass over
    // each B_k), SG: sigmoid(s * u) (one exp gives both silu and silu')
    constexpr int64_t kEB = rows::kExpandBlock;
    std::vector<acc_t> U(kEB * K * d), SG(kEB * K * d), Wb(kEB * r), spec(d), gcv(d), sgz(d), wk(r), dwk(r);
    int64_t tok[kEB];
    std::vector<acc_t> gob(d), hb(d), ab(d), zb(d), dmb(d), dzb(d);
    // dB_k += du_k w_k^T and db_k += du_k, gathered per specialist over blocks of tokens
    std::vector<rows::BlockedRankUpdate<acc_t>> dBk(K, rows::BlockedRankUpdate<acc_t>(r, d, 16));
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* dBt = dBt_part.data() + c * nB;
      acc_t* dbb = db_part.data() + c * nb;
      acc_t* dzs = has_zb ? dzb_part.data() + c * d : nullptr;
      for (int64_t tb = chunks.begin(c); tb < chunks.end(c); tb += kEB) {
        const int64_t nb_t = std::min(kEB, chunks.end(c) - tb);
        for (int64_t q = 0; q < nb_t; ++q) tok[q] = tb + q;
        // every specialist's u: dg needs all K even under hard routing
        for (int64_t k = 0; k < K; ++k) {
          gather_w<scalar_t, acc_t>(wp, tok, nb_t, k, K, r, Wb.data());
          rows::expand_block(Bt.data() + k * r * d, bias.data() + k * d, Wb.data(), r, nb_t, r, d, U.data() + k * d,
                             K * d);
        }
        for (int64_t q = 0; q < nb_t; ++q) {
          const int64_t t = tb + q;
          const scalar_t* wt = wp + t * K * r;
          std::fill(spec.begin(), spec.end(), acc_t(0));
          for (int64_t k = 0; k < K; ++k) {
            acc_t* uk = U.data() + (q * K + k) * d;
            acc_t* sk = SG.data() + (q * K + k) * d;
            rows::sigmoid_scaled(uk, s, sk, d);
            const acc_t gk = static_cast<acc_t>(gp[t * K + k]);
            if (gk != acc_t(0)) rows::gate_accum_from_sigmoid(uk, sk, s, gk, spec.data(), d);
          }
          acc_t* dm = row_out<scalar_t, acc_t>(dmp, t, d, dmb.data());
          acc_t* dzr = row_out<scalar_t, acc_t>(dzp, t, d, dzb.data());
          const acc_t* zr = z_row<scalar_t, acc_t>(zp, zbp, t, d, zb.data());
          rows::sigmoid_scaled(zr, acc_t(1), sgz.data(), d);
          rows::cam_backward_epilogue(row_in<scalar_t, acc_t>(gop, t, d, gob.data()),
                                      row_in<scalar_t, acc_t>(hp, t, d, hb.data()),
                                      row_in<scalar_t, acc_t>(ap, t, d, ab.data()), zr, sgz.data(), spec.data(), dm,
                                      dzr, gcv.data(), d, placement);
          if (dzs)
            for (int64_t j = 0; j < d; ++j) dzs[j] += dzr[j];
          row_store<scalar_t, acc_t>(dmp, t, d, dm);
          row_store<scalar_t, acc_t>(dzp, t, d, dzr);
          for (int64_t k = 0; k < K; ++k) {
            const acc_t* uk = U.data() + (q * K + k) * d;
            const acc_t* sk = SG.data() + (q * K + k) * d;
            dgp[t * K + k] = static_cast<scalar_t>(rows::gate_dot(gcv.data(), uk, sk, s, d));
            const acc_t gk = static_cast<acc_t>(gp[t * K + k]);
            scalar_t* dwt = dwp + (t * K + k) * r;
            if (gk == acc_t(0)) {  // unrouted (hard routing): no gradient for w, B, b
              for (int64_t i = 0; i < r; ++i) dwt[i] = scalar_t(0);
              continue;
            }
            for (int64_t i = 0; i < r; ++i) wk[i] = static_cast<acc_t>(wt[k * r + i]);
            acc_t* du = dBk[k].push(wk.data());
            rows::specialist_grad_row(gcv.data(), uk, sk, s, gk, du, d);
            rows::gemv_n(Bt.data() + k * r * d, d, du, r, d, dwk.data());
            for (int64_t i = 0; i < r; ++i) dwt[i] = static_cast<scalar_t>(dwk[i]);
            if (dBk[k].full()) dBk[k].flush(dBt + k * r * d, dbb + k * d);
          }
        }
      }
      for (int64_t k = 0; k < K; ++k) dBk[k].flush(dBt + k * r * d, dbb + k * d);
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
  if (has_zb) {
    std::vector<acc_t> dzbv(d);
    cpu::reduce_partials(dzb_part, chunks.n, d, dzbv.data());
    scalar_t* dzbp = dz_bias.data_ptr<scalar_t>();
    for (int64_t j = 0; j < d; ++j) dzbp[j] = static_cast<scalar_t>(dzbv[j]);
  }
}

}  // namespace

at::Tensor cam_forward_cpu(const CamArgs& args) {
  auto out = at::empty_like(args.h_in);
  if (args.h_in.numel() == 0) return out;
  HYCAM_CPU_DISPATCH(args.h_in.scalar_type(), "hycam_cam_forward_cpu", [&] { cam_forward_impl<scalar_t>(args, out); });
  return out;
}

CamBackwardOut cam_backward_cpu(const CamBackwardArgs& args) {
  auto d_main = at::empty_like(args.h_in);
  auto dz = at::empty_like(args.z);
  auto dg = at::empty_like(args.g);
  auto dw = at::empty_like(args.w);
  auto dB = at::zeros_like(args.B);
  auto db = at::zeros({args.K, args.d}, args.B.options());
  // the sum of dz over tokens (zeros: T = 0)
  auto dz_bias = at::zeros({args.z_bias.defined() ? args.d : 0}, args.z.options());
  if (args.h_in.numel() == 0) return {d_main, dz, dg.zero_(), dw.zero_(), dB, db, dz_bias};
  HYCAM_CPU_DISPATCH(args.h_in.scalar_type(), "hycam_cam_backward_cpu", [&] {
    cam_backward_impl<scalar_t>(args, d_main, dz, dg, dw, dB, db, dz_bias);
  });
  return {d_main, dz, dg, dw, dB, db, dz_bias};
}

// the entry points csrc/cpu/dispatch_cpu.cpp collects
static_assert(std::is_same_v<decltype(cam_forward_cpu), CamForwardFn>, "cam_forward_cpu: see kernels.h");
static_assert(std::is_same_v<decltype(cam_backward_cpu), CamBackwardFn>, "cam_backward_cpu: see kernels.h");

}  // namespace HYCAM_CPU_ISA
}  // namespace hycam
