// Picks the instruction-set variant of the CPU kernels (isa.h) once per process, at the first
// op call: the best one the CPU runs, or the one HYCAM_CPU_ISA names.
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "../kernels.h"
#include "isa.h"

namespace hycam {

// The entry points each variant's copy of cam_cpu.cpp and shrink_cpu.cpp defines.
#define HYCAM_CPU_VARIANT(ns)                                                                        \
  namespace ns {                                                                                     \
  ShrinkFn shrink_cpu;                                                                               \
  ShrinkBackwardFn shrink_backward_cpu;                                                              \
  CamForwardFn cam_forward_cpu;                                                                      \
  CamBackwardFn cam_backward_cpu;                                                                    \
  const CpuKernels kernels{#ns, &shrink_cpu, &shrink_backward_cpu, &cam_forward_cpu, &cam_backward_cpu}; \
  }

HYCAM_CPU_VARIANT(baseline)
#if HYCAM_CPU_HAS_AVX2
HYCAM_CPU_VARIANT(avx2)
#endif

namespace {

#if HYCAM_CPU_HAS_AVX2
// The x86-64-v3 level: exactly the extensions the avx2 variant is compiled with (isa.h).
bool cpu_runs_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("x86-64-v3");
}
#endif

const CpuKernels& best() {
#if HYCAM_CPU_HAS_AVX2
  if (cpu_runs_avx2()) return avx2::kernels;
#endif
  return baseline::kernels;
}

const CpuKernels& choose() {
  const char* env = std::getenv("HYCAM_CPU_ISA");
  const std::string want = env != nullptr ? env : "";
  if (want.empty() || want == "auto") return best();
  if (want == "baseline") return baseline::kernels;
  if (want == "avx2") {
#if HYCAM_CPU_HAS_AVX2
    TORCH_CHECK(cpu_runs_avx2(), "HYCAM_CPU_ISA=avx2, but this CPU lacks part of x86-64-v3 (AVX2, FMA, F16C, "
                "BMI1/2, LZCNT, MOVBE); unset it or use HYCAM_CPU_ISA=baseline");
    return avx2::kernels;
#else
    TORCH_CHECK(false, "HYCAM_CPU_ISA=avx2, but this build of hycam_ext has no avx2 variant (it needs x86-64 "
                "and GCC 12 or newer); unset it or use HYCAM_CPU_ISA=baseline");
#endif
  }
  TORCH_CHECK_VALUE(false, "HYCAM_CPU_ISA must be auto, baseline or avx2, got '", want, "'");
}

}  // namespace

const CpuKernels& cpu_kernels(at::ScalarType dtype) {
  static const CpuKernels& chosen = choose();
  return dtype == at::kDouble ? baseline::kernels : chosen;  // float64: baseline only (isa.h)
}

std::vector<std::string> cpu_isa_variants() {
  std::vector<std::string> names{baseline::kernels.isa};
#if HYCAM_CPU_HAS_AVX2
  names.emplace_back(avx2::kernels.isa);
#endif
  return names;
}

}  // namespace hycam
