"""HyCAMConfig: the hyper-parameters of one HyCAM layer (their meaning: docs/method.md)."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, Optional

PLACEMENTS = ("residual", "attention")
PARAM_DTYPES = ("float32", "base")
ROUTINGS = ("token", "task")


@dataclasses.dataclass
class HyCAMConfig:
    """hidden_size d (None: the integrations take it from the model; a standalone HyCAM needs
    it), num_specialists K, rank r, alpha (s = alpha / r), Gumbel temperature tau,
    hard (straight-through one-hot) or soft routing, bias of the CAM projections, placement
    "residual" ((h_in + a) * CAM) or "attention" (h_in + a * CAM), aux_loss_coef of the
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
    placement: str = "residual"
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
        if self.placement not in PLACEMENTS:
            raise ValueError(
                f"HyCAMConfig.placement must be one of {PLACEMENTS}, got {self.placement!r}")
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
