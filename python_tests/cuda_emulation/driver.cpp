// Runs every CUDA kernel of csrc/ on the CPU (HYCAM_CUDA_EMULATION, csrc/emulation/cuda_emulation.h)
// with the launch configurations of the real launchers, and compares against a naive float64
// computation of docs/formulas.md. Built and run by
// python_tests/cuda_emulation/test_cuda_emulation.py (with AddressSanitizer/UBSan where
// available). Prints "failures: N" and exits non-zero on any.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include "cam/cam_kernels.cuh"
#include "shrink/shrink_kernels.cuh"

using namespace hycam;
using hycam_emu::launch;

static int failures = 0;

static uint64_t rng_state = 88172645463325252ull;
static double urand() {  // uniform in [-1, 1)
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (rng_state >> 11) * (1.0 / 9007199254740992.0) * 2.0 - 1.0;
}

template <class S>
std::vector<S> rnd(int64_t n, double scale = 1.0) {
  std::vector<S> v(n);
  for (auto& x : v) x = S(urand() * scale);
  return v;
}
template <class S>
std::vector<S> poisoned(int64_t n) {  // outputs start as NaN: an element never written shows up
  return std::vector<S>(n, S(NAN));
}

static double sil(double v) { return v / (1 + std::exp(-v)); }
static double silg(double v) {
  const double sg = 1 / (1 + std::exp(-v));
  return sg * (1 + v * (1 - sg));
}

template <class S>
double as_double(S v) {  // half/bfloat16 (emulated) only convert explicitly to float
  if constexpr (std::is_floating_point_v<S>) {
    return double(v);
  } else {
    return double(float(v));
  }
}

template <class S>
void cmp(const char* what, const S* got, const std::vector<double>& ref, double rtol) {
  double mx = 0, err = 0;
  int64_t bad = -1;
  for (double x : ref) mx = std::max(mx, std::fabs(x));
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = std::fabs(as_double(got[i]) - ref[i]);
    if (!(e <= rtol * (1 + mx)) && bad < 0) bad = int64_t(i);
    err = std::isnan(e) ? INFINITY : std::max(err, e);
  }
  if (bad >= 0) {
    ++failures;
    std::printf("   FAIL %-7s max err %.3g (max|ref| %.3g), first bad index %ld: got %g want %g\n", what, err, mx,
                long(bad), as_double(got[bad]), ref[bad]);
  }
}

// dp[t, k, m] = sum_i N[k, i, m] dw[t, k, i] in float64 (the shrink backward's first step).
template <class S>
std::vector<double> dp_reference(const std::vector<S>& N, const std::vector<S>& dw, int64_t T, int64_t K, int64_t r) {
  std::vector<double> dp(T * K * r);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t m = 0; m < r; ++m) {
        double v = 0;
        for (int64_t i = 0; i < r; ++i) v += as_double(N[(k * r + i) * r + m]) * as_double(dw[(t * K + k) * r + i]);
        dp[(t * K + k) * r + m] = v;
      }
  return dp;
}

template <class S>
const char* type_name() {
  if constexpr (std::is_same_v<S, float>) return "float";
  if constexpr (std::is_same_v<S, double>) return "double";
  if constexpr (std::is_same_v<S, __half>) return "half";
  return "bfloat16";
}

template <class S>
std::vector<S> sum_partials(const std::vector<S>& part, int64_t S_, int64_t n) {
  std::vector<S> out(n, S(0));
  launch(dim3(unsigned(cuda::grid_1d(n))), dim3(256), 0,
         [&] { cuda::sum_partials_kernel<S>(part.data(), S_, n, out.data()); }, "sum_partials_kernel");
  return out;
}

// The mma element type cam_cuda.cu passes for a storage type (void: no tensor-core path).
template <class S>
using MmaOf = std::conditional_t<std::is_same_v<S, __half> || std::is_same_v<S, __nv_bfloat16>, S, void>;

