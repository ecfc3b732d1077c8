// Where the CAM op applies its modulation c (the `placement` argument of hycam.cam_forward and
// hycam.cam_backward; docs/formulas.md):
//   RESIDUAL   out = (h_in + a) * c   (a optional, zeros when absent)
//   ATTENTION  out = h_in + a * c     (a required: the attention output)
// hycam_ext.config.Placement (a Python IntEnum, same names and values) mirrors it: the ops take
// the value as an int.
#pragma once

#include <cstdint>

namespace hycam {

enum class Placement : int64_t { RESIDUAL = 0, ATTENTION = 1 };

}  // namespace hycam
