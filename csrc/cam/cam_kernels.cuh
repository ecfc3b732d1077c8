// Kernels of the fused CAM forward/backward (launched by cam_cuda.cu). The element maths is
// hycam_math.h, shared with the CPU kernels (cam_cpu.cpp).
//
// Geometry (both kernels): a block owns a channel tile of jt = lpr * V channels, V = 16 bytes of
// scalar_t (8 half/bfloat16, 4 float, 2 double), and works on `rows` = kThreads / lpr tokens at
// once: the lpr lanes of a row group each own V consecutive channels of one token, so every [T, d]
// stream moves in 16-byte accesses (a scalar tail where d is not a multiple of V, the view is
// misaligned, or the channel tile is the last one). The block stages its tile of B once, transposed
// to [K][r][jt] in shared memory, so a lane reads the B values of its channels for one rank index
// as one 16-byte shared-memory load (rather than r-strided 2-byte global loads, a few useful bytes
// per 32-byte sector).
//
// The backward is one pass over [T, d]: d_main and dz (elementwise), dg and dw (reductions over
// channels: lane groups, then one partial per channel tile in pdg and, for routed (token,
// specialist) pairs only, pdw), dB and db (reductions over tokens: the block's du values go
// through shared memory into per-block accumulators, one partial per token split in pB) and the
// sum of dz over tokens, the gradient of the optional z_bias (per-lane running sums in shared
// memory, then per split in pB: no second pass over dz). z_bias (c = 1 + silu(z + z_bias) + ...)
// lets the shared projection's bias live in this op instead of the GEMM's epilogue. The
// partials are summed in a fixed order: pB by sum_partials_kernel, pdw and pdg by sum_dwdg_kernel
// (zeros for the unrouted pairs' dw, whose partials are never written). No
// atomics: results are bitwise reproducible, and every split and tile count depends only on the
// shape (never on the GPU), so they are the same on every GPU model.
//
// Global memory is read and written only through cuda::ld / cuda::st (cuda::ld_row / st_row for
// the row vectors): plain accesses under nvcc, counted under the emulation. Compiles with nvcc,
// and with a C++ compiler under HYCAM_CUDA_EMULATION (csrc/emulation/cuda_emulation.h; the
// emulation tests and benchmarks/gpu_model.py).
//
// Both kernels take one CamParams (below), filled once by the launcher; the backward's phases are
// device functions over one BackwardView of the block.
#pragma once

#include <type_traits>

#include "../common/cuda_device.cuh"
#include "../common/cuda_mma.cuh"
#include "../common/hycam_math.h"

