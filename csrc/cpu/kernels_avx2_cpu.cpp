// The CPU kernel sources compiled a second time, as the avx2 variant (see isa.h).
#define HYCAM_CPU_ISA avx2
#define HYCAM_CPU_FLOAT64 0
#include "isa.h"

#if HYCAM_CPU_HAS_AVX2
#include "kernel_includes.h"  // first: std/ATen code stays baseline (see there)
HYCAM_CPU_AVX2_BEGIN
#include "../cam/cam_cpu.cpp"
#include "../shrink/shrink_cpu.cpp"
HYCAM_CPU_AVX2_END
#endif