// S: storage type, Acc: accumulation type (at::opmath_type<S> in cam_cuda.cu: float for the 16-bit types).
template <class S, class Acc = S>
// hard: 0 soft routing (every g > 0), 1 hard routing cycling over the specialists, 2 hard routing
// skewed to specialist 0 (four tokens in five).
void test_cam(int64_t T, int64_t d, int64_t K, int64_t r, int placement, bool has_a, bool has_b, int hard,
              bool misalign = false) {
  using namespace cam_kernels;
  std::printf("cam    T=%ld d=%ld K=%ld r=%ld placement=%d a=%d b=%d hard=%d misaligned=%d %s acc %s\n", long(T),
              long(d), long(K), long(r), placement, has_a, has_b, hard, misalign, type_name<S>(), type_name<Acc>());
  const double scale = 0.7;
  auto h = rnd<S>(T * d), a = rnd<S>(has_a ? T * d : 0), z = rnd<S>(T * d), w = rnd<S>(T * K * r);
  auto B = rnd<S>(K * d * r, 0.5), b = rnd<S>(has_b ? K * d : 0), g = rnd<S>(T * K), go = rnd<S>(T * d);
  auto zb = rnd<S>(has_b ? d : 0);  // z_bias: with the specialists' biases
  const S* ap = has_a ? a.data() : nullptr;
  const S* bp = has_b ? b.data() : nullptr;
  const S* zbp = has_b ? zb.data() : nullptr;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k)
      g[t * K + k] = hard == 0 ? S(0.5 + 0.5 * std::fabs(as_double(g[t * K + k])))
                     : S(k == (hard == 1 ? (t * 7 + 3) % K : (t % 5 ? 0 : (t / 5) % K)) ? 1.0 : 0.0);
  // float64 reference
  std::vector<double> out(T * d), dm(T * d), dz(T * d), dg(T * K), dw(T * K * r, 0), dB(K * d * r, 0), db(K * d, 0);
  std::vector<double> dzb(d, 0);
  std::vector<double> u(K * d), gc(d);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < d; ++j) {
        double v = bp ? as_double(bp[k * d + j]) : 0;
        for (int64_t i = 0; i < r; ++i) v += as_double(B[(k * d + j) * r + i]) * as_double(w[(t * K + k) * r + i]);
        u[k * d + j] = v;
      }
    for (int64_t j = 0; j < d; ++j) {
      double spec = 0;
      for (int64_t k = 0; k < K; ++k)
        if (as_double(g[t * K + k]) != 0) spec += as_double(g[t * K + k]) * sil(scale * u[k * d + j]);
      const int64_t e = t * d + j;
      const double ze = as_double(z[e]) + (zbp ? as_double(zbp[j]) : 0);
      const double c = 1 + sil(ze) + spec, hv = as_double(h[e]), av = ap ? as_double(ap[e]) : 0;
      const double gov = as_double(go[e]);
      out[e] = placement == 0 ? (hv + av) * c : hv + av * c;
      gc[j] = placement == 0 ? gov * (hv + av) : gov * av;
      dm[e] = gov * c;
      dz[e] = gc[j] * silg(ze);
      dzb[j] += dz[e];
    }
    for (int64_t k = 0; k < K; ++k) {
      const double gk = as_double(g[t * K + k]);
      double sum = 0;
      for (int64_t j = 0; j < d; ++j) sum += gc[j] * sil(scale * u[k * d + j]);
      dg[t * K + k] = sum;
      if (gk == 0) continue;
      for (int64_t j = 0; j < d; ++j) {
        const double du = gc[j] * gk * scale * silg(scale * u[k * d + j]);
        db[k * d + j] += du;
        for (int64_t i = 0; i < r; ++i) {
          dw[(t * K + k) * r + i] += du * as_double(B[(k * d + j) * r + i]);
          dB[(k * d + j) * r + i] += du * as_double(w[(t * K + k) * r + i]);
        }
      }
    }
  }
  // 16-bit storage: the elementwise outputs are rounded once to S; the reductions stay in Acc
  const double tol = sizeof(Acc) == 4 ? 2e-5 : 1e-11;
  const double out_tol = std::is_same_v<S, __nv_bfloat16> ? 8e-3 : (std::is_same_v<S, __half> ? 1e-3 : tol);
  const double red_tol = sizeof(S) == 2 ? 1e-4 : tol;
  // misalign: h_in is a view one element off a 16-byte boundary (the scalar path for every stream)
  std::vector<S> hbuf(T * d + 1);
  std::copy(h.begin(), h.end(), hbuf.begin() + (misalign ? 1 : 0));
  const S* hp = hbuf.data() + (misalign ? 1 : 0);
  // the kernels' parameters, as cam_cuda.cu fills them (16-byte accesses by set_vector_access:
  // std::vector's storage is 16-byte aligned)
  CamParams<S, Acc> prm;
  prm.h_in = hp;
  prm.a = ap;
  prm.z = z.data();
  prm.z_bias = zbp;
  prm.w = w.data();
  prm.B = B.data();
  prm.b = bp;
  prm.g = g.data();
  prm.T = T;
  prm.d = d;
  prm.K = K;
  prm.r = r;
  prm.scale = Acc(scale);
  prm.placement = placement == 0 ? Placement::RESIDUAL : Placement::ATTENTION;
  {  // forward, as cam_forward_cuda launches it
    const auto cfg = cam_forward_config(T, d, K, r, sizeof(S), sizeof(Acc));
    if (cfg.lpr == 0) hycam_emu::fail("cam_forward_config: no tiling fits");
    auto o = poisoned<S>(T * d);
    CamParams<S, Acc> fp = prm;
    fp.out = o.data();
    fp.lpr = cfg.lpr;
    fp.tile = cfg.tile;
    set_vector_access(fp);
    if (T > 0 && d > 0)
      launch(cfg.grid, cfg.block, cfg.smem, [&] { cam_forward_kernel<S, Acc>(fp); }, "cam_forward_kernel");
    cmp("out", o.data(), out, out_tol);
  }
  {  // backward, as cam_backward_cuda launches it
    const int64_t R1 = r + 1;
    const auto cfg = cam_backward_config(T, d, K, r, sizeof(S), sizeof(Acc), zbp != nullptr);
    const int64_t nB = K * R1 + (zbp ? 1 : 0);  // pB rows: dB, db, then the sum of dz with z_bias
    if (cfg.lpr == 0) hycam_emu::fail("cam_backward_config: no tiling fits");
    auto d_main = poisoned<S>(T * d), dzg = poisoned<S>(T * d);
    auto pdw = poisoned<Acc>(cfg.nJ * T * K * r), pdg = poisoned<Acc>(cfg.nJ * T * K);
    auto pB = poisoned<Acc>(cfg.S * nB * d);
    // dw and dg: the sums in Acc (tight tolerance), and as cam_backward_cuda launches it, rounded to S
    auto gdw = poisoned<Acc>(T * K * r), gdg = poisoned<Acc>(T * K);
    auto sdw = poisoned<S>(T * K * r), sdg = poisoned<S>(T * K);
    if (T == 0 || d == 0) {  // cam_backward_cuda returns zeros without a launch
      std::fill(pB.begin(), pB.end(), Acc(0));
      std::fill(gdw.begin(), gdw.end(), Acc(0));
      std::fill(gdg.begin(), gdg.end(), Acc(0));
      std::fill(sdw.begin(), sdw.end(), S(0.0f));
      std::fill(sdg.begin(), sdg.end(), S(0.0f));
    } else {
      CamParams<S, Acc> bw = prm;
      bw.go = go.data();
      bw.d_main = d_main.data();
      bw.dz = dzg.data();
      bw.pdw = pdw.data();
      bw.pdg = pdg.data();
      bw.pB = pB.data();
      bw.lpr = cfg.lpr;
      bw.per_split = cfg.per_split;
      set_vector_access(bw);
      launch(cfg.grid, cfg.block, cfg.smem, [&] { cam_backward_kernel<S, Acc, MmaOf<S>>(bw); },
             "cam_backward_kernel");
      // unrouted pairs' pdw stays poisoned: sum_dwdg_kernel must not read it
      const dim3 grid(unsigned(cuda::grid_1d(T * K * R1)));
      launch(grid, dim3(256), 0, [&] {
        sum_dwdg_kernel<S, Acc, Acc>(pdw.data(), pdg.data(), g.data(), cfg.nJ, T * K, r, gdw.data(), gdg.data());
      }, "sum_dwdg_kernel");
      launch(grid, dim3(256), 0, [&] {
        sum_dwdg_kernel<S, Acc>(pdw.data(), pdg.data(), g.data(), cfg.nJ, T * K, r, sdw.data(), sdg.data());
      }, "sum_dwdg_kernel");
    }
    const auto cs = sum_partials(pB, cfg.S, nB * d);
    std::vector<Acc> gdB(K * d * r), gdb(K * d), gdzb(cs.begin() + K * R1 * d, cs.end());
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < d; ++j) {
        for (int64_t i = 0; i < r; ++i) gdB[(k * d + j) * r + i] = cs[(k * R1 + i) * d + j];
        gdb[k * d + j] = cs[(k * R1 + r) * d + j];
      }
    cmp("d_main", d_main.data(), dm, out_tol);
    cmp("dz", dzg.data(), dz, out_tol);
    cmp("dg", gdg.data(), dg, red_tol);
    cmp("dw", gdw.data(), dw, red_tol);
    cmp("dw (storage)", sdw.data(), dw, out_tol);
    cmp("dg (storage)", sdg.data(), dg, out_tol);
    cmp("dB", gdB.data(), dB, red_tol);
    cmp("db", gdb.data(), db, red_tol);
    if (zbp) cmp("dz_bias", gdzb.data(), dzb, red_tol);
  }
}