namespace hycam {
namespace cam_kernels {

constexpr int64_t kThreads = 256;  // threads per block (fewer only when K * r is large)
// Shared memory the tiling may use per block: the opt-in limit of sm_86/sm_89 (99 KB, the smallest
// of the sm_80+ GPUs), so that every sm_80+ GPU picks the same tiling and sums in the same order.
constexpr int64_t kSmemBudget = 99 * 1024;
constexpr int64_t kFwdTokens = 64;      // tokens per forward block (rounded up to a multiple of rows)
constexpr int64_t kMaxSplits = 16;      // token splits of the backward (partials pB [S, K * (r + 1) (+ 1), d])
constexpr int64_t kSplitTokens = 512;   // at least this many tokens per split

HYCAM_HD int64_t align16(int64_t x) { return (x + 15) / 16 * 16; }
HYCAM_HD int64_t align32(int64_t x) { return (x + 31) / 32 * 32; }

// Shared-memory layout (byte offsets, each 32-byte aligned). Bs [K][rb][bst] and bs [K][jt] in
// scalar_t (rb = r, or r rounded up to 16 with zero rows for the tensor-core expand; the row
// stride bst is jt, plus 16 bytes of padding for the tensor-core expand, see b_stride); ws
// [tokens][K][rp] (rp: r rounded up to 16 bytes of acc_t, zero padded, so that w is read as
// 16-byte broadcasts; not in the tensor-core backward, which keeps w only as wh) and gs
// [tokens][K] in acc_t; backward only: the tokens routed to each specialist tl [K][tokens], their
// count tn [K] and the first phase-1b item of each specialist istart [K + 1] (int); tensor-core
// expand only: w in scalar_t, wh [tokens16][K * rb + 8] (tokens16 = tokens rounded up to 16, the
// mma's M; 8 elements of row padding, see wh_stride; zero past the tile's tokens and past r; the
// mma's operand and phase 2's w); du [max(tokens, tokens16)][K][jt] (token stride du_stride), the dB / db accumulators acc [K][r + 1][jt] and, when z_bias is given (dz_sums),
// the sums of dz zs [tokens][jt] (one row per lane group, summed over the rows at the end) in acc_t.
//
// The backward keeps its channels in "x order": du, acc and (both staged by the backward) Bs and
// bs hold channel jl = lane * V + c of the tile at x = (c / P) * lpr * P + lane * P + c % P, where
// P is 16 bytes of acc_t (4 float, 2 double). A lane's V channels are V / P runs of P, and the runs
// of one lane group are contiguous, so each per-lane access (16 bytes of du, P elements of B) is
// part of one contiguous stretch of the lane group: no bank conflicts. For float and double
// V == P and x order is channel order; for 16-bit types a lane reads its B values as two 8-byte
// runs. The tensor-core expand writes u in x order because Bs is in x order, and each du value
// replaces the u it came from. The forward keeps channel order (x_pos with P = V).
struct Layout {
  int64_t b, w, g, tl, tn, wh, du, acc, zs, total;
};
// du's token stride: K * jt plus a pad that puts the rows sharing a quarter-warp (lpr < 8) on
// different banks and makes the mma's row stride 8 words off a multiple of 32 (lpr >= 8).
HYCAM_HD int64_t du_stride(int64_t K, int64_t jt, int64_t lpr, int64_t acc) {
  return K * jt + (lpr >= 8 ? 32 : lpr * 16) / acc;
}
HYCAM_HD int64_t w_stride(int64_t r, int64_t acc) { return align16(r * acc) / acc; }
HYCAM_HD int64_t b_rows(int64_t r, bool tc) { return tc ? (r + 15) / 16 * 16 : r; }
// Row strides of the tensor-core operands in shared memory (16-bit elements). A fragment load
// (LDSM) reads 8 rows of 16 bytes per phase; a row stride that is an odd number of 16-byte units
// puts the 8 rows on 8 different groups of 4 banks (conflict-free). jt and K * rb are multiples
// of 16 elements (an even number of 16-byte units, which put every row on the same banks: 8-way
// conflicts), so both get 8 elements (16 bytes) of padding. The pad is never read. Without the
// tensor-core expand Bs rows are jt long (the lanes read a row's contiguous runs: no conflicts).
HYCAM_HD int64_t b_stride(int64_t jt, bool tc) { return tc ? jt + 8 : jt; }
HYCAM_HD int64_t wh_stride(int64_t K, int64_t rb) { return K * rb + 8; }
// x order (see Layout): the position of tile channel jl
HYCAM_HD int64_t x_pos(int64_t jl, int64_t lpr, int64_t V, int64_t P) {
  const int64_t li = jl / V, c = jl % V;
  return (c / P) * lpr * P + li * P + c % P;
}
HYCAM_HD Layout cam_layout(int64_t K, int64_t r, int64_t jt, int64_t lpr, int64_t tokens, int64_t elem,
                           int64_t acc, bool backward, bool tc, bool dz_sums) {
  Layout L;
  const int64_t rb = b_rows(r, tc), tokens16 = (tokens + 15) / 16 * 16;
  int64_t o = align32(K * rb * b_stride(jt, tc) * elem);
  L.b = o;
  o = align32(o + K * jt * elem);
  L.w = o;  // the tensor-core backward keeps w only in scalar_t (wh), not in acc_t
  o = align32(o + (backward && tc ? 0 : tokens * K * w_stride(r, acc) * acc));
  L.g = o;
  o = align32(o + tokens * K * acc);
  L.tl = L.tn = L.wh = L.du = L.acc = L.zs = o;
  if (backward) {
    L.tl = o;
    o = align32(o + K * tokens * 4);
    L.tn = o;
    o = align32(o + (2 * K + 1) * 4);  // tn [K], then phase 1b's first item of each specialist [K + 1]
    L.wh = o;
    if (tc) o = align32(o + tokens16 * wh_stride(K, rb) * elem);
    L.du = o;
    o = align32(o + (tc ? tokens16 : tokens) * du_stride(K, jt, lpr, acc) * acc);
    L.acc = o;
    o = align32(o + K * (r + 1) * jt * acc);
    L.zs = o;  // each thread's sums of dz over its tokens: [tokens][jt] in x order
    if (dz_sums) o = align32(o + tokens * jt * acc);
  }
  L.total = o;
  return L;
}

// Stage B[:, j0:j0+jt, :] (global [K, d, r]) as Bs [K][rb][bst] and b[:, j0:j0+jt] as bs [K][jt],
// channel jl at x_pos(jl, lpr, V, P) (P = V: channel order), zero past d (so that lanes past d
// compute zeros) and in the rows r..rb; the bst - jt padding elements of a row are not written.
// 16-byte loads when `vec`.
template <typename scalar_t>
HYCAM_DEVICE void stage_B(scalar_t* Bs, scalar_t* bs, const scalar_t* __restrict__ B, const scalar_t* __restrict__ b,
                          int64_t j0, int64_t jt, int64_t bst, int64_t d, int64_t K, int64_t r, int64_t rb,
                          bool vec, int64_t lpr, int64_t P) {
  constexpr int V = cuda::Pack16<scalar_t>::kN;
  const int64_t per_k = jt * r, nvalid = (d - j0 < jt ? d - j0 : jt) * r;
  for (int64_t q = static_cast<int64_t>(threadIdx.x) * V; q < K * per_k; q += static_cast<int64_t>(blockDim.x) * V) {
    const int64_t k = q / per_k, f = q % per_k;  // per_k is a multiple of V: a chunk stays in one k
    const scalar_t* src = B + (k * d + j0) * r + f;
    scalar_t e[V];
    if (vec && f + V <= nvalid) {
      const cuda::Pack16<scalar_t> p = cuda::ld(reinterpret_cast<const cuda::Pack16<scalar_t>*>(src));
      for (int c = 0; c < V; ++c) e[c] = p.v[c];
    } else {
      for (int c = 0; c < V; ++c) e[c] = f + c < nvalid ? cuda::ld(src + c) : static_cast<scalar_t>(0.0f);
    }
    for (int c = 0; c < V; ++c) {
      const int64_t jl = (f + c) / r, i = (f + c) % r;
      cuda::sst(Bs + (k * rb + i) * bst + x_pos(jl, lpr, V, P), e[c]);
    }
  }
  for (int64_t q = threadIdx.x; q < K * (rb - r) * jt; q += blockDim.x) {
    const int64_t k = q / ((rb - r) * jt), f = q % ((rb - r) * jt);
    cuda::sst(Bs + (k * rb + r + f / jt) * bst + f % jt, static_cast<scalar_t>(0.0f));
  }
  for (int64_t q = threadIdx.x; q < K * jt; q += blockDim.x) {
    const int64_t k = q / jt, jl = q % jt, j = j0 + jl;
    cuda::sst(bs + k * jt + x_pos(jl, lpr, V, P), (b && j < d) ? cuda::ld(b + k * d + j) : static_cast<scalar_t>(0.0f));
  }
}

// Stage w[t0:t0+tokens] (global [T, K, r]) as ws [tokens][K][rp], zeros past nt tokens and past r.
template <typename scalar_t, typename acc_t>
HYCAM_DEVICE void stage_w(acc_t* ws, const scalar_t* __restrict__ w, int64_t t0, int64_t nt, int64_t tokens,
                          int64_t K, int64_t r) {
  const int64_t rp = w_stride(r, sizeof(acc_t));
  for (int64_t q = threadIdx.x; q < tokens * K * rp; q += blockDim.x) {
    const int64_t tk = q / rp, i = q % rp;  // tk = tt * K + k
    cuda::sst(ws + q, (i < r && tk < nt * K) ? static_cast<acc_t>(cuda::ld(w + (t0 * K + tk) * r + i)) : acc_t(0));
  }
}

// The V values of lane li in a shared-memory row of x order with runs of P (see Layout): V / P
// accesses of P * sizeof(T) bytes, as acc_t (P = V: one access at li * V, channel order).
template <int V, int P, typename T, typename acc_t>
HYCAM_DEVICE void lds_lane(const T* row, int64_t li, int64_t lpr, acc_t* out HYCAM_SITE_PARAM) {
#pragma unroll
  for (int g = 0; g < V / P; ++g) {
    const T* p = row + g * lpr * P + li * P;
    cuda::check_smem_aligned(p, P * sizeof(T) HYCAM_SITE_ARG);
    const auto q = *reinterpret_cast<const cuda::VecN<T, P>*>(p);
#pragma unroll
    for (int c = 0; c < P; ++c) out[g * P + c] = static_cast<acc_t>(q.v[c]);
  }
}
template <int V, int P, typename acc_t>
HYCAM_DEVICE void sts_lane(acc_t* row, int64_t li, int64_t lpr, const acc_t* in HYCAM_SITE_PARAM) {
#pragma unroll
  for (int g = 0; g < V / P; ++g) {
    cuda::VecN<acc_t, P> q;
#pragma unroll
    for (int c = 0; c < P; ++c) q.v[c] = in[g * P + c];
    acc_t* p = row + g * lpr * P + li * P;
    cuda::check_smem_aligned(p, P * sizeof(acc_t) HYCAM_SITE_ARG);
    *reinterpret_cast<cuda::VecN<acc_t, P>*>(p) = q;
  }
}

// u[c] = b_k[j] + sum_i w_k[i] B_k[j, i] for the V channels of lane li (B and b from shared
// memory in x order with runs of P; w_k 16-byte aligned and zero padded to a multiple of 16 bytes).
template <int V, int P, typename scalar_t, typename acc_t>
HYCAM_DEVICE void expand_lane(const scalar_t* Bs, const scalar_t* bs, const acc_t* wk, int64_t k, int64_t r,
                              int64_t rb, int64_t jt, int64_t bst, int64_t li, int64_t lpr, acc_t* u) {
  constexpr int W = cuda::Pack16<acc_t>::kN;
  lds_lane<V, P>(bs + k * jt, li, lpr, u);
  for (int64_t i0 = 0; i0 < r; i0 += W) {
    cuda::check_smem16(wk + i0);
    const auto wv = *reinterpret_cast<const cuda::Pack16<acc_t>*>(wk + i0);
#pragma unroll
    for (int p = 0; p < W; ++p) {
      if (i0 + p < r) {
        acc_t Bv[V];
        lds_lane<V, P>(Bs + (k * rb + i0 + p) * bst, li, lpr, Bv);
#pragma unroll
        for (int c = 0; c < V; ++c) u[c] += Bv[c] * wv.v[p];
      }
    }
  }
}

// The row of an optional [T, d] input (a), zeros when it is absent.
template <typename scalar_t, typename acc_t>
HYCAM_DEVICE void ld_row_or_zero(const scalar_t* __restrict__ p, int64_t e, bool vec, int64_t valid, acc_t* out) {
  if (p) {
    cuda::ld_row(p + e, vec, valid, out);
  } else {
#pragma unroll
    for (int c = 0; c < cuda::Pack16<scalar_t>::kN; ++c) out[c] = acc_t(0);
  }
}

// z += z_bias[j .. j + V) when the bias is given (an L1 hit after the block's first token).
template <typename scalar_t, typename acc_t>
HYCAM_DEVICE void add_z_bias(const scalar_t* __restrict__ zb, int64_t j, bool vec, int64_t valid, acc_t* zv) {
  if (zb) {
    acc_t bv[cuda::Pack16<scalar_t>::kN];
    cuda::ld_row(zb + j, vec, valid, bv);
#pragma unroll
    for (int c = 0; c < cuda::Pack16<scalar_t>::kN; ++c) zv[c] += bv[c];
  }
}

// ---------------------------------------------------------------------------------------
// The kernels' parameters: one struct, filled once by the launcher (cam_cuda.cu, from the op's
// CamArgs) or an emulation driver, and passed by value (__grid_constant__ under nvcc: read in place
// from the parameter space, as separate arguments would be). Optional inputs are nullptr when
// absent. The forward reads the inputs and writes out; the backward also reads go and writes
// d_main, dz and the partials. The inputs are read with plain global loads (LDG.E, cached in L1 on
// sm_80+): nvcc takes the read-only path (LDG.E.CONSTANT) by itself only for restrict-qualified
// pointer arguments, not for a struct's pointers, and asking for it (__ldg) lets it hoist the row
// loads of the next token, which costs the 16-bit forward 10 registers (a block fewer per SM).
// ---------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
struct CamParams {
  // inputs: h_in, a (optional), z, go (backward) [T, d]; z_bias [d] (optional); w [T, K, r];
  // B [K, d, r]; b [K, d] (optional); g [T, K]
  const scalar_t* h_in = nullptr;
  const scalar_t* a = nullptr;
  const scalar_t* z = nullptr;
  const scalar_t* z_bias = nullptr;
  const scalar_t* w = nullptr;
  const scalar_t* B = nullptr;
  const scalar_t* b = nullptr;
  const scalar_t* g = nullptr;
  const scalar_t* go = nullptr;
  // forward output [T, d]
  scalar_t* out = nullptr;
  // backward outputs: d_main, dz [T, d]; the partials pdw [nJ, T, K, r] (routed pairs only),
  // pdg [nJ, T, K] and pB [S, K * (r + 1) (+ 1 with z_bias), d]
  scalar_t* d_main = nullptr;
  scalar_t* dz = nullptr;
  acc_t* pdw = nullptr;
  acc_t* pdg = nullptr;
  acc_t* pB = nullptr;
  int64_t T = 0, d = 0, K = 0, r = 0;
  acc_t scale = 0;
  Placement placement = Placement::RESIDUAL;
  // launch geometry (cam_forward_config / cam_backward_config): lanes per token row, tokens per
  // block (forward), tokens per split (backward)
  int64_t lpr = 0, tile = 0, per_split = 0;
  // 16-byte accesses of the [T, d] rows and z_bias (vec_io) and of B (vec_B): set_vector_access
  bool vec_io = false, vec_B = false;
};

// Host side: vec_io and vec_B as the launchers set them. 16-byte row accesses need rows of a
// multiple of 16 bytes and every [T, d] base (and z_bias) 16-byte aligned; 16-byte loads of B
// need d * r a multiple of 16 bytes and B 16-byte aligned.
template <typename scalar_t, typename acc_t>
inline void set_vector_access(CamParams<scalar_t, acc_t>& p) {
  const auto aligned16 = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  const int64_t elem = sizeof(scalar_t);
  p.vec_io = (p.d * elem) % 16 == 0;
  for (const void* q : {static_cast<const void*>(p.h_in), static_cast<const void*>(p.a),
                        static_cast<const void*>(p.z), static_cast<const void*>(p.z_bias),
                        static_cast<const void*>(p.go), static_cast<const void*>(p.out),
                        static_cast<const void*>(p.d_main), static_cast<const void*>(p.dz)})
    if (q != nullptr && !aligned16(q)) p.vec_io = false;
  p.vec_B = (p.d * p.r * elem) % 16 == 0 && aligned16(p.B);
}

// ---------------------------------------------------------------------------------------
// forward: grid (token tiles, channel tiles)
// ---------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
HYCAM_GLOBAL void cam_forward_kernel(const HYCAM_GRID_CONSTANT CamParams<scalar_t, acc_t> params) {
  constexpr int V = cuda::Pack16<scalar_t>::kN;
  HYCAM_DYNAMIC_SMEM(smem);
  const CamParams<scalar_t, acc_t>& p = params;
  const int64_t T = p.T, d = p.d, K = p.K, r = p.r, lpr = p.lpr, tile = p.tile;
  const int64_t jt = lpr * V, rows = blockDim.x / lpr, rp = w_stride(r, sizeof(acc_t));
  const Layout L = cam_layout(K, r, jt, lpr, tile, sizeof(scalar_t), sizeof(acc_t), false, false, false);
  scalar_t* Bs = reinterpret_cast<scalar_t*>(smem);
  scalar_t* bs = reinterpret_cast<scalar_t*>(smem + L.b);
  acc_t* ws = reinterpret_cast<acc_t*>(smem + L.w);
  acc_t* gs = reinterpret_cast<acc_t*>(smem + L.g);
  const int64_t t0 = blockIdx.x * tile, nt = min(tile, T - t0), j0 = blockIdx.y * jt;
  stage_B(Bs, bs, p.B, p.b, j0, jt, jt, d, K, r, r, p.vec_B, lpr, V);
  stage_w(ws, p.w, t0, nt, tile, K, r);
  for (int64_t q = threadIdx.x; q < nt * K; q += blockDim.x) gs[q] = static_cast<acc_t>(cuda::ld(p.g + t0 * K + q));
  __syncthreads();
  const int64_t li = threadIdx.x % lpr, j = j0 + li * V, valid = d - j;
  if (valid <= 0) return;
  for (int64_t tt = threadIdx.x / lpr; tt < nt; tt += rows) {
    const int64_t e = idx_td(t0 + tt, j, d);
    acc_t hv[V], zv[V], av[V], spec[V], u[V];
    cuda::ld_row(p.h_in + e, p.vec_io, valid, hv);
    cuda::ld_row(p.z + e, p.vec_io, valid, zv);
    add_z_bias(p.z_bias, j, p.vec_io, valid, zv);
    ld_row_or_zero(p.a, e, p.vec_io, valid, av);
#pragma unroll
    for (int c = 0; c < V; ++c) spec[c] = 0;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t gk = gs[tt * K + k];
      if (gk == acc_t(0)) continue;  // hard routing: only the routed specialist is expanded
      expand_lane<V, V>(Bs, bs, ws + (tt * K + k) * rp, k, r, r, jt, jt, li, lpr, u);
#pragma unroll
      for (int c = 0; c < V; ++c) spec[c] += gk * silu(p.scale * u[c]);
    }
#pragma unroll
    for (int c = 0; c < V; ++c) hv[c] = modulate(p.placement, hv[c], av[c], cam_value(zv[c], spec[c]));
    cuda::st_row(p.out + e, p.vec_io, valid, hv);
  }
}

// ---------------------------------------------------------------------------------------
// backward: grid (channel tiles, token splits). Per tile of `rows` tokens: stage w, g and the
// token lists (backward_stage_tile); with tensor cores, u of every token and specialist into du
// (backward_expand_tc); phase 1 (a token per lane group, backward_elementwise): elementwise
// grads, dg partials (pdg [nJ, T, K]), du into shared memory; then, after one barrier, phase 1b
// (up to kDwTokens tokens routed to one specialist per lane group, backward_dw): the dw partials
// of routed pairs (pdw [nJ, T, K, r]); phase 2 (two (k, x) columns per thread, backward_dB): the
// dB / db accumulators += du * w over the tile's tokens routed to k; with z_bias, each lane adds
// its dz values to its row of zs. At the end (backward_write_partials) the accumulators go to
// pB [S, K * (r + 1) (+ 1 with z_bias), d] (row k * (r + 1) + r = db_k) and the rows of zs, summed,
// to its last row (the sum of dz over the split's tokens: the gradient of z_bias).
// ---------------------------------------------------------------------------------------
constexpr int kDwTokens = 4;  // tokens of one specialist that share each B load of phase 1b

// One block's view of the backward: the parameters, the tile geometry, this thread's lane and
// channels, and the shared-memory arrays of the Layout. Built once per block (backward_view);
// every phase reads it.
template <typename scalar_t, typename acc_t>
struct BackwardView {
  CamParams<scalar_t, acc_t> p;
  int64_t jt, rows, R1, rp;  // channels per tile, tokens per tile, r + 1, w's row stride in ws
  bool tc;                   // the tensor-core expand
  int64_t rb, rows16, bst;   // B's rows and row stride in Bs, rows rounded up to 16
  bool dz_sums;              // z_bias given: sum dz over the tokens
  int64_t dst;               // du's token stride
  scalar_t* Bs;
  scalar_t* bs;
  acc_t* ws;
  acc_t* gs;
  int* tl;
  int* tn;
  int* istart;
  scalar_t* wh;
  acc_t* dus;
  acc_t* accs;
  acc_t* zss;
  int64_t j0, split, KR1, nB;  // first channel, token split, pB's rows (KR1 = K * R1, nB: + dz sums)
  int64_t ts0, ts1;            // the split's tokens
  acc_t* pdw_j;                // this channel tile's partials
  acc_t* pdg_j;
  int64_t li, row, j, valid;   // lane in the row group, row group, first channel; valid <= 0: past d
};

template <typename scalar_t, typename acc_t, typename M>
HYCAM_DEVICE BackwardView<scalar_t, acc_t> backward_view(const CamParams<scalar_t, acc_t>& params,
                                                        unsigned char* smem) {
  constexpr int V = cuda::Pack16<scalar_t>::kN;
  BackwardView<scalar_t, acc_t> v;
  v.p = params;
  const int64_t T = v.p.T, d = v.p.d, K = v.p.K, r = v.p.r, lpr = v.p.lpr;
  v.jt = lpr * V;
  v.rows = blockDim.x / lpr;
  v.R1 = r + 1;
  v.rp = w_stride(r, sizeof(acc_t));
  v.tc = !std::is_void_v<M> && v.jt % 16 == 0;
  v.rb = b_rows(r, v.tc);
  v.rows16 = (v.rows + 15) / 16 * 16;
  v.bst = b_stride(v.jt, v.tc);
  v.dz_sums = v.p.z_bias != nullptr;  // as cam_backward_config was told
  const Layout L = cam_layout(K, r, v.jt, lpr, v.rows, sizeof(scalar_t), sizeof(acc_t), true, v.tc, v.dz_sums);
  v.dst = du_stride(K, v.jt, lpr, sizeof(acc_t));
  v.Bs = reinterpret_cast<scalar_t*>(smem);
  v.bs = reinterpret_cast<scalar_t*>(smem + L.b);
  v.ws = reinterpret_cast<acc_t*>(smem + L.w);
  v.gs = reinterpret_cast<acc_t*>(smem + L.g);
  v.tl = reinterpret_cast<int*>(smem + L.tl);
  v.tn = reinterpret_cast<int*>(smem + L.tn);
  v.istart = v.tn + K;
  v.wh = reinterpret_cast<scalar_t*>(smem + L.wh);
  v.dus = reinterpret_cast<acc_t*>(smem + L.du);
  v.accs = reinterpret_cast<acc_t*>(smem + L.acc);
  v.zss = reinterpret_cast<acc_t*>(smem + L.zs);
  v.j0 = blockIdx.x * v.jt;
  v.split = blockIdx.y;
  v.KR1 = K * v.R1;
  v.nB = v.KR1 + (v.dz_sums ? 1 : 0);
  v.ts0 = v.split * v.p.per_split;
  v.ts1 = min(T, v.ts0 + v.p.per_split);
  v.pdw_j = v.p.pdw + static_cast<int64_t>(blockIdx.x) * T * K * r;
  v.pdg_j = v.p.pdg + static_cast<int64_t>(blockIdx.x) * T * K;
  v.li = threadIdx.x % lpr;
  v.row = threadIdx.x / lpr;
  v.j = v.j0 + v.li * V;
  v.valid = d - v.j;
  return v;
}

// Stage the block's tile of B and b; zero the dB / db accumulators and the dz sums.
template <typename scalar_t, typename acc_t>
HYCAM_DEVICE void backward_init(const BackwardView<scalar_t, acc_t>& view) {
  constexpr int P = cuda::Pack16<acc_t>::kN;
  const auto& p = view.p;
  stage_B(view.Bs, view.bs, p.B, p.b, view.j0, view.jt, view.bst, p.d, p.K, p.r, view.rb, p.vec_B, p.lpr, P);
  for (int64_t q = threadIdx.x; q < p.K * view.R1 * view.jt; q += blockDim.x) cuda::sst(view.accs + q, acc_t(0));
  if (view.dz_sums)
    for (int64_t q = threadIdx.x; q < view.rows * view.jt; q += blockDim.x) cuda::sst(view.zss + q, acc_t(0));
}

// The tile of nt tokens from t0: w (in scalar_t as wh for the tensor cores, else in acc_t as ws),
// g as gs, and the tokens routed to each specialist (tl, tn).
template <typename scalar_t, typename acc_t>
HYCAM_DEVICE void backward_stage_tile(const BackwardView<scalar_t, acc_t>& view, int64_t t0, int64_t nt) {
  const auto& p = view.p;
  const int64_t K = p.K, r = p.r, rows = view.rows;
  __syncthreads();  // the previous tile's phases 1b and 2 are done with ws / wh, gs, tl, du
  if (view.tc) {  // w in scalar_t for the mma and phase 2: [rows16][K * rb (+ pad)], zero padded
    const int64_t whs = wh_stride(K, view.rb);
    for (int64_t q = threadIdx.x; q < view.rows16 * K * view.rb; q += blockDim.x) {
      const int64_t tk = q / view.rb, i = q % view.rb;
      cuda::sst(view.wh + tk / K * whs + tk % K * view.rb + i,
                i < r && tk < nt * K ? cuda::ld(p.w + (t0 * K + tk) * r + i) : static_cast<scalar_t>(0.0f));
    }
  } else {
    stage_w(view.ws, p.w, t0, nt, rows, K, r);
  }
  for (int64_t q = threadIdx.x; q < rows * K; q += blockDim.x)
    view.gs[q] = q < nt * K ? static_cast<acc_t>(cuda::ld(p.g + t0 * K + q)) : acc_t(0);
  __syncthreads();
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {  // tokens routed to each specialist
    int n = 0;
    for (int64_t tt = 0; tt < rows; ++tt)
      if (view.gs[tt * K + k] != acc_t(0)) view.tl[k * rows + n++] = static_cast<int>(tt);
    view.tn[k] = n;
  }
  __syncthreads();
}

// With tensor cores (tc): u[tt][k][x] = sum_i w[tt, k, i] B[k, x, i] into du, 16 x 16 tiles.
// Each warp takes a contiguous run of the (mi, k, n) tiles and loads the w tile of an (mi, k)
// once for all its n when r <= 16.
template <typename scalar_t, typename acc_t, typename M>
HYCAM_DEVICE void backward_expand_tc(const BackwardView<scalar_t, acc_t>& view) {
  if constexpr (!std::is_void_v<M>) {
    if (view.tc) {
#if HYCAM_MMA_AVAILABLE
      const int64_t K = view.p.K, rb = view.rb, bst = view.bst, dst = view.dst, jt = view.jt;
      const int64_t nwarps = blockDim.x / 32, nf = jt / 16, nfrag = view.rows16 / 16 * K * nf;
      const int64_t per = (nfrag + nwarps - 1) / nwarps, wid = threadIdx.x / 32;
      const int64_t f1 = min(nfrag, (wid + 1) * per);
      const M* whm = reinterpret_cast<const M*>(view.wh);
      const M* Bm = reinterpret_cast<const M*>(view.Bs);
      for (int64_t f = wid * per; f < f1;) {
        const int64_t mk = f / nf, mi = mk / K, k = mk % K, fe = min(f1, (mk + 1) * nf);
        mma::FragA<M, true> fa;
        bool have_a = false;
        for (; f < fe; ++f) {
          const int64_t n = f % nf;
          mma::FragC uacc;
          mma::zero(uacc);
          for (int64_t i0 = 0; i0 < rb; i0 += 16) {
            if (rb > 16 || !have_a) {
              mma::load_a<true>(fa, whm + mi * 16 * wh_stride(K, rb) + k * rb + i0,
                                static_cast<unsigned>(wh_stride(K, rb)));
              have_a = true;
            }
            mma::FragB<M, true> fb;
            mma::load_b<true>(fb, Bm + (k * rb + i0) * bst + n * 16, static_cast<unsigned>(bst));
            mma::mma(uacc, fa, fb);
          }
          mma::store(view.dus + mi * 16 * dst + k * jt + n * 16, uacc, static_cast<unsigned>(dst));
        }
      }
#endif
      __syncthreads();
    }
  }
}

// Phase 1, token t0 + row for the lane group (rows past nt compute zeros, store nothing): the
// elementwise gradients (d_main, dz, the dz sums), the dg partials, and du of every specialist
// the token is routed to in shared memory (replacing the tensor-core expand's u).
template <typename scalar_t, typename acc_t>
HYCAM_DEVICE void backward_elementwise(const BackwardView<scalar_t, acc_t>& view, int64_t t0, int64_t nt) {
  constexpr int V = cuda::Pack16<scalar_t>::kN, P = cuda::Pack16<acc_t>::kN;
  const int64_t d = view.p.d, K = view.p.K, r = view.p.r, lpr = view.p.lpr, jt = view.jt, rp = view.rp, rb = view.rb,
                bst = view.bst, dst = view.dst, li = view.li, row = view.row, j = view.j, valid = view.valid;
  const auto go = view.p.go;
  const auto h_in = view.p.h_in;
  const auto a = view.p.a;
  const auto z = view.p.z;
  const auto zb = view.p.z_bias;
  const auto d_main = view.p.d_main;
  const auto dz = view.p.dz;
  const auto s = view.p.scale;
  const auto placement = view.p.placement;
  const auto vec_io = view.p.vec_io;
  const auto tc = view.tc;
  const auto dz_sums = view.dz_sums;
  const auto Bs = view.Bs;
  const auto bs = view.bs;
  const auto ws = view.ws;
  const auto gs = view.gs;
  const auto dus = view.dus;
  const auto zss = view.zss;
  const auto pdg_j = view.pdg_j;
  const int64_t tt = row, t = t0 + tt;
  const bool active = tt < nt;
  const int64_t lv = active ? valid : 0;
  const int64_t e = idx_td(active ? t : 0, j, d);
  acc_t gov[V], hv[V], av[V], zv[V], gc[V], spec[V], u[V];
  cuda::ld_row(go + e, vec_io, lv, gov);
  cuda::ld_row(h_in + e, vec_io, lv, hv);
  cuda::ld_row(z + e, vec_io, lv, zv);
  add_z_bias(zb, j, vec_io, lv, zv);
  ld_row_or_zero(a, e, vec_io, lv, av);
#pragma unroll
  for (int c = 0; c < V; ++c) {
    gc[c] = gate_grad(placement, gov[c], hv[c], av[c]);
    spec[c] = 0;
  }
  acc_t dgk = 0;  // lane li keeps dg of the k with k % lpr == li
  for (int64_t k = 0; k < K; ++k) {
    const acc_t gk = gs[tt * K + k];
    acc_t* du_row = dus + tt * dst + k * jt;
    if (tc) {  // the mma's u plus the bias
      acc_t bias[V];
      lds_lane<V, P>(du_row, li, lpr, u);
      lds_lane<V, P>(bs + k * jt, li, lpr, bias);
#pragma unroll
      for (int c = 0; c < V; ++c) u[c] += bias[c];
    } else {
      expand_lane<V, P>(Bs, bs, ws + (tt * K + k) * rp, k, r, rb, jt, bst, li, lpr, u);
    }
    acc_t sdg = 0, du[V];
#pragma unroll
    for (int c = 0; c < V; ++c) {
      const acc_t v = s * u[c], sg = sigmoid(v), ek = silu_from_sigmoid(v, sg);
      sdg += gc[c] * ek;
      du[c] = gc[c] * gk * s * silu_grad_from_sigmoid(v, sg);
      if (gk != acc_t(0)) spec[c] += gk * ek;
    }
    if (gk != acc_t(0)) sts_lane<V, P>(du_row, li, lpr, du);  // du replaces u
    sdg = cuda::group_sum(sdg, static_cast<int>(lpr));
    const int64_t kb = k % lpr;
    if (li == kb) dgk = sdg;
    if (active && (kb == lpr - 1 || k == K - 1) && li <= kb) cuda::st(pdg_j + t * K + k - kb + li, dgk);
  }
  if (active && valid > 0) {
    acc_t dm[V], dzv[V];
#pragma unroll
    for (int c = 0; c < V; ++c) {
      const acc_t sz = sigmoid(zv[c]);
      dm[c] = gov[c] * (acc_t(1) + silu_from_sigmoid(zv[c], sz) + spec[c]);
      dzv[c] = gc[c] * silu_grad_from_sigmoid(zv[c], sz);
    }
    cuda::st_row(d_main + e, vec_io, valid, dm);
    cuda::st_row(dz + e, vec_io, valid, dzv);
    if (dz_sums) {
      acc_t zsum[V];  // this lane's running sums of dz (unrounded) over its tokens
      lds_lane<V, P>(zss + row * jt, li, lpr, zsum);
#pragma unroll
      for (int c = 0; c < V; ++c) zsum[c] += dzv[c];
      sts_lane<V, P>(zss + row * jt, li, lpr, zsum);
    }
  }
}

// Phase 1b's items, once du of the tile is complete: the first item of each specialist.
template <typename scalar_t, typename acc_t>
HYCAM_DEVICE void backward_plan_dw(const BackwardView<scalar_t, acc_t>& view) {
  const int64_t K = view.p.K;
  const auto tn = view.tn;
  const auto istart = view.istart;
  if (threadIdx.x == 0) {  // phase 1b's items: the first one of each specialist
    int n = 0;
    for (int64_t k = 0; k < K; ++k) {
      istart[k] = n;
      n += (tn[k] + kDwTokens - 1) / kDwTokens;
    }
    istart[K] = n;
  }
  __syncthreads();  // du and istart of the tile complete
}

// Phase 1b: dw_k[t, i] = sum_x du_k[t, x] B_k[x, i] over the tile's channels. Items of up
// to kDwTokens tokens routed to one k, one item per lane group at a time, so each B load
// serves them all. A warp skips a round in which none of its lane groups has an item and
// reduces only as many tokens as its fullest item (warp-uniform: full-warp shuffles). A lane
// keeps the sum of rank i when i % lpr is its lane, and the group stores up to lpr ranks of a
// token at once (consecutive addresses).
template <typename scalar_t, typename acc_t>
HYCAM_DEVICE void backward_dw(const BackwardView<scalar_t, acc_t>& view, int64_t t0) {
  constexpr int V = cuda::Pack16<scalar_t>::kN, P = cuda::Pack16<acc_t>::kN;
  const int64_t K = view.p.K, r = view.p.r, lpr = view.p.lpr, jt = view.jt, rows = view.rows, rb = view.rb,
                bst = view.bst, dst = view.dst, li = view.li, row = view.row;
  const auto Bs = view.Bs;
  const auto tl = view.tl;
  const auto tn = view.tn;
  const auto istart = view.istart;
  const auto dus = view.dus;
  const auto pdw_j = view.pdw_j;
  const int64_t nitems = istart[K];
  // item `it`: specialist k (-1: none), its first token n0 in tl[k] and the count nm. k is the
  // last specialist whose first item is <= it (binary search: istart[0] = 0 <= it < nitems)
  auto item = [&](int64_t it, int64_t& k, int64_t& n0, int64_t& nm) {
    k = -1;
    n0 = nm = 0;
    if (it >= nitems) return;
    int64_t lo = 0, hi = K;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (istart[mid] <= it) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    k = lo;
    n0 = (it - istart[lo]) * kDwTokens;
    nm = min(static_cast<int64_t>(kDwTokens), tn[lo] - n0);
  };
  const int64_t gpw = 32 / lpr, row0 = threadIdx.x / 32 * gpw;  // lane groups of this warp
  for (int64_t base = 0; base < nitems; base += rows) {  // the same rounds for the whole block
    int64_t k, n0, nm, nmw = 0;
    for (int64_t gi = 0; gi < gpw; ++gi) {
      item(base + row0 + gi, k, n0, nm);
      nmw = nm > nmw ? nm : nmw;
    }
    if (nmw == 0) continue;  // no item in this warp
    item(base + row, k, n0, nm);
    acc_t dv[kDwTokens][V], keep[kDwTokens];
    int tq[kDwTokens];
#pragma unroll
    for (int m = 0; m < kDwTokens; ++m) {
      tq[m] = m < nm ? tl[k * rows + n0 + m] : 0;
      keep[m] = 0;
      if (m < nm) {
        lds_lane<V, P>(dus + tq[m] * dst + k * jt, li, lpr, dv[m]);
      } else {
#pragma unroll
        for (int c = 0; c < V; ++c) dv[m][c] = 0;
      }
    }
    for (int64_t i = 0; i < r; ++i) {
      acc_t Bv[V];
      if (k >= 0) {
        lds_lane<V, P>(Bs + (k * rb + i) * bst, li, lpr, Bv);
      } else {
#pragma unroll
        for (int c = 0; c < V; ++c) Bv[c] = 0;
      }
      const int64_t ib = i % lpr;
#pragma unroll
      for (int m = 0; m < kDwTokens; ++m) {
        if (m < nmw) {
          acc_t p = 0;
#pragma unroll
          for (int c = 0; c < V; ++c) p += dv[m][c] * Bv[c];
          p = cuda::group_sum(p, static_cast<int>(lpr));
          if (li == ib) keep[m] = p;
        }
      }
      if ((ib == lpr - 1 || i == r - 1) && li <= ib) {
#pragma unroll
        for (int m = 0; m < kDwTokens; ++m)
          if (m < nm) cuda::st(pdw_j + ((t0 + tq[m]) * K + k) * r + i - ib + li, keep[m]);
      }
    }
  }
}

// Phase 2: the columns (k, x) and (k, x + jt / 2) of the dB / db accumulators per thread,
// sharing the w broadcasts, kC rank indices at a time (the first chunk also carries db).
// Columns past d accumulate du = 0.
template <typename scalar_t, typename acc_t>
HYCAM_DEVICE void backward_dB(const BackwardView<scalar_t, acc_t>& view) {
  constexpr int V = cuda::Pack16<scalar_t>::kN, P = cuda::Pack16<acc_t>::kN;
  const int64_t K = view.p.K, r = view.p.r, jt = view.jt, rows = view.rows, R1 = view.R1, rp = view.rp, rb = view.rb,
                dst = view.dst;
  const auto tc = view.tc;
  const auto ws = view.ws;
  const auto tl = view.tl;
  const auto tn = view.tn;
  const auto wh = view.wh;
  const auto dus = view.dus;
  const auto accs = view.accs;
  const int64_t half = jt / 2;  // jt = lpr * V is even
  constexpr int kC = 8;  // rank indices per chunk: no spills at 128 registers (float and double)
  for (int64_t pc = threadIdx.x; pc < K * half; pc += blockDim.x) {
    const int64_t k = pc / half, x = pc % half;
    if (tn[k] == 0) continue;  // no token of the tile routed to k: its accumulators stay as they are
    acc_t* acc_k = accs + k * R1 * jt + x;
    const acc_t* du_k = dus + k * jt + x;
    for (int64_t i0 = 0; i0 < r || i0 == 0; i0 += kC) {
      const bool first = i0 == 0;
      acc_t a0[kC], a1[kC], db0 = first ? cuda::sld(acc_k + r * jt) : acc_t(0),
                            db1 = first ? cuda::sld(acc_k + r * jt + half) : acc_t(0);
#pragma unroll
      for (int c = 0; c < kC; ++c) {
        a0[c] = i0 + c < r ? cuda::sld(acc_k + (i0 + c) * jt) : acc_t(0);
        a1[c] = i0 + c < r ? cuda::sld(acc_k + (i0 + c) * jt + half) : acc_t(0);
      }
      for (int n = 0; n < tn[k]; ++n) {  // the tokens routed to k (hard routing: about rows / K)
        const int64_t q = tl[k * rows + n];
        const acc_t du0 = cuda::sld(du_k + q * dst), du1 = cuda::sld(du_k + q * dst + half);
        if (tc) {  // w_k[i0 .. i0 + kC) from wh: 16-byte broadcasts of V scalar_t (zero padded to rb)
          const scalar_t* whq = wh + q * wh_stride(K, rb) + k * rb + i0;
#pragma unroll
          for (int c0 = 0; c0 < kC; c0 += V) {
            if (i0 + c0 < rb) {
              cuda::check_smem16(whq + c0);
              const auto wv = *reinterpret_cast<const cuda::Pack16<scalar_t>*>(whq + c0);
#pragma unroll
              for (int c = 0; c < V && c0 + c < kC; ++c) {
                a0[c0 + c] += du0 * static_cast<acc_t>(wv.v[c]);
                a1[c0 + c] += du1 * static_cast<acc_t>(wv.v[c]);
              }
            }
          }
          db0 += du0;
          db1 += du1;
          continue;
        }
        const acc_t* wq = ws + (q * K + k) * rp + i0;
        // w_k[i0 + c0 .. + P) as 16-byte broadcasts up to rp (zero padded past r); none past rp
#pragma unroll
        for (int c0 = 0; c0 < kC; c0 += P) {
          if (i0 + c0 < rp) {
            cuda::check_smem16(wq + c0);
            const auto wv = *reinterpret_cast<const cuda::Pack16<acc_t>*>(wq + c0);
#pragma unroll
            for (int c = 0; c < P; ++c) {
              a0[c0 + c] += du0 * wv.v[c];
              a1[c0 + c] += du1 * wv.v[c];
            }
          }
        }
        db0 += du0;
        db1 += du1;
      }
#pragma unroll
      for (int c = 0; c < kC; ++c) {
        if (i0 + c < r) {
          cuda::sst(acc_k + (i0 + c) * jt, a0[c]);
          cuda::sst(acc_k + (i0 + c) * jt + half, a1[c]);
        }
      }
      if (first) {
        cuda::sst(acc_k + r * jt, db0);
        cuda::sst(acc_k + r * jt + half, db1);
      }
    }
  }
}

// After the split's last tile: the dB / db accumulators and the dz sums to the block's rows of pB.
template <typename scalar_t, typename acc_t>
HYCAM_DEVICE void backward_write_partials(const BackwardView<scalar_t, acc_t>& view) {
  constexpr int V = cuda::Pack16<scalar_t>::kN, P = cuda::Pack16<acc_t>::kN;
  const int64_t d = view.p.d, K = view.p.K, lpr = view.p.lpr, jt = view.jt, rows = view.rows, R1 = view.R1,
                j0 = view.j0, split = view.split, KR1 = view.KR1, nB = view.nB;
  const auto pB = view.p.pB;
  const auto dz_sums = view.dz_sums;
  const auto accs = view.accs;
  const auto zss = view.zss;
  __syncthreads();
  for (int64_t q = threadIdx.x; q < K * R1 * jt; q += blockDim.x) {
    const int64_t jl = q % jt, ki = q / jt;  // ki = k * R1 + i; consecutive threads: consecutive j
    if (j0 + jl < d) cuda::st(pB + (split * nB + ki) * d + j0 + jl, cuda::sld(accs + ki * jt + x_pos(jl, lpr, V, P)));
  }
  if (dz_sums) {
    for (int64_t jl = threadIdx.x; jl < jt; jl += blockDim.x) {  // dz summed over the rows, in row order
      const int64_t x = x_pos(jl, lpr, V, P);
      acc_t sum = 0;
      for (int64_t rr = 0; rr < rows; ++rr) sum += cuda::sld(zss + rr * jt + x);
      if (j0 + jl < d) cuda::st(pB + (split * nB + KR1) * d + j0 + jl, sum);
    }
  }
}

// M: the mma element type of scalar_t (__half, __nv_bfloat16) or void. With M and channel tiles of
// a multiple of 16 (tc), u = B_k w_k for the tile's tokens and every k comes from tensor-core mma
// (bf16/fp16 products are exact in float, sums in float) instead of shared-memory loads of B per
// token. At most 128 registers per thread, so that two 256-thread blocks fit on an SM.
template <typename scalar_t, typename acc_t, typename M = void>
HYCAM_GLOBAL void HYCAM_LAUNCH_BOUNDS(kThreads, 2)
    cam_backward_kernel(const HYCAM_GRID_CONSTANT CamParams<scalar_t, acc_t> params) {
  HYCAM_DYNAMIC_SMEM(smem);
  const BackwardView<scalar_t, acc_t> view = backward_view<scalar_t, acc_t, M>(params, smem);
  backward_init(view);
  for (int64_t t0 = view.ts0; t0 < view.ts1; t0 += view.rows) {
    const int64_t nt = min(view.rows, view.ts1 - t0);
    backward_stage_tile(view, t0, nt);
    backward_expand_tc<scalar_t, acc_t, M>(view);
    backward_elementwise(view, t0, nt);
    backward_plan_dw(view);
    backward_dw(view, t0);
    backward_dB(view);
  }
  backward_write_partials(view);
}

// The per-token reductions over the channel tiles c, in order: dg[t, k] = sum_c pdg[c, t, k] and
// dw[t, k, i] = sum_c pdw[c, t, k, i] when token t is routed to k (g[t, k] != 0, the backward's
// test), else 0 without reading pdw (the backward writes pdw only for routed pairs: hard routing
// skips (K - 1) / K of it). One thread per output: TK * r of dw, then TK of dg (TK = T * K).
// out_t: the storage type (what cam_cuda.cu launches) or acc_t (the emulation tests check the sums).
template <typename scalar_t, typename acc_t, typename out_t = scalar_t>
HYCAM_GLOBAL void sum_dwdg_kernel(const acc_t* __restrict__ pdw, const acc_t* __restrict__ pdg,
                                  const scalar_t* __restrict__ g, int64_t nJ, int64_t TK, int64_t r,
                                  out_t* __restrict__ dw, out_t* __restrict__ dg) {
  const int64_t nw = TK * r;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < nw + TK;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t s = 0;
    if (q < nw) {
      if (static_cast<acc_t>(cuda::ld(g + q / r)) != acc_t(0))
        for (int64_t c = 0; c < nJ; ++c) s += cuda::ld(pdw + c * nw + q);
      cuda::st(dw + q, static_cast<out_t>(s));
    } else {
      for (int64_t c = 0; c < nJ; ++c) s += cuda::ld(pdg + c * TK + q - nw);
      cuda::st(dg + q - nw, static_cast<out_t>(s));
    }
  }
}

