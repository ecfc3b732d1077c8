// Row kernels of the CPU code: simple loops over contiguous acc_t rows that the compiler
// vectorises (the element maths is hycam_math.h). Like the kernel sources that use them they are
// compiled once per instruction-set variant (csrc/cpu/isa.h), into hycam::<variant>::rows.
#pragma once

#include "../cpu/kernel_includes.h"
#include "../cpu/isa.h"
#include "hycam_math.h"

#if defined(__GNUC__)
#define HYCAM_ROW_INLINE inline __attribute__((always_inline))  // inlined into the kernels' loops
#else
#define HYCAM_ROW_INLINE inline
#endif

namespace hycam {
namespace HYCAM_CPU_ISA {
namespace rows {

template <typename T>
HYCAM_ROW_INLINE void axpy(T alpha, const T* x, T* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += alpha * x[j];
}

template <typename T>
HYCAM_ROW_INLINE T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

// y[j] += sum_{i < m} c[i] * M[i * ldm + j]: m axpys fused, y loaded and stored once per lane
template <typename T>
HYCAM_ROW_INLINE void gemv_t(const T* M, int64_t ldm, const T* c, int64_t m, T* y, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const T* M0 = M + i * ldm;
    const T* M1 = M0 + ldm;
    const T* M2 = M1 + ldm;
    const T* M3 = M2 + ldm;
    const T c0 = c[i], c1 = c[i + 1], c2 = c[i + 2], c3 = c[i + 3];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] += ((c0 * M0[j] + c1 * M1[j]) + c2 * M2[j]) + c3 * M3[j];
  }
  for (; i < m; ++i) axpy(c[i], M + i * ldm, y, n);
}

// out[i] = sum_j M[i * ldm + j] * x[j] for i < m: four rows per pass over x (independent chains)
template <typename T>
HYCAM_ROW_INLINE void gemv_n(const T* M, int64_t ldm, const T* x, int64_t m, int64_t n, T* out) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const T* M0 = M + i * ldm;
    const T* M1 = M0 + ldm;
    const T* M2 = M1 + ldm;
    const T* M3 = M2 + ldm;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t j = 0; j < n; ++j) {
      const T xv = x[j];
      s0 += M0[j] * xv;
      s1 += M1[j] * xv;
      s2 += M2[j] * xv;
      s3 += M3[j] * xv;
    }
    out[i] = s0;
    out[i + 1] = s1;
    out[i + 2] = s2;
    out[i + 3] = s3;
  }
  for (; i < m; ++i) out[i] = dot(M + i * ldm, x, n);
}

// U[q * ldu + j] = bias[j] + sum_{i < r} W[q * ldw + i] * Bt[i * d + j] for q < nq (at most
// kExpandBlock); bias == nullptr: U[q * ldu + j] += sum_i ... (accumulate). The nq rows share each
// pass over the rows of Bt [r, d]: the expansion u = B w + b of nq tokens, dx = A^T dp of nq
// tokens, and nq rows of a rank update Y += C^T X (BlockedRankUpdate).
constexpr int64_t kExpandBlock = 4;
template <typename T>
HYCAM_ROW_INLINE void expand_block(const T* Bt, const T* bias, const T* W, int64_t ldw, int64_t nq, int64_t r,
                                   int64_t d, T* U, int64_t ldu) {
  for (int64_t q = 0; q < nq; ++q) {
    T* u = U + q * ldu;
    if (bias != nullptr)
      for (int64_t j = 0; j < d; ++j) u[j] = bias[j];
    gemv_t(Bt, d, W + q * ldw, r, u, d);
  }
}

