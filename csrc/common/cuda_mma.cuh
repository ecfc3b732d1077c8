// Warp-level 16x16x16 tensor-core tiles (half/bfloat16 in, float accumulate) for the kernels of
// the grouped specialist GEMMs. On the GPU this is nvcuda::wmma, whose fragment register layout
// belongs to the CUDA headers, so no kernel depends on it: kernels only load whole tiles from
// shared memory, multiply-accumulate, and store whole float tiles back. Under
// HYCAM_CUDA_EMULATION every lane holds the whole tile and the calls check what the hardware
// requires (256-bit aligned pointers, ldm a multiple of 16 bytes, the same arguments on all 32
// lanes, every lane present: each call is a warp collective of the emulator, so a lane that
// has exited or waits elsewhere is reported with the kernel and the call site).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda_device.cuh"

#if defined(HYCAM_CUDA_EMULATION)
#define HYCAM_MMA_AVAILABLE 1
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define HYCAM_MMA_AVAILABLE 1  // bfloat16 fragments need sm_80; the launchers check the device
#else
#define HYCAM_MMA_AVAILABLE 0
#endif
#endif

namespace hycam {
namespace mma {

constexpr int kTile = 16;

HYCAM_DEVICE float to_float(__half v) { return __half2float(v); }
HYCAM_DEVICE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
HYCAM_DEVICE void from_float(float v, __half& out) { out = __float2half_rn(v); }
HYCAM_DEVICE void from_float(float v, __nv_bfloat16& out) { out = __float2bfloat16_rn(v); }

#if defined(HYCAM_CUDA_EMULATION)

// Logical 16x16 matrices; element (i, j) of a row-major tile is p[i * ldm + j], of a column-major
// tile p[j * ldm + i] (operand a is 16 (m) x 16 (k), operand b 16 (k) x 16 (n)).
template <typename T, bool kRowMajor>
struct FragA {
  float v[kTile][kTile];
};
template <typename T, bool kRowMajor>
struct FragB {
  float v[kTile][kTile];
};
struct FragC {
  float v[kTile][kTile];
};

template <bool kRowMajor, typename T, typename F>
inline void emu_load(F& f, const T* p, unsigned ldm, const std::source_location& site) {
  if (reinterpret_cast<uintptr_t>(p) % 32)
    hycam_emu::fail("wmma::load_matrix_sync at " + hycam_emu::where(site) + ": pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16)
    hycam_emu::fail("wmma::load_matrix_sync at " + hycam_emu::where(site) + ": ldm not a multiple of 16 bytes");
  hycam_emu::warp_uniform(reinterpret_cast<uintptr_t>(p), "wmma::load_matrix_sync (pointer)", site);
  hycam_emu::warp_uniform(ldm, "wmma::load_matrix_sync (ldm)", site);
  hycam_emu::record_fragment(p, uint64_t(ldm) * sizeof(T), false);  // bank conflicts of the LDSM phases
  for (int i = 0; i < kTile; ++i)
    for (int j = 0; j < kTile; ++j) f.v[i][j] = static_cast<float>(kRowMajor ? p[i * ldm + j] : p[j * ldm + i]);
}
template <bool kRowMajor, typename T>
inline void load_a(FragA<T, kRowMajor>& f, const T* p, unsigned ldm HYCAM_SITE_PARAM) {
  emu_load<kRowMajor>(f, p, ldm, site);
}
template <bool kRowMajor, typename T>
inline void load_b(FragB<T, kRowMajor>& f, const T* p, unsigned ldm HYCAM_SITE_PARAM) {
  emu_load<kRowMajor>(f, p, ldm, site);
}
inline void zero(FragC& c) {
  for (auto& row : c.v)
    for (float& x : row) x = 0.f;
}
template <typename FA, typename FB>
inline void mma(FragC& c, const FA& a, const FB& b HYCAM_SITE_PARAM) {
  // Warp-collective: every lane must be here; counted once per warp for the cost model. Every
  // lane holds the same tiles (loads take warp-uniform pointers), so the product is computed once,
  // by the last lane to arrive, and copied to the other lanes' accumulators.
  const unsigned t = threadIdx.x, w = t >> 5;
  hycam_emu::g.lane_p[0][t] = &c;
  hycam_emu::g.lane_p[1][t] = const_cast<FA*>(&a);
  hycam_emu::g.lane_p[2][t] = const_cast<FB*>(&b);
  hycam_emu::warp_collective(0xffffffffu, site, "wmma::mma_sync", [w] {
    ++hycam_emu::g.counters.mma;
    auto& P = hycam_emu::g.lane_p;
    FragC& c0 = *static_cast<FragC*>(P[0][w * 32]);
    const FA& a0 = *static_cast<const FA*>(P[1][w * 32]);
    const FB& b0 = *static_cast<const FB*>(P[2][w * 32]);
    for (int m = 0; m < kTile; ++m)
      for (int n = 0; n < kTile; ++n) {
        float s = c0.v[m][n];
        for (int k = 0; k < kTile; ++k) s += a0.v[m][k] * b0.v[k][n];
        c0.v[m][n] = s;
      }
    for (unsigned l = 1; l < 32; ++l) *static_cast<FragC*>(P[0][w * 32 + l]) = c0;
  });
}
// Row-major float store.
inline void store(float* p, const FragC& c, unsigned ldm HYCAM_SITE_PARAM) {
  if (reinterpret_cast<uintptr_t>(p) % 32)
    hycam_emu::fail("wmma::store_matrix_sync at " + hycam_emu::where(site) + ": pointer not 256-bit aligned");
  if (ldm % 4)
    hycam_emu::fail("wmma::store_matrix_sync at " + hycam_emu::where(site) + ": ldm not a multiple of 16 bytes");
  hycam_emu::warp_uniform(reinterpret_cast<uintptr_t>(p), "wmma::store_matrix_sync (pointer)", site);
  hycam_emu::warp_uniform(ldm, "wmma::store_matrix_sync (ldm)", site);
  hycam_emu::record_fragment(p, uint64_t(ldm) * sizeof(float), true);
  if ((threadIdx.x & 31) == 0)
    for (int i = 0; i < kTile; ++i)
      for (int j = 0; j < kTile; ++j) p[i * ldm + j] = c.v[i][j];
  hycam_emu::warp_sync("wmma::store_matrix_sync", 0xffffffffu, site);
}

#elif HYCAM_MMA_AVAILABLE

namespace wm = nvcuda::wmma;
template <bool kRowMajor>
using Layout = std::conditional_t<kRowMajor, wm::row_major, wm::col_major>;
template <typename T, bool kRowMajor>
using FragA = wm::fragment<wm::matrix_a, kTile, kTile, kTile, T, Layout<kRowMajor>>;
template <typename T, bool kRowMajor>
using FragB = wm::fragment<wm::matrix_b, kTile, kTile, kTile, T, Layout<kRowMajor>>;
using FragC = wm::fragment<wm::accumulator, kTile, kTile, kTile, float>;

// Fragment loads and stores as the PTX wmma instructions with the .shared state space and a
// 32-bit shared-memory address: wm::load_matrix_sync / store_matrix_sync take generic pointers,
// and where the compiler could not prove the pointer shared they became generic LD.E / ST.E
// (64-bit addressing); with .shared they are LDSM / STS. Every caller passes shared memory. The
// registers are the fragment's storage in order, as CUDA's mma.hpp passes them to its builtins
// (a and b: 8 x 32 bits for __half, 4 for __nv_bfloat16; the float accumulator 8).
HYCAM_DEVICE unsigned smem_u32(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

#define HYCAM_WMMA_LD8(op)                                                                             \
  asm volatile(op " {%0, %1, %2, %3, %4, %5, %6, %7}, [%8], %9;"                                        \
               : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3]), "=r"(x[4]), "=r"(x[5]), "=r"(x[6]), \
                 "=r"(x[7])                                                                            \
               : "r"(smem_u32(p)), "r"(ldm)                                                            \
               : "memory")
#define HYCAM_WMMA_LD4(op)                                                                             \
  asm volatile(op " {%0, %1, %2, %3}, [%4], %5;"                                                        \
               : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])                                        \
               : "r"(smem_u32(p)), "r"(ldm)                                                            \
               : "memory")