// ---------------------------------------------------------------------------------------
// launch configurations (host side; shared with the emulation tests and the cost model)
// ---------------------------------------------------------------------------------------
// The tiling: threads per block, lanes per token row (lpr) and tokens staged per block. The
// first that fits the budget in order of preference (256 threads, the widest lane groups, then
// fewer threads: large num_specialists * rank); threads == 0 when none fits. Depends only on the
// shape and dtype (and, for the backward, whether z_bias is given: its dz sums take shared memory).
struct Tiling {
  int64_t threads = 0, lpr = 0, tokens = 0, smem = 0;
};
inline Tiling choose_tiling(int64_t K, int64_t r, int64_t elem, int64_t acc_bytes, bool backward,
                            bool dz_sums = false) {
  const int64_t V = 16 / elem;
  for (int64_t threads = kThreads; threads >= 32; threads /= 2) {
    for (int64_t lpr = 32; lpr >= 1; lpr /= 2) {
      const int64_t rows = threads / lpr;
      const int64_t wide = cuda::ceil_div(kFwdTokens, rows) * rows;
      for (int64_t tokens : {backward ? rows : wide, rows}) {
        const bool tc = backward && elem == 2 && (lpr * V) % 16 == 0;  // as cam_backward_kernel decides
        const Layout L = cam_layout(K, r, lpr * V, lpr, tokens, elem, acc_bytes, backward, tc, dz_sums);
        if (L.total <= kSmemBudget) return Tiling{threads, lpr, tokens, L.total};
      }
    }
  }
  return Tiling{};
}