// C[q * m + o] += sum_{j < n} X[q * ldx + j] * A[o * lda + j] for q < 4, o < m: four tokens' dot
// products with every row of A (the shrink), each row of A read once per four tokens.
template <typename T>
HYCAM_ROW_INLINE void dots4(const T* X, int64_t ldx, const T* A, int64_t lda, int64_t m, int64_t n, T* C) {
  T tmp[4];
  for (int64_t o = 0; o < m; ++o) {
    gemv_n(X, ldx, A + o * lda, 4, n, tmp);
    for (int q = 0; q < 4; ++q) C[q * m + o] += tmp[q];
  }
}

// sg = sigmoid(s * u)
template <typename T>
HYCAM_ROW_INLINE void sigmoid_scaled(const T* u, T s, T* sg, int64_t n) {
  for (int64_t j = 0; j < n; ++j) sg[j] = sigmoid(s * u[j]);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__aarch64__))
// float: eight lanes at a time with GCC vector extensions (the compiler will not vectorise the
// selects of fast_expf on its own); the same formulas as fast_expf, lane by lane.
typedef float hycam_v8sf __attribute__((vector_size(32)));
typedef int32_t hycam_v8si __attribute__((vector_size(32)));

// Unaligned 8-lane load/store by value: kernels never take the address of a register-blocked
// accumulator array (that makes GCC keep the array in memory, a store and reload per step).
HYCAM_ROW_INLINE hycam_v8sf load8(const float* p) {
  hycam_v8sf v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
HYCAM_ROW_INLINE void store8(float* p, hycam_v8sf v) { __builtin_memcpy(p, &v, sizeof(v)); }

HYCAM_ROW_INLINE hycam_v8sf fast_exp_v8(hycam_v8sf x) {
  const hycam_v8sf zero = {}, hi = zero + 88.3762626647949f, lo = zero + -87.3365447505531f;
  const hycam_v8si nan = x != x;
  hycam_v8sf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  xc = nan ? zero : xc;
  const hycam_v8sf t = xc * 1.44269504088896341f + 0.5f;
  hycam_v8si n = __builtin_convertvector(t, hycam_v8si);
  n = __builtin_convertvector(n, hycam_v8sf) > t ? n - 1 : n;  // floor
  const hycam_v8sf nf = __builtin_convertvector(n, hycam_v8sf);
  const hycam_v8sf r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;
  hycam_v8sf y = zero + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  hycam_v8sf res = y * reinterpret_cast<hycam_v8sf>((n + 127) << 23);
  res = x > hi ? zero + __builtin_huge_valf() : res;
  res = x < lo ? zero : res;
  return nan ? x : res;
}

template <>
HYCAM_ROW_INLINE void sigmoid_scaled<float>(const float* u, float s, float* sg, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    hycam_v8sf v;
    __builtin_memcpy(&v, u + j, sizeof(v));
    v = 1.0f / (1.0f + fast_exp_v8(-s * v));
    __builtin_memcpy(sg + j, &v, sizeof(v));
  }
  for (; j < n; ++j) sg[j] = sigmoid(s * u[j]);
}

// expand_block for NQ tokens, 8 * JV channels per step: NQ * JV independent accumulators stay in
// registers (8 or more, to cover the FMA latency) and one load of a Bt row segment feeds NQ tokens.
// Returns where it stopped (d rounded down to a multiple of 8 * JV).
template <int NQ, int JV>
HYCAM_ROW_INLINE int64_t expand_steps(const float* Bt, const float* bias, const float* W, int64_t ldw, int64_t r,
                                      int64_t d, float* U, int64_t ldu, int64_t j) {
  for (; j + 8 * JV <= d; j += 8 * JV) {
    hycam_v8sf acc[NQ][JV];
    for (int v = 0; v < JV; ++v) {
      if (bias != nullptr) {
        const hycam_v8sf bv = load8(bias + j + 8 * v);
        for (int q = 0; q < NQ; ++q) acc[q][v] = bv;
      } else {
        for (int q = 0; q < NQ; ++q) acc[q][v] = load8(U + q * ldu + j + 8 * v);
      }
    }
    for (int64_t i = 0; i < r; ++i) {
      const float* row = Bt + i * d + j;
      // r rows are r concurrent streams, too many for the hardware prefetcher once Bt is out of L2
      __builtin_prefetch(row + 128, 0, 3);
      for (int v = 0; v < JV; ++v) {
        const hycam_v8sf x = load8(row + 8 * v);
        for (int q = 0; q < NQ; ++q) acc[q][v] += W[q * ldw + i] * x;
      }
    }
    for (int q = 0; q < NQ; ++q)
      for (int v = 0; v < JV; ++v) store8(U + q * ldu + j + 8 * v, acc[q][v]);
  }
  return j;
}

