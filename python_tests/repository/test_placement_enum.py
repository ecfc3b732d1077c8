"""hycam_ext.config.Placement and the C++ hycam::Placement are one enum written twice: same names,
same values (the ops take the value as an int)."""
import re
from pathlib import Path

from hycam_ext.config import Placement

HEADER = Path(__file__).resolve().parents[2] / "csrc" / "common" / "placement.h"


def test_python_and_cpp_placement_agree():
    body = re.search(r"enum class Placement\s*:\s*int64_t\s*\{([^}]*)\}", HEADER.read_text())
    assert body, f"no `enum class Placement : int64_t {{...}}` in {HEADER}"
    cpp = {name: int(value) for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", body.group(1))}
    assert cpp == {p.name: p.value for p in Placement}
    assert len(cpp) == 2