struct CamForwardConfig {
  int64_t lpr = 0, tile = 0;
  size_t smem = 0;
  dim3 grid, block;
};

inline CamForwardConfig cam_forward_config(int64_t T, int64_t d, int64_t K, int64_t r, int64_t elem,
                                           int64_t acc_bytes) {
  const Tiling t = choose_tiling(K, r, elem, acc_bytes, false);
  CamForwardConfig c;
  if (t.threads == 0) return c;
  c.lpr = t.lpr;
  c.tile = t.tokens;
  c.smem = static_cast<size_t>(t.smem);
  c.grid = dim3(static_cast<unsigned>(cuda::ceil_div(T, c.tile)),
                static_cast<unsigned>(cuda::ceil_div(d, t.lpr * (16 / elem))));
  c.block = dim3(static_cast<unsigned>(t.threads));
  return c;
}

struct CamBackwardConfig {
  int64_t lpr = 0, nJ = 0, S = 0, per_split = 0;
  size_t smem = 0;
  dim3 grid, block;
};

// pdw [nJ, T, K, r], pdg [nJ, T, K] and pB [S, K * (r + 1) + dz_sums, d] are the partial buffers. S
// depends on T only. dz_sums: z_bias is given (the kernel sums dz; launch it with z_bias exactly then).
inline CamBackwardConfig cam_backward_config(int64_t T, int64_t d, int64_t K, int64_t r, int64_t elem,
                                             int64_t acc_bytes, bool dz_sums) {
  const Tiling t = choose_tiling(K, r, elem, acc_bytes, true, dz_sums);
  CamBackwardConfig c;
  if (t.threads == 0) return c;
  c.lpr = t.lpr;
  c.smem = static_cast<size_t>(t.smem);
  c.nJ = cuda::ceil_div(d, t.lpr * (16 / elem));
  int64_t S = cuda::ceil_div(T, kSplitTokens);
  S = S < kMaxSplits ? S : kMaxSplits;
  c.S = S > 1 ? S : 1;
  c.per_split = cuda::ceil_div(T, c.S);
  c.grid = dim3(static_cast<unsigned>(c.nJ), static_cast<unsigned>(c.S));
  c.block = dim3(static_cast<unsigned>(t.threads));
  return c;
}

}  // namespace cam_kernels
}  // namespace hycam
