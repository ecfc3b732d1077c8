// Device-side helpers of the CUDA kernels and the qualifiers they are written with. The kernel
// headers (csrc/*/*_kernels.cuh) include only this file, cuda_mma.cuh and hycam_math.h, so that
// besides nvcc they also compile with a plain C++ compiler under HYCAM_CUDA_EMULATION (then this
// file includes csrc/emulation/cuda_emulation.h: one fiber per CUDA thread), which the emulation
// tests (python_tests/cuda_emulation/test_cuda_emulation.py) use to run every kernel on machines
// without a GPU and benchmarks/gpu_model.py to count their memory traffic.
#pragma once

#include <cstdint>

#if defined(HYCAM_CUDA_EMULATION)
#include "../emulation/cuda_emulation.h"
#define HYCAM_GLOBAL
#define HYCAM_GRID_CONSTANT
#define HYCAM_LAUNCH_BOUNDS(threads, blocks)
#define HYCAM_DEVICE inline
#define HYCAM_SHARED static  // one block runs at a time: its threads share it
#define HYCAM_DYNAMIC_SMEM(name) unsigned char* name = ::hycam_emu::block_smem()
// Emulation only: helpers take their caller's source location, so that error messages and traffic
// counters name the line in the kernel rather than the line in the helper.
#define HYCAM_SITE_PARAM , const std::source_location& site = std::source_location::current()
#define HYCAM_SITE_ARG , site
#else
#define HYCAM_GLOBAL __global__
// A kernel's struct parameter read in place from the parameter space (sm_70+), never copied to
// local memory, however the kernel takes its address (a reference passed to a device function).
#define HYCAM_GRID_CONSTANT __grid_constant__
#define HYCAM_LAUNCH_BOUNDS(threads, blocks) __launch_bounds__(threads, blocks)
#define HYCAM_DEVICE __device__ __forceinline__
#define HYCAM_SHARED __shared__
#define HYCAM_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]  // wmma needs 32
#define HYCAM_SITE_PARAM
#define HYCAM_SITE_ARG
#endif

namespace hycam {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename acc_t>
HYCAM_DEVICE acc_t warp_sum(acc_t v HYCAM_SITE_PARAM) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(kFullMask, v, off HYCAM_SITE_ARG);
  return v;  // lane 0 holds the sum
}

// Every global-memory load and store of the kernels goes through ld / st: a plain access under
// nvcc (the generated code is the same as writing *p), and under the emulation an access that the
// memory-traffic counters record with its lane, width and call site.
template <typename T>
HYCAM_DEVICE T ld(const T* p HYCAM_SITE_PARAM) {
#if defined(HYCAM_CUDA_EMULATION)
  if (reinterpret_cast<uintptr_t>(p) % alignof(T))  // the GPU faults on a misaligned vector access
    ::hycam_emu::fail("misaligned " + std::to_string(sizeof(T)) + "-byte load at " + ::hycam_emu::where(site));
  ::hycam_emu::record(p, sizeof(T), false, site);
#endif
  return *p;
}
template <typename T>
struct NoDeduce {
  using type = T;
};
// A 16-byte, 16-byte aligned T (Pack16, VecN of 16 bytes) is stored with an explicit
// st.global.v4.b32 under nvcc: a plain `*p = v` of a 16-byte struct may be split into narrower
// stores (st_row's scalar branch stores to the same addresses, and the compiler merged the two
// into 2-byte stores); the inline PTX is one STG.E.128 in the SASS (checked by
// python_tests/cuda_emulation/test_sass.py). p must point to global memory.
template <typename T>
HYCAM_DEVICE void st(T* p, typename NoDeduce<T>::type v HYCAM_SITE_PARAM) {
#if defined(HYCAM_CUDA_EMULATION)
  if (reinterpret_cast<uintptr_t>(p) % alignof(T))
    ::hycam_emu::fail("misaligned " + std::to_string(sizeof(T)) + "-byte store at " + ::hycam_emu::where(site));
  ::hycam_emu::record(p, sizeof(T), true, site);
  *p = v;
#else
  if constexpr (sizeof(T) == 16 && alignof(T) == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(&v);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(u.x), "r"(u.y), "r"(u.z), "r"(u.w)
                 : "memory");
  } else {
    *p = v;
  }
