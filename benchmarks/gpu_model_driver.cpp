// Runs one op's CUDA kernels in the CPU emulation (csrc/emulation/cuda_emulation.h) with the
// memory-traffic counters on, with the launch configurations and the bfloat16 / tensor-core path
// the launchers (csrc/*/*_cuda.cu) choose (they depend on the shape only, never on the GPU), and
// prints one JSON object per launch. Used by benchmarks/gpu_model.py; the counts are not timings.
//
//   gpu_model_driver GROUP T d K r hard|soft
//   GROUP: shrink_fwd | cam_fwd | cam_bwd | shrink_bwd
//          configs: only print every launch's grid, block and dynamic shared memory (nothing runs),
//          for 2-, 4- and 8-byte storage (bf16/half, float, double)
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cam/cam_kernels.cuh"
#include "shrink/shrink_kernels.cuh"

using namespace hycam;
using hycam_emu::launch;
using M = __nv_bfloat16;

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static float urand() {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return float((rng >> 11) * (1.0 / 9007199254740992.0) * 2.0 - 1.0);
}
// 256-byte aligned buffers, like the caching allocator's
template <class T>
struct Buf {
  T* p = nullptr;
  int64_t n = 0;
  explicit Buf(int64_t n_) : n(n_) {
    p = static_cast<T*>(std::aligned_alloc(256, ((n_ > 0 ? n_ : 1) * sizeof(T) + 255) / 256 * 256));
    for (int64_t i = 0; i < n; ++i) p[i] = T(urand() * 0.5f);
  }
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
};

static void print(const hycam_emu::Counters& c, const char* group) {
  const auto tr = hycam_emu::print_traffic_json;
  std::printf("{\"group\": \"%s\", \"kernel\": \"%s\", \"blocks\": %llu, \"threads\": %llu, \"smem\": %llu, "
              "\"mma\": %llu, \"shfl\": %llu, ",
              group, c.kernel.c_str(), (unsigned long long)c.blocks, (unsigned long long)c.threads_per_block,
              (unsigned long long)c.smem_bytes, (unsigned long long)c.mma, (unsigned long long)c.shfl);
  tr("load", c.load);
  std::printf(", ");
  tr("store", c.store);
  std::printf(", ");
  hycam_emu::print_smem_json("smem_plain", c.smem);
  std::printf(", ");
  hycam_emu::print_smem_json("smem_frag", c.frag);
  for (int st = 0; st < 2; ++st) {  // global requests by width in bytes
    std::printf(", \"%s_width\": {", st ? "store" : "load");
    const uint64_t* wd = st ? c.store_width : c.load_width;
    bool first = true;
    for (int b = 1; b <= 16; ++b)
      if (wd[b]) {
        std::printf("%s\"%d\": %llu", first ? "" : ", ", b, (unsigned long long)wd[b]);
        first = false;
      }
    std::printf("}");
  }
  std::printf("}\n");
}

template <class S>
static void sum_partials(const S* part, int64_t S_, int64_t n, S* out, const char* name) {
  launch(dim3(unsigned(cuda::grid_1d(n))), dim3(256), 0,
         [&] { cuda::sum_partials_kernel<S>(part, S_, n, out); }, name);
}

