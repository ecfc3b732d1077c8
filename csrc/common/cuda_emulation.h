// Test-only: runs CUDA kernels written against cuda_device.cuh on the CPU, one std::thread per
// CUDA thread of one block at a time. __syncthreads is a block barrier and __shfl_down_sync a
// per-warp exchange, so missing barriers, divergent barriers and partial-warp shuffles show up
// (as wrong results, a hang caught by the test's timeout, or an abort). Dynamic shared memory is
// an exact-size heap buffer filled with a NaN pattern, so AddressSanitizer reports out-of-bounds
// accesses and uninitialised reads poison the results. Never part of the extension build.
#pragma once

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

using std::max;
using std::min;

namespace hycam_emu {
struct Block {
  unsigned char* smem = nullptr;
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<double> lane_val;
  std::vector<uintptr_t> lane_ptr;
};
inline Block g_block;
inline unsigned char* block_smem() { return g_block.smem; }

// Runs f() as the kernel body for every thread of every block of the grid, one block at a time
// (x fastest, then y, then z). The block's threads are created once and reused for every block;
// each block gets fresh barriers (a thread that returns early drops out of its block's barriers
// only) and a fresh NaN-filled dynamic shared memory buffer.
template <class F>
void launch(dim3 grid, dim3 block, size_t smem_bytes, F f) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("invalid configuration argument: zero grid");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error("invalid configuration argument: grid.y/z > 65535");
  if (block.x == 0 || block.x > 1024 || block.x % 32) throw std::runtime_error("block size must be a multiple of 32");
  gridDim = grid;
  blockDim = block;
  const unsigned nt = block.x;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  const size_t n = smem_bytes ? smem_bytes : 1;
  auto setup = [&] {
    g_block.smem = static_cast<unsigned char*>(std::malloc(n));
    std::memset(g_block.smem, 0xFF, n);  // NaN pattern
    g_block.bar = std::make_unique<std::barrier<>>(nt);
    g_block.warp_bar.clear();
    for (unsigned w = 0; w < nt / 32; ++w) g_block.warp_bar.emplace_back(new std::barrier<>(32));
    g_block.lane_val.assign(nt, 0.0);
    g_block.lane_ptr.assign(nt, 0);
  };
  auto teardown = [&] {
    std::free(g_block.smem);
    g_block.smem = nullptr;
  };
  std::barrier<> pool(nt);  // between blocks; never dropped
  setup();
  std::vector<std::thread> threads;
  threads.reserve(nt);
  for (unsigned t = 0; t < nt; ++t)
    threads.emplace_back([&, t] {
      threadIdx = dim3(t, 0, 0);
      for (uint64_t b = 0; b < nblocks; ++b) {
        const uint64_t plane = uint64_t(grid.x) * grid.y;
        blockIdx = dim3(unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / plane));
        f();
        g_block.bar->arrive_and_drop();  // a finished thread no longer holds back barriers
        g_block.warp_bar[t >> 5]->arrive_and_drop();
        pool.arrive_and_wait();  // every thread is done with block b
        if (t == 0) {
          teardown();
          if (b + 1 < nblocks) setup();
        }
        pool.arrive_and_wait();  // block b + 1 is set up
      }
    });
  for (auto& th : threads) th.join();
}
}  // namespace hycam_emu

inline void __syncthreads() { hycam_emu::g_block.bar->arrive_and_wait(); }

template <typename T>
T __shfl_down_sync(unsigned mask, T v, int off) {
  if (mask != 0xffffffffu) std::abort();  // the kernels only ever use full-warp shuffles
  auto& b = hycam_emu::g_block;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  b.lane_val[warp * 32 + lane] = static_cast<double>(v);
  b.warp_bar[warp]->arrive_and_wait();
  T r = (lane + off < 32) ? static_cast<T>(b.lane_val[warp * 32 + lane + off]) : v;
  b.warp_bar[warp]->arrive_and_wait();
  return r;
}

namespace hycam_emu {
inline void fail(const char* what) {
  std::fprintf(stderr, "emulated CUDA error: %s\n", what);
  std::abort();
}
// A warp barrier: every lane of the calling warp must arrive (warp-collective operations).
inline void warp_sync() { g_block.warp_bar[threadIdx.x >> 5]->arrive_and_wait(); }
// Aborts unless all 32 lanes of the warp pass the same value (warp-collective arguments).
inline void warp_uniform(uintptr_t v, const char* what) {
  auto& b = g_block;
  const unsigned warp = threadIdx.x >> 5;
  b.lane_ptr[threadIdx.x] = v;
  warp_sync();
  const bool same = b.lane_ptr[warp * 32] == v;
  warp_sync();
  if (!same) fail(what);
}
}  // namespace hycam_emu

// cuda_fp16.h / cuda_bf16.h storage types and the explicit conversions the kernels use (torch
// builds CUDA with implicit half/bfloat16 conversions disabled, so the kernels never rely on them).
struct __half {
  _Float16 v;
  __half() = default;
  explicit __half(float f) : v(static_cast<_Float16>(f)) {}
  explicit operator float() const { return static_cast<float>(v); }
};
struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  explicit __nv_bfloat16(float f) {  // round to nearest even, NaN stays NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    } else {
      bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  explicit operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