#endif
}
// Under the emulation: fail unless p (a shared-memory access of `bytes`, a power of two) is
// aligned to its size, as the GPU requires, and record the access for the bank-conflict counters
// (every vector shared access of the kernels calls it); nothing under nvcc.
HYCAM_DEVICE void check_smem_aligned(const void* p, int bytes HYCAM_SITE_PARAM) {
#if defined(HYCAM_CUDA_EMULATION)
  if (reinterpret_cast<uintptr_t>(p) % bytes)
    ::hycam_emu::fail("misaligned " + std::to_string(bytes) + "-byte shared-memory access at " +
                      ::hycam_emu::where(site));
  ::hycam_emu::record(p, static_cast<unsigned>(bytes), false, site, true);
#else
  (void)p;
  (void)bytes;
#endif
}
HYCAM_DEVICE void check_smem16(const void* p HYCAM_SITE_PARAM) { check_smem_aligned(p, 16 HYCAM_SITE_ARG); }
// A scalar shared-memory load / store: a plain access under nvcc; under the emulation recorded for
// the bank-conflict counters (with its call site, so that the lanes of a warp pair up).
template <typename T>
HYCAM_DEVICE T sld(const T* p HYCAM_SITE_PARAM) {
#if defined(HYCAM_CUDA_EMULATION)
  ::hycam_emu::record(p, sizeof(T), false, site, true);
#endif
  return *p;
}
template <typename T>
HYCAM_DEVICE void sst(T* p, typename NoDeduce<T>::type v HYCAM_SITE_PARAM) {
#if defined(HYCAM_CUDA_EMULATION)
  ::hycam_emu::record(p, sizeof(T), true, site, true);
#endif
  *p = v;
}

// N consecutive T as one access of N * sizeof(T) bytes (a power of two <= 16).
template <typename T, int N>
struct alignas(N * sizeof(T)) VecN {
  T v[N];
};

// 16 bytes of T (8 half/bfloat16, 4 float, 2 double): one 128-bit access.
template <typename T>
struct alignas(16) Pack16 {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// The kN = 16 / sizeof(T) elements p[0..kN) of one row as acc_t: one 16-byte load when `vec` (the
// caller guarantees 16-byte alignment) and all kN are valid, else one load per element below
// `valid` (the scalar tail: d not a multiple of kN, a misaligned view, the last channel tile);
// zeros past `valid`.
template <typename T, typename acc_t>
HYCAM_DEVICE void ld_row(const T* p, bool vec, int64_t valid, acc_t* out HYCAM_SITE_PARAM) {
  constexpr int kN = Pack16<T>::kN;
  if (vec && valid >= kN) {
    const Pack16<T> q = ld(reinterpret_cast<const Pack16<T>*>(p) HYCAM_SITE_ARG);
#pragma unroll
    for (int c = 0; c < kN; ++c) out[c] = static_cast<acc_t>(q.v[c]);
  } else {
#pragma unroll
    for (int c = 0; c < kN; ++c) out[c] = c < valid ? static_cast<acc_t>(ld(p + c HYCAM_SITE_ARG)) : acc_t(0);
  }
}
template <typename T, typename acc_t>
HYCAM_DEVICE void st_row(T* p, bool vec, int64_t valid, const acc_t* in HYCAM_SITE_PARAM) {
  constexpr int kN = Pack16<T>::kN;
  if (vec && valid >= kN) {
    Pack16<T> q;
#pragma unroll
    for (int c = 0; c < kN; ++c) q.v[c] = static_cast<T>(in[c]);
    st(reinterpret_cast<Pack16<T>*>(p), q HYCAM_SITE_ARG);
  } else {
#pragma unroll
    for (int c = 0; c < kN; ++c)
      if (c < valid) st(p + c, static_cast<T>(in[c]) HYCAM_SITE_ARG);
  }
}

// Sum over the `width` lanes (a power of two <= 32) of each aligned group of the warp; every lane
// of the group gets the group's sum. All 32 lanes must call it (full-mask shuffles).
template <typename acc_t>
HYCAM_DEVICE acc_t group_sum(acc_t v, int width HYCAM_SITE_PARAM) {
  for (int off = width >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off HYCAM_SITE_ARG);
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Blocks of 256 threads for a grid-stride loop over n elements: at least 1, at most 65535.
inline int64_t grid_1d(int64_t n) {
  const int64_t g = ceil_div(n, 256);
  return g < 1 ? 1 : (g > 65535 ? 65535 : g);
}

// out[q] = sum_{s < S} part[s * n + q], summed in order of s: deterministic, no atomics.
template <typename acc_t>
HYCAM_GLOBAL void sum_partials_kernel(const acc_t* __restrict__ part, int64_t S, int64_t n, acc_t* __restrict__ out) {
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < n; q += (int64_t)gridDim.x * blockDim.x) {
    acc_t s = 0;
    for (int64_t c = 0; c < S; ++c) s += ld(part + c * n + q);
    st(out + q, s);
  }
}

// Tokens per tile so that the staged per-token values fit in `budget` bytes.
inline int64_t tile_for(int64_t per_token_bytes, int64_t budget, int64_t max_tile) {
  int64_t t = budget / (per_token_bytes > 0 ? per_token_bytes : 1);
  t = t < max_tile ? t : max_tile;
  return t > 1 ? t : 1;
}

}  // namespace cuda
}  // namespace hycam