template <class S>
void test_shrink(int64_t T, int64_t d, int64_t K, int64_t r, bool bias) {
  using namespace shrink_kernels;
  std::printf("shrink T=%ld d=%ld K=%ld r=%ld bias=%d %s\n", long(T), long(d), long(K), long(r), bias,
              sizeof(S) == 4 ? "float" : "double");
  const int64_t KR = K * r;
  auto x = rnd<S>(T * d), A = rnd<S>(KR * d), ab = rnd<S>(bias ? KR : 0), N = rnd<S>(K * r * r);
  auto nb = rnd<S>(bias ? KR : 0), dw = rnd<S>(T * KR);
  const S* abp = bias ? ab.data() : nullptr;
  const S* nbp = bias ? nb.data() : nullptr;
  std::vector<double> p(T * KR), w(T * KR);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < KR; ++o) {
      double v = abp ? double(abp[o]) : 0;
      for (int64_t j = 0; j < d; ++j) v += double(x[t * d + j]) * double(A[o * d + j]);
      p[t * KR + o] = v;
    }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < r; ++i) {
        double v = nbp ? double(nbp[k * r + i]) : 0;
        for (int64_t m = 0; m < r; ++m) v += double(N[(k * r + i) * r + m]) * double(S(p[t * KR + k * r + m]));
        w[t * KR + k * r + i] = v;
      }
  const double tol = sizeof(S) == 4 ? 2e-5 : 1e-11;
  auto pg = poisoned<S>(T * KR), wg = poisoned<S>(T * KR);
  launch(dim3(unsigned(cuda::ceil_div(T, kTM)), unsigned(cuda::ceil_div(KR, kTN))), dim3(kThreads), 0,
         [&] { shrink_kernel<S, S>(x.data(), A.data(), abp, pg.data(), T, d, KR); }, "shrink_kernel");
  launch(dim3(unsigned(cuda::grid_1d(T * KR))), dim3(256), 0,
         [&] { mix_kernel<S, S>(pg.data(), N.data(), nbp, wg.data(), T, K, r); }, "mix_kernel");
  cmp("p", pg.data(), p, tol);
  cmp("w", wg.data(), w, tol);
  // backward reference (p as stored, like the op)
  const std::vector<double> dp = dp_reference(N, dw, T, K, r);
  std::vector<double> dx(T * d, 0), dA(KR * d, 0), da(KR, 0), dN(K * r * r, 0), dn(KR, 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < KR; ++o) {
      da[o] += dp[t * KR + o];
      dn[o] += double(dw[t * KR + o]);
      for (int64_t j = 0; j < d; ++j) {
        dx[t * d + j] += dp[t * KR + o] * double(A[o * d + j]);
        dA[o * d + j] += dp[t * KR + o] * double(x[t * d + j]);
      }
      const int64_t k = o / r, i = o % r;
      for (int64_t m = 0; m < r; ++m)
        dN[(k * r + i) * r + m] += double(dw[t * KR + o]) * double(pg[t * KR + k * r + m]);
    }
  const auto cfg = shrink_backward_config(T, d, K, r);
  auto dpg = poisoned<S>(T * KR), pA = poisoned<S>(cfg.S * KR * d), pS = poisoned<S>(cfg.S_small * cfg.nq);
  auto dxg = poisoned<S>(T * d);
  launch(dim3(unsigned(cuda::grid_1d(T * KR))), dim3(256), 0,
         [&] { dp_kernel<S, S>(dw.data(), N.data(), dpg.data(), nullptr, T, K, r); }, "dp_kernel");
  if (d > 0) {
    launch(dim3(unsigned(cuda::ceil_div(T, kTM)), unsigned(cfg.nJ)), dim3(kThreads), 0,
           [&] { dx_kernel<S, S>(dpg.data(), A.data(), dxg.data(), T, d, KR); }, "dx_kernel");
    launch(dim3(unsigned(cfg.nO), unsigned(cfg.nJ), unsigned(cfg.S)), dim3(kThreads), 0,
           [&] { dA_kernel<S, S>(dpg.data(), x.data(), pA.data(), T, d, KR, cfg.per_split); }, "dA_kernel");
  }
  launch(dim3(unsigned(cuda::ceil_div(cfg.nq, 256)), unsigned(cfg.S_small)), dim3(256), 0, [&] {
    small_reductions_kernel<S, S>(dpg.data(), dw.data(), pg.data(), pS.data(), T, K, r, cfg.per_small);
  }, "small_reductions_kernel");
  const auto sA = sum_partials(pA, cfg.S, KR * d), sS = sum_partials(pS, cfg.S_small, cfg.nq);
  cmp("dx", dxg.data(), dx, tol);
  cmp("dA", sA.data(), dA, tol);
  cmp("da", sS.data(), da, tol);
  cmp("dN", sS.data() + KR, dN, tol);
  cmp("dn", sS.data() + KR + K * r * r, dn, tol);
}

