"""The PyTorch glue launches of one HyCAM layer, forward + backward (benchmarks/glue_launches.py),
pinned: the GPU cost model charges each at its launch latency (docs/gpu-cost-model.md), so a
change that adds one must show up here. Lower is welcome: update the numbers below with it."""
import pytest

from benchmarks import glue_launches
from hycam_ext import ops

pytestmark = pytest.mark.skipif(not ops.kernels_available(), reason="hycam_ext._C not built")

# (hard, bias) -> glue launches of one training forward + backward in the steady state
# (bf16, T x d x K x r = 64 x 64 x 4 x 16; the count does not depend on the sizes). Before
# issue #22's cuts: 39 (hard routing, biases), 32 (soft).
PINNED = {(True, True): 15, (False, True): 11, (True, False): 15}


@pytest.mark.parametrize("hard,bias", sorted(PINNED))
def test_glue_launch_count_is_pinned(hard, bias):
    c = glue_launches.count(hard=hard, bias=bias)
    assert c["glue_launches"] == PINNED[(hard, bias)], c
    assert sum(c["forward"].values()) + sum(c["backward"].values()) == c["glue_launches"]


def test_glue_has_no_weight_rebuild_in_backward():
    """The backward uses the router-slot weights saved by the forward (no concatenation but the
    one that joins dw and the router's gradient, no identity, no zero fill, no copy)."""
    back = glue_launches.count()["backward"]
    assert back.get("cat", 0) == 1, back
    for op in ("eye", "new_zeros", "zeros", "zeros_like", "constant_pad_nd", "copy_", "clone"):
        assert op not in back, back
