// Grouped specialist GEMMs on CPU: the shrink x -> p = A x + a -> w = N p + n for all K
// specialists reading each x row once, and its backward (dx, dA, da, dN, dn) with per-chunk
// partial reductions over tokens. Specialists whose dw row is all zero (not routed under hard
// routing) are skipped. Compiled once per instruction-set variant (csrc/cpu/isa.h): on its own as
// the baseline, by csrc/cpu/kernels_avx2_cpu.cpp as avx2.
#include "../cpu/kernel_includes.h"  // std/ATen headers: only through this list (see there)
#include "../cpu/isa.h"
#include "../common/cpu_rows.h"
#include "../common/cpu_utils.h"
#include "../common/hycam_math.h"
#include "../kernels.h"

namespace hycam {
namespace HYCAM_CPU_ISA {  // one copy per instruction-set variant (csrc/cpu/isa.h)
namespace {

constexpr int64_t kTokenBlock = 4;  // tokens sharing one pass over each row of A (rows::dots4)

template <typename scalar_t>
void shrink_impl(const ShrinkArgs& args, at::Tensor& p, at::Tensor& w) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = args.T, d = args.d, K = args.K, r = args.r, KR = K * r;
  const cpu::Widened<scalar_t, acc_t> Aw(args.A);
  const scalar_t* xp = args.x.data_ptr<scalar_t>();
  const scalar_t* abp = data_or_null<scalar_t>(args.A_bias);
  const scalar_t* Np = args.N.data_ptr<scalar_t>();
  const scalar_t* nbp = data_or_null<scalar_t>(args.N_bias);
  scalar_t* pp = p.data_ptr<scalar_t>();
  scalar_t* wp = w.data_ptr<scalar_t>();
  // N_k transposed, so that w = n + N p is r axpys over contiguous rows (independent lanes)
  // rather than r dot products of length r (one serial chain of FMAs each)
  std::vector<acc_t> Nt(K * r * r);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = 0; i < r; ++i)
      for (int64_t m = 0; m < r; ++m) Nt[(k * r + m) * r + i] = static_cast<acc_t>(Np[(k * r + i) * r + m]);
  const int64_t nblocks = (T + kTokenBlock - 1) / kTokenBlock;
  at::parallel_for(0, nblocks, 4, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> xb(kTokenBlock * d, acc_t(0)), pk(r), wk(r);
    std::vector<acc_t> pacc(kTokenBlock * KR);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * kTokenBlock, nt = std::min(kTokenBlock, T - t0);
      for (int64_t q = 0; q < nt; ++q) cpu::widen_row(xp + (t0 + q) * d, xb.data() + q * d, d);
      for (int64_t q = nt; q < kTokenBlock; ++q) std::fill(xb.begin() + q * d, xb.begin() + (q + 1) * d, acc_t(0));
      std::fill(pacc.begin(), pacc.end(), acc_t(0));
      rows::dots4(xb.data(), d, Aw.ptr, d, KR, d, pacc.data());  // each row of A read once per block
      for (int64_t q = 0; q < nt; ++q) {
        const int64_t t = t0 + q;
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t i = 0; i < r; ++i) {
            const acc_t v = pacc[q * KR + k * r + i] + (abp ? static_cast<acc_t>(abp[k * r + i]) : acc_t(0));
            pp[idx_tkr(t, k, i, K, r)] = static_cast<scalar_t>(v);
            // N acts on p as stored (rounded to scalar_t), as a chain of layers would
            pk[i] = static_cast<acc_t>(static_cast<scalar_t>(v));
          }
          for (int64_t i = 0; i < r; ++i) wk[i] = nbp ? static_cast<acc_t>(nbp[k * r + i]) : acc_t(0);
          rows::gemv_t(Nt.data() + k * r * r, r, pk.data(), r, wk.data(), r);
          for (int64_t i = 0; i < r; ++i) wp[idx_tkr(t, k, i, K, r)] = static_cast<scalar_t>(wk[i]);
        }
      }
    }
  });
}