template <bool kRowMajor>
HYCAM_DEVICE void load_a(FragA<__half, kRowMajor>& f, const __half* p, unsigned ldm) {
  unsigned* x = reinterpret_cast<unsigned*>(f.x);
  if constexpr (kRowMajor) {
    HYCAM_WMMA_LD8("wmma.load.a.sync.aligned.row.m16n16k16.shared.f16");
  } else {
    HYCAM_WMMA_LD8("wmma.load.a.sync.aligned.col.m16n16k16.shared.f16");
  }
}
template <bool kRowMajor>
HYCAM_DEVICE void load_b(FragB<__half, kRowMajor>& f, const __half* p, unsigned ldm) {
  unsigned* x = reinterpret_cast<unsigned*>(f.x);
  if constexpr (kRowMajor) {
    HYCAM_WMMA_LD8("wmma.load.b.sync.aligned.row.m16n16k16.shared.f16");
  } else {
    HYCAM_WMMA_LD8("wmma.load.b.sync.aligned.col.m16n16k16.shared.f16");
  }
}
template <bool kRowMajor>
HYCAM_DEVICE void load_a(FragA<__nv_bfloat16, kRowMajor>& f, const __nv_bfloat16* p, unsigned ldm) {
  unsigned* x = reinterpret_cast<unsigned*>(f.x);
  if constexpr (kRowMajor) {
    HYCAM_WMMA_LD4("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16");
  } else {
    HYCAM_WMMA_LD4("wmma.load.a.sync.aligned.col.m16n16k16.shared.bf16");
  }
}
template <bool kRowMajor>
HYCAM_DEVICE void load_b(FragB<__nv_bfloat16, kRowMajor>& f, const __nv_bfloat16* p, unsigned ldm) {
  unsigned* x = reinterpret_cast<unsigned*>(f.x);
  if constexpr (kRowMajor) {
    HYCAM_WMMA_LD4("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16");
  } else {
    HYCAM_WMMA_LD4("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16");
  }
}
#undef HYCAM_WMMA_LD8
#undef HYCAM_WMMA_LD4
static_assert(sizeof(FragA<__half, true>::x) == 32 && sizeof(FragA<__nv_bfloat16, true>::x) == 16 &&
                  sizeof(FragB<__half, true>::x) == 32 && sizeof(FragB<__nv_bfloat16, true>::x) == 16 &&
                  sizeof(FragC::x) == 32,
              "wmma fragment storage is not what the PTX loads and stores assume");