template <int NQ>
HYCAM_ROW_INLINE void expand_block_v8(const float* Bt, const float* bias, const float* W, int64_t ldw, int64_t r,
                                      int64_t d, float* U, int64_t ldu) {
  constexpr int kJV = NQ == 1 ? 8 : NQ == 2 ? 4 : NQ == 3 ? 3 : 2;
  int64_t j = expand_steps<NQ, kJV>(Bt, bias, W, ldw, r, d, U, ldu, 0);
  j = expand_steps<NQ, 1>(Bt, bias, W, ldw, r, d, U, ldu, j);
  for (; j < d; ++j)
    for (int q = 0; q < NQ; ++q) {
      float acc = bias != nullptr ? bias[j] : U[q * ldu + j];
      for (int64_t i = 0; i < r; ++i) acc += W[q * ldw + i] * Bt[i * d + j];
      U[q * ldu + j] = acc;
    }
}

template <>
HYCAM_ROW_INLINE void expand_block<float>(const float* Bt, const float* bias, const float* W, int64_t ldw, int64_t nq,
                                          int64_t r, int64_t d, float* U, int64_t ldu) {
  static_assert(kExpandBlock == 4, "expand_block<float> handles up to 4 rows");
  switch (nq) {
    case 4: expand_block_v8<4>(Bt, bias, W, ldw, r, d, U, ldu); break;
    case 3: expand_block_v8<3>(Bt, bias, W, ldw, r, d, U, ldu); break;
    case 2: expand_block_v8<2>(Bt, bias, W, ldw, r, d, U, ldu); break;
    case 1: expand_block_v8<1>(Bt, bias, W, ldw, r, d, U, ldu); break;
    default: break;
  }
}

HYCAM_ROW_INLINE float hsum_v8(hycam_v8sf v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// dots4 for NO rows of A: 4 x NO accumulators of 8 lanes (12 for NO = 3: 7 loads per 12 FMAs).
template <int NO>
HYCAM_ROW_INLINE void dots4_rows(const float* X, int64_t ldx, const float* A, int64_t lda, int64_t m, int64_t n,
                                 float* C) {
  hycam_v8sf acc[4][NO] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    hycam_v8sf a[NO];
    for (int o = 0; o < NO; ++o) a[o] = load8(A + o * lda + j);
    for (int q = 0; q < 4; ++q) {
      const hycam_v8sf x = load8(X + q * ldx + j);
      for (int o = 0; o < NO; ++o) acc[q][o] += x * a[o];
    }
  }
  for (int q = 0; q < 4; ++q)
    for (int o = 0; o < NO; ++o) {
      float v = hsum_v8(acc[q][o]);
      for (int64_t jj = j; jj < n; ++jj) v += X[q * ldx + jj] * A[o * lda + jj];
      C[q * m + o] += v;
    }
}

template <>
HYCAM_ROW_INLINE void dots4<float>(const float* X, int64_t ldx, const float* A, int64_t lda, int64_t m, int64_t n,
                                   float* C) {
  int64_t o = 0;
  for (; o + 3 <= m; o += 3) dots4_rows<3>(X, ldx, A + o * lda, lda, m, n, C + o);
  if (m - o == 2) dots4_rows<2>(X, ldx, A + o * lda, lda, m, n, C + o);
  if (m - o == 1) dots4_rows<1>(X, ldx, A + o * lda, lda, m, n, C + o);
}
#endif

