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
  std::barrier<>* bar = nullptr;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<double> lane_val;
};
inline Block g_block;
inline unsigned char* block_smem() { return g_block.smem; }

// Runs f() as the kernel body for every thread of every block of the grid.
template <class F>
void launch(dim3 grid, dim3 block, size_t smem_bytes, F f) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("invalid configuration argument: zero grid");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error("invalid configuration argument: grid.y/z > 65535");
  if (block.x == 0 || block.x > 1024 || block.x % 32) throw std::runtime_error("block size must be a multiple of 32");
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        const size_t n = smem_bytes ? smem_bytes : 1;
        g_block.smem = static_cast<unsigned char*>(std::malloc(n));
        std::memset(g_block.smem, 0xFF, n);  // NaN pattern
        std::barrier<> bar(block.x);
        g_block.bar = &bar;
        g_block.warp_bar.clear();
        for (unsigned w = 0; w < block.x / 32; ++w) g_block.warp_bar.emplace_back(new std::barrier<>(32));
        g_block.lane_val.assign(block.x, 0.0);
        std::vector<std::thread> threads;
        threads.reserve(block.x);
        for (unsigned t = 0; t < block.x; ++t)
          threads.emplace_back([&, t] {
            threadIdx = dim3(t, 0, 0);
            blockIdx = dim3(bx, by, bz);
            f();
            g_block.bar->arrive_and_drop();  // a finished thread no longer holds back barriers
            g_block.warp_bar[t >> 5]->arrive_and_drop();
          });
        for (auto& th : threads) th.join();
        std::free(g_block.smem);
        g_block.smem = nullptr;
      }
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