HYCAM_DEVICE void zero(FragC& c) { wm::fill_fragment(c, 0.f); }
template <typename FA, typename FB>  // FragA, FragB of the same element type
HYCAM_DEVICE void mma(FragC& c, const FA& a, const FB& b) {
  wm::mma_sync(c, a, b, c);
}
// Row-major float store to shared memory.
HYCAM_DEVICE void store(float* p, const FragC& c, unsigned ldm) {
  const float* x = c.x;
  asm volatile(
      "wmma.store.d.sync.aligned.row.m16n16k16.shared.f32 [%0], {%1, %2, %3, %4, %5, %6, %7, %8}, %9;" ::"r"(
          smem_u32(p)),
      "f"(x[0]), "f"(x[1]), "f"(x[2]), "f"(x[3]), "f"(x[4]), "f"(x[5]), "f"(x[6]), "f"(x[7]), "r"(ldm)
      : "memory");
}

#endif

// 16 bytes global -> shared (both 16-byte aligned; the emulation checks it like the hardware would,
// and records the global load for the traffic counters).
HYCAM_DEVICE void copy16(void* dst, const void* src HYCAM_SITE_PARAM) {
#if defined(HYCAM_CUDA_EMULATION)
  if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16)
    hycam_emu::fail("misaligned 16-byte access at " + hycam_emu::where(site));
  hycam_emu::record(src, 16, false, site);
  std::memcpy(dst, src, 16);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

}  // namespace mma
}  // namespace hycam