// The inputs both CAM groups hand the kernels, filled as cam_cuda.cu's kernel_inputs fills them
// (no attention output a: HyCAM.forward(x, h)); each group adds its outputs and geometry.
template <class S>
struct CamInputs {
  Buf<S> h, z, zb, w, B, b;
  CamInputs(int64_t T, int64_t d, int64_t K, int64_t r) : h(T * d), z(T * d), zb(d), w(T * K * r), B(K * d * r), b(K * d) {}
  cam_kernels::CamParams<S, float> params(const S* g, int64_t T, int64_t d, int64_t K, int64_t r, float scale,
                                          Placement placement) const {
    cam_kernels::CamParams<S, float> prm;
    prm.h_in = h.p;
    prm.z = z.p;
    prm.z_bias = zb.p;
    prm.w = w.p;
    prm.B = B.p;
    prm.b = b.p;
    prm.g = g;
    prm.T = T;
    prm.d = d;
    prm.K = K;
    prm.r = r;
    prm.scale = scale;
    prm.placement = placement;
    return prm;
  }
};

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s GROUP T d K r hard|soft\n", argv[0]);
    return 2;
  }
  const std::string group = argv[1];
  const int64_t T = std::atoll(argv[2]), d = std::atoll(argv[3]), K = std::atoll(argv[4]), r = std::atoll(argv[5]);
  const bool hard = std::string(argv[6]) == "hard";
  const int64_t KR = K * r, R1 = r + 1;
  const float scale = 0.5f;
  const Placement placement = Placement::RESIDUAL;  // HyCAM.forward(x, h): no attention output
  Buf<M> g(T * K);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) g.p[t * K + k] = M(hard ? (k == (t * 7 + 3) % K ? 1.f : 0.f) : 0.25f + 0.1f * k);
  if (group == "configs") {
    auto pr = [](const char* k, int elem, dim3 gr, unsigned th, size_t smem, int64_t lpr) {
      std::printf("{\"kernel\": \"%s\", \"elem\": %d, \"grid\": [%u, %u, %u], \"threads\": %u, \"smem\": %zu, "
                  "\"lanes_per_row\": %lld}\n", k, elem, gr.x, gr.y, gr.z, th, smem, (long long)lpr);
    };
    for (int elem : {2, 4, 8}) {
      const int acc = elem == 8 ? 8 : 4;
      const auto f = cam_kernels::cam_forward_config(T, d, K, r, elem, acc);
      pr("cam_forward_kernel", elem, f.grid, f.block.x, f.smem, f.lpr);
      const auto b = cam_kernels::cam_backward_config(T, d, K, r, elem, acc, /*dz_sums=*/true);  // as HyCAM
      pr("cam_backward_kernel", elem, b.grid, b.block.x, b.smem, b.lpr);
    }
    return 0;
  }
  hycam_emu::set_counting(true);
  if (group == "shrink_fwd") {
    using namespace shrink_kernels;
    Buf<M> x(T * d), A(KR * d), ab(KR), N(K * r * r), nb(KR), p(T * KR), w(T * KR);
    const auto sk = shrink_split_k(d);
    Buf<float> part(sk.SK * T * KR);
    launch(dim3(unsigned(cuda::ceil_div(T, kMM)), unsigned(cuda::ceil_div(KR, kMN)), unsigned(sk.SK)),
           dim3(kMThreads), 0, [&] {
      shrink_tc_kernel<M>(make_operand<M>(x.p, d), make_operand<M>(A.p, d), part.p, T, d, KR, sk.per_split);
    }, "shrink_tc_kernel");
    launch(dim3(unsigned(cuda::grid_1d(T * KR))), dim3(256), 0,
           [&] { shrink_finish_kernel<M>(part.p, sk.SK, ab.p, p.p, T * KR, KR); }, "shrink_finish_kernel");
    launch(dim3(unsigned(cuda::grid_1d(T * KR))), dim3(256), 0,
           [&] { mix_kernel<M, float>(p.p, N.p, nb.p, w.p, T, K, r); }, "mix_kernel");
  } else if (group == "cam_fwd") {
    using namespace cam_kernels;
    const CamInputs<M> in(T, d, K, r);
    Buf<M> out(T * d);
    const auto cfg = cam_forward_config(T, d, K, r, sizeof(M), sizeof(float));
    auto prm = in.params(g.p, T, d, K, r, scale, placement);
    prm.out = out.p;
    prm.lpr = cfg.lpr;
    prm.tile = cfg.tile;
    set_vector_access(prm);
    launch(cfg.grid, cfg.block, cfg.smem, [&] { cam_forward_kernel<M, float>(prm); }, "cam_forward_kernel");
  } else if (group == "cam_bwd") {
    using namespace cam_kernels;
    const CamInputs<M> in(T, d, K, r);
    Buf<M> go(T * d), dm(T * d), dz(T * d);
    const auto cfg = cam_backward_config(T, d, K, r, sizeof(M), sizeof(float), /*dz_sums=*/true);  // z_bias given
    const int64_t nB = K * R1 + 1;  // dB, db and the sum of dz (z_bias's gradient)
    Buf<float> pdw(cfg.nJ * T * KR), pdg(cfg.nJ * T * K), pB(cfg.S * nB * d), cs(nB * d);
    Buf<M> dw(T * KR), dg(T * K);
    auto prm = in.params(g.p, T, d, K, r, scale, placement);
    prm.go = go.p;
    prm.d_main = dm.p;
    prm.dz = dz.p;
    prm.pdw = pdw.p;
    prm.pdg = pdg.p;
    prm.pB = pB.p;
    prm.lpr = cfg.lpr;
    prm.per_split = cfg.per_split;
    set_vector_access(prm);
    launch(cfg.grid, cfg.block, cfg.smem, [&] { cam_backward_kernel<M, float, M>(prm); }, "cam_backward_kernel");
    launch(dim3(unsigned(cuda::grid_1d(T * K * R1))), dim3(256), 0,
           [&] { sum_dwdg_kernel<M, float>(pdw.p, pdg.p, g.p, cfg.nJ, T * K, r, dw.p, dg.p); }, "sum_dwdg_kernel");
    sum_partials(pB.p, cfg.S, nB * d, cs.p, "sum_partials_kernel(pB)");
  } else if (group == "shrink_bwd") {
    using namespace shrink_kernels;
    Buf<M> dw(T * KR), x(T * d), A(KR * d), N(K * r * r), p(T * KR), dplo(T * KR), dx(T * d);
    const auto cfg = shrink_backward_config(T, d, K, r, /*tensor_cores=*/true);
    Buf<float> dp(T * KR), pA(cfg.S * KR * d), pS(cfg.S_small * cfg.nq), sA(KR * d), sS(cfg.nq);
    launch(dim3(unsigned(cuda::grid_1d(T * KR))), dim3(256), 0,
           [&] { dp_kernel<M, float>(dw.p, N.p, dp.p, dplo.p, T, K, r); }, "dp_kernel");
    const auto dpo = make_operand<M>(dplo.p, KR);
    launch(dim3(unsigned(cuda::ceil_div(T, kMM)), unsigned(cfg.nJ)), dim3(kMThreads), 0,
           [&] { dx_tc_kernel<M>(dpo, make_operand<M>(A.p, d), dx.p, T, d, KR); }, "dx_tc_kernel");
    launch(dim3(unsigned(cfg.nO), unsigned(cfg.nJ), unsigned(cfg.S)), dim3(kMThreads), 0,
           [&] { dA_tc_kernel<M>(dpo, make_operand<M>(x.p, d), pA.p, T, d, KR, cfg.per_split); }, "dA_tc_kernel");
    launch(dim3(unsigned(cuda::ceil_div(cfg.nq, 256)), unsigned(cfg.S_small)), dim3(256), 0, [&] {
      small_reductions_kernel<M, float>(dp.p, dw.p, p.p, pS.p, T, K, r, cfg.per_small);
    }, "small_reductions_kernel");
    sum_partials(pA.p, cfg.S, KR * d, sA.p, "sum_partials_kernel(pA)");
    sum_partials(pS.p, cfg.S_small, cfg.nq, sS.p, "sum_partials_kernel(pSmall)");
  } else {
    std::fprintf(stderr, "unknown group %s\n", group.c_str());
    return 2;
  }
  for (const auto& c : hycam_emu::take_history()) print(c, group.c_str());
  return 0;
}