template <typename scalar_t>
void shrink_backward_impl(const ShrinkBackwardArgs& args, at::Tensor& dx, at::Tensor& dA, at::Tensor& dAb,
                          at::Tensor& dN, at::Tensor& dNb) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = args.T, d = args.d, K = args.K, r = args.r, KR = K * r;
  const cpu::Widened<scalar_t, acc_t> Aw(args.A);
  const scalar_t* dwp = args.dw.data_ptr<scalar_t>();
  const scalar_t* xp = args.x.data_ptr<scalar_t>();
  const scalar_t* pp = args.p.data_ptr<scalar_t>();
  const scalar_t* Np = args.N.data_ptr<scalar_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();

  const cpu::Chunks chunks(T);
  const int64_t nA = KR * d, nN = K * r * r;
  std::vector<acc_t> dA_part(chunks.n * nA, 0), da_part(chunks.n * KR, 0), dN_part(chunks.n * nN, 0),
      dn_part(chunks.n * KR, 0);

  at::parallel_for(0, chunks.n, 1, [&](int64_t c0, int64_t c1) {
    constexpr int64_t kEB = rows::kExpandBlock;
    // DP [kEB, KR]: dp of a block of tokens (zero where unrouted); DX [kEB, d]: their dx, summed
    // over the specialists routed for any of them, one pass over A_k per specialist
    std::vector<acc_t> DP(kEB * KR), DX(kEB * d), dwk(r), prod(r * r);
    std::vector<int64_t> routed(K);            // tokens of the block routed to k
    std::vector<char> routed_mask(kEB * K);
    // dA_k += dp_k x^T, gathered per specialist over blocks of tokens
    std::vector<rows::BlockedRankUpdate<acc_t>> dAk(K, rows::BlockedRankUpdate<acc_t>(r, d, 16));
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* dAc = dA_part.data() + c * nA;
      acc_t* dac = da_part.data() + c * KR;
      acc_t* dNc = dN_part.data() + c * nN;
      acc_t* dnc = dn_part.data() + c * KR;
      for (int64_t tb = chunks.begin(c); tb < chunks.end(c); tb += kEB) {
        const int64_t nt = std::min(kEB, chunks.end(c) - tb);
        std::fill(DP.begin(), DP.end(), acc_t(0));
        std::fill(routed.begin(), routed.end(), 0);
        std::fill(routed_mask.begin(), routed_mask.end(), 0);
        for (int64_t q = 0; q < nt; ++q) {
          const int64_t t = tb + q;
          for (int64_t k = 0; k < K; ++k) {
            bool any = false;
            for (int64_t i = 0; i < r; ++i) {
              dwk[i] = static_cast<acc_t>(dwp[idx_tkr(t, k, i, K, r)]);
              any = any || dwk[i] != acc_t(0);
            }
            if (!any) continue;  // specialist k not routed for token t
            ++routed[k];
            routed_mask[q * K + k] = 1;
            // dN_k += dw_k p_k^T and dp_k = N_k^T dw_k, the products stored before they are summed:
            // no variant can fuse them into FMAs, so dN, dn and da (no row kernel in their path)
            // are bitwise the same in every instruction-set variant
            const scalar_t* ptk = pp + idx_tkr(t, k, 0, K, r);
            const scalar_t* Nk = Np + k * r * r;
            acc_t* dp = DP.data() + q * KR + k * r;
            for (int64_t i = 0; i < r; ++i) dnc[k * r + i] += dwk[i];
            for (int64_t i = 0; i < r; ++i)
              for (int64_t m = 0; m < r; ++m) prod[i * r + m] = dwk[i] * static_cast<acc_t>(ptk[m]);
            for (int64_t i = 0; i < r * r; ++i) dNc[k * r * r + i] += prod[i];
            for (int64_t i = 0; i < r; ++i)
              for (int64_t m = 0; m < r; ++m) prod[i * r + m] = static_cast<acc_t>(Nk[i * r + m]) * dwk[i];
            for (int64_t m = 0; m < r; ++m) dp[m] = acc_t(0);
            for (int64_t i = 0; i < r; ++i)
              for (int64_t m = 0; m < r; ++m) dp[m] += prod[i * r + m];
            for (int64_t i = 0; i < r; ++i) dac[k * r + i] += dp[i];
            cpu::widen_row(xp + t * d, dAk[k].push(dp), d);  // the x row, straight into the block
            if (dAk[k].full()) dAk[k].flush(dAc + k * r * d, nullptr);
          }
        }
        std::fill(DX.begin(), DX.end(), acc_t(0));
        for (int64_t k = 0; k < K; ++k) {
          const acc_t* Ak = Aw.ptr + k * r * d;
          if (routed[k] == nt) {  // every token of the block (soft routing): one pass over A_k
            rows::expand_block<acc_t>(Ak, nullptr, DP.data() + k * r, KR, nt, r, d, DX.data(), d);
          } else if (routed[k] > 0) {  // hard routing: only the tokens routed to k, one by one
            // (the same kernel with nq = 1: a token's dx never depends on its neighbours)
            for (int64_t q = 0; q < nt; ++q)
              if (routed_mask[q * K + k])
                rows::expand_block<acc_t>(Ak, nullptr, DP.data() + q * KR + k * r, KR, 1, r, d,
                                          DX.data() + q * d, d);
          }
        }
        for (int64_t q = 0; q < nt; ++q)
          for (int64_t j = 0; j < d; ++j) dxp[(tb + q) * d + j] = static_cast<scalar_t>(DX[q * d + j]);
      }
      for (int64_t k = 0; k < K; ++k) dAk[k].flush(dAc + k * r * d, nullptr);
    }
  });

  auto finish = [](const std::vector<acc_t>& part, int64_t n, at::Tensor& out) {
    std::vector<acc_t> tmp(out.numel());
    cpu::reduce_partials(part, n, out.numel(), tmp.data());
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t q = 0; q < out.numel(); ++q) o[q] = static_cast<scalar_t>(tmp[q]);
  };
  finish(dA_part, chunks.n, dA);
  finish(da_part, chunks.n, dAb);
  finish(dN_part, chunks.n, dN);
  finish(dn_part, chunks.n, dNb);
}

}  // namespace