// spec += g * silu(s * u), from sg = sigmoid(s * u)
template <typename T>
HYCAM_ROW_INLINE void gate_accum_from_sigmoid(const T* u, const T* sg, T s, T g, T* spec, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) spec[j] += g * silu_from_sigmoid(s * u[j], sg[j]);
}

// dg_k = sum_j gc * silu(s * u), from sg
template <typename T>
HYCAM_ROW_INLINE T gate_dot(const T* gc, const T* u, const T* sg, T s, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += gc[j] * silu_from_sigmoid(s * u[j], sg[j]);
  return acc;
}

// du = gc * g * s * silu'(s * u), from sg
template <typename T>
HYCAM_ROW_INLINE void specialist_grad_row(const T* gc, const T* u, const T* sg, T s, T g, T* du, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) du[j] = gc[j] * g * s * silu_grad_from_sigmoid(s * u[j], sg[j]);
}

// out = modulate(h, a, 1 + silu(z) + spec), from sgz = sigmoid(z); a may be null (a = 0)
template <typename T>
HYCAM_ROW_INLINE void cam_epilogue(const T* h, const T* a, const T* z, const T* sgz, const T* spec, T* out, int64_t n,
                                   Placement placement) {
  if (a == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      out[j] = modulate(placement, h[j], T(0), T(1) + silu_from_sigmoid(z[j], sgz[j]) + spec[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      out[j] = modulate(placement, h[j], a[j], T(1) + silu_from_sigmoid(z[j], sgz[j]) + spec[j]);
  }
}

// d_main = go * c, gc = gate_grad(go, h, a), dz = gc * silu'(z), from sgz = sigmoid(z)
template <typename T>
HYCAM_ROW_INLINE void cam_backward_epilogue(const T* go, const T* h, const T* a, const T* z, const T* sgz,
                                            const T* spec, T* d_main, T* dz, T* gc, int64_t n, Placement placement) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T av = a ? a[j] : T(0);
    const T g = gate_grad(placement, go[j], h[j], av);
    gc[j] = g;
    d_main[j] = go[j] * (T(1) + silu_from_sigmoid(z[j], sgz[j]) + spec[j]);
    dz[j] = g * silu_grad_from_sigmoid(z[j], sgz[j]);
  }
}

// Rank-n updates Y[i, :] += sum_q C[q, i] * X[q, :] (i < m) gathered over a block of up to `cap`
// rows and applied by flush(), so each row of Y is read and written once per block instead of once
// per token. Rows are applied in the order they were pushed: the result is deterministic.
template <typename T>
struct BlockedRankUpdate {
  int64_t m, d, cap, n = 0;
  std::vector<T> X, C, ones;
  BlockedRankUpdate(int64_t m_, int64_t d_, int64_t cap_)
      : m(m_), d(d_), cap(cap_), X(cap_ * d_), C(m_ * cap_), ones(cap_, T(1)) {}
  // Takes the m coefficients of a new row; returns where the caller writes the row (d values).
  T* push(const T* coef) {
    for (int64_t i = 0; i < m; ++i) C[i * cap + n] = coef[i];
    return X.data() + (n++) * d;
  }
  bool full() const { return n == cap; }
  // Y [m, d] += C^T X; ysum [d] (optional) += sum of the rows.
  void flush(T* Y, T* ysum) {
    if (n == 0) return;
    for (int64_t i = 0; i < m; i += kExpandBlock)  // kExpandBlock rows of Y per pass over X
      expand_block<T>(X.data(), nullptr, C.data() + i * cap, cap, std::min(kExpandBlock, m - i), n, d, Y + i * d, d);
    if (ysum) gemv_t(X.data(), d, ones.data(), n, ysum, d);
    n = 0;
  }
};

}  // namespace rows
}  // namespace HYCAM_CPU_ISA
}  // namespace hycam
