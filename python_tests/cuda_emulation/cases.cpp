// Small kernels for python_tests/cuda_emulation/test_cuda_emulation.py, one per process: `cases NAME`.
//  - broken_*: each seeds one GPU-only bug class; the emulator must abort naming kernel and line.
//  - good_*: the correct patterns next to those bugs; must run to the end and print "ok".
//  - toy_*: kernels whose memory traffic is known in closed form; print the counters as JSON.
// Never part of the extension (the broken kernels exist only here).
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/cuda_device.cuh"
#include "common/cuda_mma.cuh"

using hycam_emu::launch;
using namespace hycam;

static void print_counters(const hycam_emu::Counters& c) {
  const auto tr = hycam_emu::print_traffic_json;
  std::printf("{\"kernel\": \"%s\", \"blocks\": %llu, \"mma\": %llu, ", c.kernel.c_str(),
              (unsigned long long)c.blocks, (unsigned long long)c.mma);
  tr("load", c.load);
  std::printf(", ");
  tr("store", c.store);
  std::printf(", ");
  hycam_emu::print_smem_json("smem_plain", c.smem);
  std::printf(", ");
  hycam_emu::print_smem_json("smem_frag", c.frag);
  std::printf("}\n");
}

struct alignas(16) V16 {
  uint32_t v[4];
};

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const std::string name = argv[1];
  std::vector<float> buf(1 << 16, 1.f);
  float* out = buf.data();

  if (name == "broken_shfl_after_exit") {  // full-mask shuffle after lanes 20..31 returned
    launch(dim3(1), dim3(32), 0, [&] {
      if ((threadIdx.x & 31) >= 20) return;
      const float v = cuda::warp_sum(1.f);
      if (threadIdx.x == 0) out[0] = v;
    }, "broken_shfl_after_exit_kernel");
  } else if (name == "broken_shfl_lanes_exited_first") {  // lanes 0..9 returned before the others shuffle
    launch(dim3(1), dim3(32), 0, [&] {
      if ((threadIdx.x & 31) < 10) return;
      out[threadIdx.x] = cuda::warp_sum(1.f);
    }, "broken_shfl_lanes_exited_first_kernel");
  } else if (name == "broken_shfl_divergent") {  // two halves of a warp at different shuffles
    launch(dim3(1), dim3(32), 0, [&] {
      float v = 1.f;
      if (threadIdx.x < 16) {
        v = __shfl_down_sync(0xffffffffu, v, 1);
      } else {
        v = __shfl_down_sync(0xffffffffu, v, 2);
      }
      out[threadIdx.x] = v;
    }, "broken_shfl_divergent_kernel");
  } else if (name == "broken_sync_after_partial_return") {  // barrier after threads >= 40 returned
    launch(dim3(2), dim3(64), 0, [&] {
      if (threadIdx.x >= 40) return;
      __syncthreads();
      out[threadIdx.x] = 1.f;
    }, "broken_sync_after_partial_return_kernel");
  } else if (name == "broken_sync_after_early_exit") {  // threads < 40 returned before the others' barrier
    launch(dim3(1), dim3(64), 0, [&] {
      if (threadIdx.x < 40) return;
      __syncthreads();
      out[threadIdx.x] = 1.f;
    }, "broken_sync_after_early_exit_kernel");
  } else if (name == "broken_sync_divergent") {  // if/else with a barrier in each branch
    launch(dim3(1), dim3(64), 0, [&] {
      if (threadIdx.x % 2) {
        __syncthreads();
      } else {
        __syncthreads();
      }
      out[threadIdx.x] = 1.f;
    }, "broken_sync_divergent_kernel");
  } else if (name == "broken_deadlock") {  // half a warp at a shuffle, the other half at a barrier
    launch(dim3(1), dim3(32), 0, [&] {
      if (threadIdx.x < 16) {
        out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.f, 1);
      } else {
        __syncthreads();
      }
    }, "broken_deadlock_kernel");
  } else if (name == "broken_wmma_missing_lanes") {  // wmma tile load with 16 lanes exited
    alignas(32) static __half tile[16 * 16];
    for (auto& x : tile) x = __half(1.f);
    launch(dim3(1), dim3(32), 0, [&] {
      if ((threadIdx.x & 31) >= 16) return;
      mma::FragA<__half, true> a;
      mma::load_a<true>(a, tile, 16);
      out[threadIdx.x] = a.v[0][0];
    }, "broken_wmma_missing_lanes_kernel");
  } else if (name == "broken_smem_past_end") {  // writes the float just past 1024 bytes of dynamic smem
    launch(dim3(1), dim3(32), 1024, [&] {
      HYCAM_DYNAMIC_SMEM(raw);
      float* s = reinterpret_cast<float*>(raw);
      s[threadIdx.x * 8] = 0.f;  // thread 31: byte 992, fine
      if (threadIdx.x == 31) s[256] = 0.f;  // byte 1024: one past the end
    }, "broken_smem_past_end_kernel");
  } else if (name == "broken_smem_in_padding") {  // 1028 bytes launched, writes byte 1028..1031
    launch(dim3(1), dim3(32), 1028, [&] {
      HYCAM_DYNAMIC_SMEM(raw);
      float* s = reinterpret_cast<float*>(raw);
      if (threadIdx.x == 0) s[257] = 0.f;
    }, "broken_smem_in_padding_kernel");
  } else if (name == "broken_smem_too_large") {  // more dynamic smem than any sm_90 block can have
    launch(dim3(1), dim3(32), 300 * 1024, [&] {}, "broken_smem_too_large_kernel");
  } else if (name == "broken_missing_barrier") {  // shared-memory exchange without its barrier
    // (the fibers run in order, so this shows only as a race under ThreadSanitizer)
    launch(dim3(1), dim3(64), 64 * sizeof(float), [&] {
      HYCAM_DYNAMIC_SMEM(raw);
      float* s = reinterpret_cast<float*>(raw);
      s[threadIdx.x] = float(threadIdx.x);
      out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
    }, "broken_missing_barrier_kernel");
  } else if (name == "good_patterns") {
    // full-warp reduction; barrier then partial return (cam_forward); `continue` across barriers,
    // then return after the loop (cam_backward_cols); wmma with every lane
    launch(dim3(3), dim3(96), 256, [&] {
      HYCAM_DYNAMIC_SMEM(raw);
      float* s = reinterpret_cast<float*>(raw);
      const float v = cuda::warp_sum(float(threadIdx.x & 31));
      if ((threadIdx.x & 31) == 0) s[threadIdx.x / 32] = v;
      __syncthreads();
      for (int it = 0; it < 3; ++it) {
        __syncthreads();
        if (threadIdx.x >= 50) continue;
        out[blockIdx.x * 96 + threadIdx.x] = s[0] + s[1] + s[2];
      }
      if (threadIdx.x >= 70) return;
      out[1000 + threadIdx.x] = 1.f;
    }, "good_patterns_kernel");
    for (int b = 0; b < 3; ++b)
      if (out[b * 96 + 7] != 3 * 496.f) {
        std::printf("wrong warp sum %g\n", out[b * 96 + 7]);
        return 1;
      }
    alignas(32) static __half ta[16 * 16], tb[16 * 16];
    alignas(32) static float tc[16 * 16];
    for (int i = 0; i < 256; ++i) {
      ta[i] = __half(float(i % 7));
      tb[i] = __half(float(i % 5));
    }
    launch(dim3(1), dim3(64), 0, [&] {
      mma::FragA<__half, true> a;
      mma::FragB<__half, true> b;
      mma::FragC c;
      mma::zero(c);
      mma::load_a<true>(a, ta, 16);
      mma::load_b<true>(b, tb, 16);
      mma::mma(c, a, b);
      if (threadIdx.x < 32) mma::store(tc, c, 16);  // a whole warp stores
    }, "good_wmma_kernel");
    float want = 0;
    for (int k = 0; k < 16; ++k) want += float((3 * 16 + k) % 7) * float((k * 16 + 5) % 5);
    if (tc[3 * 16 + 5] != want) {
      std::printf("wrong mma %g vs %g\n", tc[3 * 16 + 5], want);
      return 1;
    }
    std::printf("ok\n");
  } else if (name == "toy_copy16") {  // n 16-byte elements, one per thread: fully coalesced
    const int n = 4096;
    alignas(128) static V16 src_[4096], dst_[4096];  // 128-byte aligned: no request straddles a line
    V16* src = src_;
    V16* dst = dst_;
    hycam_emu::set_counting(true);
    launch(dim3(n / 128), dim3(128), 0, [&] {
      const int i = blockIdx.x * 128 + threadIdx.x;
      cuda::st(dst + i, cuda::ld(src + i));
    }, "toy_copy16");
    print_counters(hycam_emu::last_counters());
  } else if (name == "toy_copy2") {  // n 2-byte elements, one per thread: 64 B per warp request
    const int n = 8192;
    alignas(128) static uint16_t src_[8192], dst_[8192];
    uint16_t* src = src_;
    uint16_t* dst = dst_;
    hycam_emu::set_counting(true);
    launch(dim3(n / 256), dim3(256), 0, [&] {
      const int i = blockIdx.x * 256 + threadIdx.x;
      cuda::st(dst + i, cuda::ld(src + i));
    }, "toy_copy2");
    print_counters(hycam_emu::last_counters());
  } else if (name.rfind("toy_gather_r", 0) == 0) {  // B[j, 0..r) per thread j (2-byte): stride-r gather
    const int r = std::atoi(name.c_str() + std::strlen("toy_gather_r"));
    const int d = 1024;
    alignas(128) static uint16_t B[1024 * 64];
    alignas(128) static float o_[1024];
    float* o = o_;
    hycam_emu::set_counting(true);
    launch(dim3(d / 256), dim3(256), 0, [&] {
      const int j = blockIdx.x * 256 + threadIdx.x;
      float s = 0;
      for (int i = 0; i < r; ++i) s += float(cuda::ld(B + j * r + i));
      cuda::st(o + j, s);
    }, "toy_gather");
    print_counters(hycam_emu::last_counters());
  } else if (name == "toy_mma") {  // 3 warps x 5 mma each
    alignas(32) static __half ta[256];
    auto five_mmas = [&] {
      mma::FragA<__half, true> a;
      mma::FragB<__half, true> b;
      mma::FragC c;
      mma::zero(c);
      mma::load_a<true>(a, ta, 16);
      mma::load_b<true>(b, ta, 16);
      for (int i = 0; i < 5; ++i) mma::mma(c, a, b);
    };
    launch(dim3(2), dim3(96), 0, five_mmas, "toy_mma");
    hycam_emu::set_counting(true);
    launch(dim3(2), dim3(96), 0, five_mmas, "toy_mma");
    print_counters(hycam_emu::last_counters());
  } else if (name.rfind("toy_bank_", 0) == 0) {  // one warp, one shared access pattern (see the test)
    const std::string pat = name.substr(9);
    hycam_emu::set_counting(true);
    launch(dim3(1), dim3(32), 4096 * 4, [&] {
      HYCAM_DYNAMIC_SMEM(smem);
      float* f = reinterpret_cast<float*>(smem);
      const unsigned l = threadIdx.x;
      if (pat == "f32_contig") cuda::sst(f + l, 1.f);                  // 1 wavefront
      if (pat == "f32_stride32") cuda::sst(f + 32 * l, 1.f);           // 32-way conflict
      if (pat == "f32_stride2") cuda::sst(f + 2 * l, 1.f);             // 2-way
      if (pat == "f32_broadcast") (void)cuda::sld(f + 5);              // 1
      if (pat == "v16_contig") cuda::check_smem16(f + 4 * l);          // 512 bytes: 4
      if (pat == "v16_broadcast") cuda::check_smem16(f + 8);           // 1
      if (pat == "v16_stride128") cuda::check_smem16(f + 32 * l);      // every lane on banks 0..3: 32
    }, "toy_bank");
    print_counters(hycam_emu::last_counters());
  } else if (name == "toy_frag_128B_rows" || name == "toy_frag_144B_rows" || name == "toy_frag_store") {
    // a 16 x 16 bf16 operand with rows of 64 elements (128 bytes: every row on the same banks)
    // or 72 (144 bytes: padded); a 16 x 16 float store with rows of 520 floats (8 words off)
    alignas(32) static __nv_bfloat16 tb[16 * 72];
    alignas(32) static float tf[16 * 520];
    hycam_emu::set_counting(true);
    launch(dim3(1), dim3(32), 0, [&] {
      mma::FragA<__nv_bfloat16, true> a;
      mma::FragC c;
      mma::zero(c);
      if (name == "toy_frag_store") {
        mma::store(tf, c, 520);
      } else {
        mma::load_a<true>(a, tb, name == "toy_frag_128B_rows" ? 64 : 72);
      }
    }, "toy_frag");
    print_counters(hycam_emu::last_counters());
  } else {
    std::fprintf(stderr, "unknown case %s\n", name.c_str());
    return 2;
  }
  std::printf("finished %s\n", name.c_str());
  return 0;
}
