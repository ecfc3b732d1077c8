// CPU instruction-set variants. The CPU kernel sources (csrc/cam/cam_cpu.cpp,
// csrc/shrink/shrink_cpu.cpp) are compiled once per variant, each copy in its own namespace
// hycam::<variant>, and dispatch_cpu.cpp picks one variant per process at the first op call
// (the idea of ATen's DispatchStub):
//
//   baseline  the sources compiled as they are, with the build's flags (every CPU)
//   avx2      x86-64-v3: AVX2, FMA, F16C, BMI1/2, ... (kernels_avx2_cpu.cpp; x86-64
//             with GCC 12 or newer, which has the target pragma and __builtin_cpu_supports of
//             "x86-64-v3")
//
// HYCAM_CPU_ISA=baseline|avx2 in the environment overrides the choice (auto: the best the CPU
// runs); torch.ops.hycam.cpu_isa() says which variant the process uses.
//
// float64 always runs the baseline variant: float64 results, the ones checked tightly against
// the reference, are then the same on every x86-64 CPU, and the avx2 variant only instantiates
// the dtypes that accumulate in float32.
//
// A new row kernel is one template in common/cpu_rows.h. A new kernel source: include it in
// kernels_avx2_cpu.cpp, add its entry points to CpuKernels (kernels.h) and dispatch_cpu.cpp.
// A new variant: a wrapper like kernels_avx2_cpu.cpp, its namespace and CPU check in
// dispatch_cpu.cpp.
#pragma once

// -DHYCAM_CPU_HAS_AVX2=0 builds the baseline variant only.
#ifndef HYCAM_CPU_HAS_AVX2
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define HYCAM_CPU_HAS_AVX2 1
#else
#define HYCAM_CPU_HAS_AVX2 0
#endif
#endif

// Code between BEGIN and END is compiled for x86-64-v3, given as its ISA extensions only: it
// keeps the build's -march/-mtune, so inline std/ATen functions (compiled for the baseline)
// can still be inlined into it.
#define HYCAM_CPU_AVX2_BEGIN                                                                          \
  _Pragma("GCC push_options")                                                                        \
  _Pragma("GCC target(\"sse3,ssse3,sse4.1,sse4.2,popcnt,cx16,sahf,avx,avx2,bmi,bmi2,f16c,fma,lzcnt,movbe,xsave\")")
#define HYCAM_CPU_AVX2_END _Pragma("GCC pop_options")

// A kernel source compiled on its own is the baseline variant; a wrapper defines these first.
#ifndef HYCAM_CPU_ISA
#define HYCAM_CPU_ISA baseline
#define HYCAM_CPU_FLOAT64 1
#endif
