"""HyCAMConfig: the hyper-parameters of one HyCAM layer (their meaning: docs/method.md)."""
from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any, Dict, Optional, Union


class Placement(enum.IntEnum):
    """Where the CAM multiplies, between the attention output a and the residual stream h_in:
    RESIDUAL ``(h_in + a) * CAM(x)``, ATTENTION ``h_in + a * CAM(x)``. The values are the ops'
    ``placement`` argument (torch.ops.hycam.cam_forward / cam_backward) and match the C++ enum
    hycam::Placement (csrc/common/placement.h; python_tests/repository/test_placement_enum.py)."""
    RESIDUAL = 0
    ATTENTION = 1

    @property
    def label(self) -> str:
        """The config's spelling: "residual" or "attention"."""
        return self.name.lower()

    @classmethod
    def of(cls, value: Union["Placement", str, int]) -> "Placement":
        """A Placement from itself, its label ("residual", "attention") or its value (0, 1)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value in _PLACEMENT_LABELS:
            return _PLACEMENT_LABELS[value]
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            return cls(value)
        raise ValueError(f"placement must be one of {PLACEMENTS} (or a hycam_ext.Placement), "
                         f"got {value!r}")


_PLACEMENT_LABELS = {p.label: p for p in Placement}
PLACEMENTS = tuple(_PLACEMENT_LABELS)
PARAM_DTYPES = ("float32", "base")
ROUTINGS = ("token", "task")


@dataclasses.dataclass
class HyCAMConfig:
    """hidden_size d (None: the integrations take it from the model; a standalone HyCAM needs
    it), num_specialists K, rank r, alpha (s = alpha / r), Gumbel temperature tau,
    hard (straight-through one-hot) or soft routing, bias of the CAM projections, placement
    "residual" ((h_in + a) * CAM) or "attention" (h_in + a * CAM) (a :class:`Placement` is
    accepted too and stored by its label; ``placement_enum`` gives it back), aux_loss_coef of the
    load-balancing loss, train_layernorms (integrations also train the two layer norms),
    use_kernels (False: compute through the reference formulation), aux_loss_scope "rank" or
    "global" (see load_balancing_loss), param_dtype (integrations: "float32" master weights, the
    default, computing in the activations' dtype; or "base", the base model's dtype). All
    kernels are deterministic: there is no switch.

    routing (beyond the paper): "token" (the paper's: a learned router on each token's x) or
    "task" (every token of a sequence routed by its task id through per-layer learned
    task-to-specialist logits [num_tasks, K], with the same Gumbel / hard / soft machinery;
    the forward then needs task ids)."""
    hidden_size: Optional[int] = None
    num_specialists: int = 4
    rank: int = 16
    alpha: float = 32.0
    tau: float = 0.5
    hard: bool = True
    bias: bool = True
    placement: Union[str, Placement] = "residual"
    aux_loss_coef: float = 0.01
    train_layernorms: bool = False
    use_kernels: bool = True
    aux_loss_scope: str = "rank"
    param_dtype: str = "float32"
    routing: str = "token"
    num_tasks: Optional[int] = None

    def __post_init__(self) -> None:
        def _int(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"HyCAMConfig.{name} must be an int >= {lo}, got {v!r}")

        if self.hidden_size is not None:
            _int("hidden_size", 1)
        _int("num_specialists", 1)
        _int("rank", 1)
        for name in ("alpha", "tau", "aux_loss_coef"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"HyCAMConfig.{name} must be a finite number, got {v!r}")
            setattr(self, name, float(v))
        if self.tau <= 0:
            raise ValueError(f"HyCAMConfig.tau must be > 0, got {self.tau!r}")
        if self.aux_loss_coef < 0:
            raise ValueError(f"HyCAMConfig.aux_loss_coef must be >= 0, got {self.aux_loss_coef!r}")
        if not isinstance(self.placement, (str, Placement)) or (
                not isinstance(self.placement, Placement) and self.placement not in PLACEMENTS):
            raise ValueError(
                f"HyCAMConfig.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        self.placement = Placement.of(self.placement).label   # the label: JSON, comparisons
        if self.aux_loss_scope not in ("rank", "global"):
            raise ValueError(
                f"HyCAMConfig.aux_loss_scope must be 'rank' or 'global', got {self.aux_loss_scope!r}")
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"HyCAMConfig.param_dtype must be one of {PARAM_DTYPES}, got "
                             f"{self.param_dtype!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"HyCAMConfig.routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.routing == "task":
            _int("num_tasks", 1)
        elif self.num_tasks is not None:
            raise ValueError("HyCAMConfig.num_tasks is only used with routing='task'")
        for name in ("hard", "bias", "train_layernorms", "use_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"HyCAMConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def placement_enum(self) -> Placement:
        """``placement`` as the :class:`Placement` the ops take."""
        return Placement.of(self.placement)

    @property
    def scaling(self) -> float:
        """s = alpha / r."""
        return self.alpha / self.rank

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "HyCAMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"HyCAMConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