ShrinkOut shrink_cpu(const ShrinkArgs& args) {
  auto p = at::empty({args.T, args.K, args.r}, args.x.options());
  auto w = at::empty({args.T, args.K, args.r}, args.x.options());
  if (args.T == 0) return {p, w};
  HYCAM_CPU_DISPATCH(args.x.scalar_type(), "hycam_shrink_cpu", [&] { shrink_impl<scalar_t>(args, p, w); });
  return {p, w};
}

ShrinkBackwardOut shrink_backward_cpu(const ShrinkBackwardArgs& args) {
  auto dx = at::zeros_like(args.x);
  auto dA = at::zeros_like(args.A);
  auto dAb = at::zeros({args.K, args.r}, args.A.options());
  auto dN = at::zeros_like(args.N);
  auto dNb = at::zeros({args.K, args.r}, args.N.options());
  if (args.T == 0) return {dx, dA, dAb, dN, dNb};
  HYCAM_CPU_DISPATCH(args.x.scalar_type(), "hycam_shrink_backward_cpu", [&] {
    shrink_backward_impl<scalar_t>(args, dx, dA, dAb, dN, dNb);
  });
  return {dx, dA, dAb, dN, dNb};
}

// the entry points csrc/cpu/dispatch_cpu.cpp collects
static_assert(std::is_same_v<decltype(shrink_cpu), ShrinkFn>, "shrink_cpu: see kernels.h");
static_assert(std::is_same_v<decltype(shrink_backward_cpu), ShrinkBackwardFn>, "shrink_backward_cpu: see kernels.h");

}  // namespace HYCAM_CPU_ISA
}  // namespace hycam
