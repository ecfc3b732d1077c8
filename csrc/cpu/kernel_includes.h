// Every system, std and ATen header that the CPU kernel sources include (directly or through
// kernels.h, common/cpu_rows.h, common/cpu_utils.h, common/hycam_math.h). The avx2 wrappers
// include this list BEFORE switching the target: a header first included inside the target
// region would compile its inline functions for AVX2, and the linker may then hand one of
// those copies to baseline code (an illegal instruction on an older CPU).
// python_tests/ops/test_cpu_isa.py checks that the kernel sources include no header missing here.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// Not a system header, but its inline helpers (fresh, data_or_null) must stay baseline code too.
#include "../kernels.h"