// The tensor-core path of the launcher for half/bfloat16 (M): shrink_tc_kernel, dp_kernel with its
// rounded copy, dx_tc_kernel and dA_tc_kernel, with mix/small_reductions as in the CUDA-core path.
// x_offset shifts x by that many elements off a 16-byte boundary (the scalar staging path).
template <class M>
void test_shrink_tc(int64_t T, int64_t d, int64_t K, int64_t r, bool bias, int64_t x_offset = 0) {
  using namespace shrink_kernels;
  const bool bf = std::is_same_v<M, __nv_bfloat16>;
  std::printf("shrink_tc T=%ld d=%ld K=%ld r=%ld bias=%d x_offset=%ld %s\n", long(T), long(d), long(K), long(r), bias,
              long(x_offset), bf ? "bfloat16" : "half");
  const int64_t KR = K * r;
  auto round = [](std::vector<float> v) {
    std::vector<M> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = M(v[i]);
    return o;
  };
  auto x_store = round(rnd<float>(T * d + x_offset + 8));
  const M* x = x_store.data() + x_offset;
  auto A = round(rnd<float>(KR * d, 0.3)), ab = round(rnd<float>(bias ? KR : 0)), N = round(rnd<float>(K * r * r, 0.5));
  auto nb = round(rnd<float>(bias ? KR : 0)), dw = round(rnd<float>(T * KR));
  const M* abp = bias ? ab.data() : nullptr;
  const M* nbp = bias ? nb.data() : nullptr;
  auto f = [](M v) { return double(float(v)); };
  const double out_tol = bf ? 8e-3 : 1e-3;  // one rounding of the output
  // forward
  std::vector<double> p(T * KR);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < KR; ++o) {
      double v = abp ? f(abp[o]) : 0;
      for (int64_t j = 0; j < d; ++j) v += f(x[t * d + j]) * f(A[o * d + j]);
      p[t * KR + o] = v;
    }
  std::vector<M> pg(T * KR, M(NAN)), wg(T * KR, M(NAN));
  const auto sk = shrink_split_k(d);  // as shrink_cuda.cu: split-K partials, then the ordered finish
  std::vector<float> part(sk.SK * T * KR, NAN);
  launch(dim3(unsigned(cuda::ceil_div(T, kMM)), unsigned(cuda::ceil_div(KR, kMN)), unsigned(sk.SK)), dim3(kMThreads),
         0, [&] { shrink_tc_kernel<M>(make_operand(x, d), make_operand(A.data(), d), part.data(), T, d, KR,
                                      sk.per_split); }, "shrink_tc_kernel");
  launch(dim3(unsigned(cuda::grid_1d(T * KR))), dim3(256), 0,
         [&] { shrink_finish_kernel<M>(part.data(), sk.SK, abp, pg.data(), T * KR, KR); }, "shrink_finish_kernel");
  cmp("p", pg.data(), p, out_tol);
  std::vector<double> w(T * KR);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < r; ++i) {
        double v = nbp ? f(nbp[k * r + i]) : 0;
        for (int64_t m = 0; m < r; ++m) v += f(N[(k * r + i) * r + m]) * f(pg[t * KR + k * r + m]);
        w[t * KR + k * r + i] = v;
      }
  launch(dim3(unsigned(cuda::grid_1d(T * KR))), dim3(256), 0,
         [&] { mix_kernel<M, float>(pg.data(), N.data(), nbp, wg.data(), T, K, r); }, "mix_kernel");
  cmp("w", wg.data(), w, out_tol);
  // backward
  const auto cfg = shrink_backward_config(T, d, K, r, /*tensor_cores=*/true);
  std::vector<float> dpg(T * KR, NAN), pA(cfg.S * KR * d, NAN), pS(cfg.S_small * cfg.nq, NAN);
  std::vector<M> dplo(T * KR, M(NAN)), dxg(T * d, M(NAN));
  launch(dim3(unsigned(cuda::grid_1d(T * KR))), dim3(256), 0,
         [&] { dp_kernel<M, float>(dw.data(), N.data(), dpg.data(), dplo.data(), T, K, r); }, "dp_kernel");
  const std::vector<double> dp = dp_reference(N, dw, T, K, r);
  std::vector<double> dpr(T * KR);
  cmp("dp", dpg.data(), dp, 1e-5);
  cmp("dp_lo", dplo.data(), dp, out_tol);
  for (int64_t q = 0; q < T * KR; ++q) dpr[q] = f(dplo[q]);  // dx and dA are products of the rounded dp
  std::vector<double> dx(T * d, 0), dA(KR * d, 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < KR; ++o)
      for (int64_t j = 0; j < d; ++j) {
        dx[t * d + j] += dpr[t * KR + o] * f(A[o * d + j]);
        dA[o * d + j] += dpr[t * KR + o] * f(x[t * d + j]);
      }
  if (d > 0) {
    const auto dpo = make_operand<M>(dplo.data(), KR);
    launch(dim3(unsigned(cuda::ceil_div(T, kMM)), unsigned(cfg.nJ)), dim3(kMThreads), 0,
           [&] { dx_tc_kernel<M>(dpo, make_operand(A.data(), d), dxg.data(), T, d, KR); }, "dx_tc_kernel");
    launch(dim3(unsigned(cfg.nO), unsigned(cfg.nJ), unsigned(cfg.S)), dim3(kMThreads), 0,
           [&] { dA_tc_kernel<M>(dpo, make_operand(x, d), pA.data(), T, d, KR, cfg.per_split); }, "dA_tc_kernel");
    cmp("dx", dxg.data(), dx, out_tol);
    cmp("dA", sum_partials(pA, cfg.S, KR * d).data(), dA, 1e-5);
  }
  launch(dim3(unsigned(cuda::ceil_div(cfg.nq, 256)), unsigned(cfg.S_small)), dim3(256), 0, [&] {
    small_reductions_kernel<M, float>(dpg.data(), dw.data(), pg.data(), pS.data(), T, K, r, cfg.per_small);
  }, "small_reductions_kernel");
  const auto sS = sum_partials(pS, cfg.S_small, cfg.nq);
  std::vector<double> da(KR, 0), dN(K * r * r, 0), dn(KR, 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < KR; ++o) {
      da[o] += dp[t * KR + o];
      dn[o] += f(dw[t * KR + o]);
      const int64_t k = o / r;
      for (int64_t m = 0; m < r; ++m) dN[o * r + m] += f(dw[t * KR + o]) * f(pg[t * KR + k * r + m]);
    }
  cmp("da", sS.data(), da, 1e-5);
  cmp("dN", sS.data() + KR, dN, 1e-5);
  cmp("dn", sS.data() + KR + K * r * r, dn, 1e-5);
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  // odd sizes, partial tiles, hard and soft routing, both placements, with and without biases
  test_cam<float>(37, 1100, 3, 5, 0, true, true, false);
  test_cam<float>(37, 1100, 3, 5, 1, true, false, true);
  test_cam<double>(9, 1025, 2, 3, 1, true, true, false);
  test_cam<float>(1, 1, 1, 1, 0, false, false, false);
  test_cam<float>(3, 33, 1, 1, 1, true, true, true);
  test_cam<double>(3, 130, 8, 48, 1, true, true, true);  // large K*r: fewer threads, narrow lane groups
  // the 16-bit storage types cam_cuda.cu instantiates (float accumulation)
  test_cam<__nv_bfloat16, float>(37, 1100, 3, 5, 0, true, true, false);
  test_cam<__half, float>(19, 300, 4, 16, 1, true, true, true);
  // 16-byte row accesses (d a multiple of 8) with a partial last channel tile, soft and hard
  test_cam<__nv_bfloat16, float>(21, 264, 4, 16, 0, true, true, true);
  test_cam<__nv_bfloat16, float>(13, 520, 3, 5, 1, true, true, false);
  test_cam<__half, float>(9, 72, 2, 8, 0, false, true, true, true);     // misaligned view: scalar path
  test_cam<float>(17, 132, 4, 16, 0, true, true, true);                // float: 4 channels per lane
  test_cam<float>(0, 64, 2, 4, 0, true, true, true);                   // T = 0: nothing launched
  test_cam<__nv_bfloat16, float>(1, 8, 1, 1, 1, true, false, true);    // T = 1, one 16-byte lane
  test_cam<__nv_bfloat16, float>(700, 24, 2, 4, 0, true, true, true);  // two token splits
  test_cam<__nv_bfloat16, float>(45, 264, 3, 20, 1, true, true, 2);    // r > 16: two mma k-steps; skewed
  test_cam<__half, float>(40, 128, 8, 3, 0, false, true, 0);           // soft, K = 8: several dw rounds
  test_shrink<float>(37, 100, 3, 5, true);
  test_shrink<float>(1, 1, 1, 1, false);
  test_shrink<float>(100, 257, 4, 16, true);
  test_shrink<float>(5, 0, 2, 3, true);  // d == 0
  test_shrink_tc<__nv_bfloat16>(130, 264, 4, 16, true);      // 16-byte staging, partial tiles
  test_shrink_tc<__half>(37, 100, 3, 5, false);              // rows not a multiple of 8: scalar staging
  test_shrink_tc<__nv_bfloat16>(70, 72, 2, 8, true, 1);       // x off a 16-byte boundary
  test_shrink_tc<__half>(1, 1, 1, 1, true);
  test_shrink_tc<__nv_bfloat16>(33, 2600, 2, 8, true);        // three split-K pieces, the last partial
  test_shrink_tc<__half>(2100, 24, 2, 4, true);               // three token splits of dA (T / 1024)
  test_shrink<float>(2100, 20, 2, 3, true);
  test_shrink_tc<__nv_bfloat16>(5, 0, 2, 3, true);           // d == 0
  if (!quick) {
    test_cam<float>(37, 1100, 3, 5, 0, false, true, true);
    test_cam<float>(5, 300, 8, 64, 0, true, true, false);  // K*r = 512 in float
    test_cam<float>(70, 129, 4, 16, 0, true, true, true);
    test_shrink<double>(65, 70, 8, 64, true);
    test_shrink_tc<__half>(66, 136, 8, 16, false);             // K*r = 128: two column tiles
    test_shrink_tc<__nv_bfloat16>(200, 64, 8, 64, true);      // K*r = 512, many dA row tiles
  }
  std::printf("failures: %d\n", failures);
  return failures != 0;
}
