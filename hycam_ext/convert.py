"""Map a state dict written by the authors' HyCAM code onto hycam_ext's parameter names."""
from __future__ import annotations

import re
from typing import Callable, Dict, Optional

import torch

_SIMPLE = {
    "Shared_CAM_Trans.weight": "shared_weight",
    "Shared_CAM_Trans.bias": "shared_bias",
    "router_logits_linear.weight": "router_weight",
    "router_logits_linear.bias": "router_bias",
}
_SPECIALIST = re.compile(r"^(?P<prefix>.*?)Multi_LC_Trans\.(?P<k>\d+)\.Lora_CAM_(?P<m>[ANB])\.(?P<p>weight|bias)$")
_SIMPLE_RE = re.compile(r"^(?P<prefix>.*?)(?P<name>Shared_CAM_Trans|router_logits_linear)\.(?P<p>weight|bias)$")


def convert_official_state_dict(sd: Dict[str, torch.Tensor],
                                prefix_map: Optional[Callable[[str], str]] = None
                                ) -> Dict[str, torch.Tensor]:
    """Return a new state dict: the authors' HyCAM keys (``...Shared_CAM_Trans.weight``,
    ``...router_logits_linear.bias``, ``...Multi_LC_Trans.<k>.Lora_CAM_A.weight``, ``_N``, ``_B``)
    become ``<prefix>shared_weight``, ``<prefix>A`` ([K, r, d], stacked over k), ... where
    ``<prefix>`` is whatever stood before the authors' module name, passed through
    ``prefix_map`` if given (e.g. to append ``"hycam."``). Other keys are copied unchanged."""
    if not isinstance(sd, dict):
        raise TypeError(f"convert_official_state_dict: sd must be a dict, got {type(sd).__name__}")
    pm = prefix_map or (lambda s: s)
    out: Dict[str, torch.Tensor] = {}
    groups: Dict[str, Dict[str, Dict[int, torch.Tensor]]] = {}
    for key, value in sd.items():
        m = _SPECIALIST.match(key)
        if m:
            ours = {"A": "A", "N": "N", "B": "B"}[m["m"]] + ("" if m["p"] == "weight" else "_bias")
            groups.setdefault(m["prefix"], {}).setdefault(ours, {})[int(m["k"])] = value
            continue
        m = _SIMPLE_RE.match(key)
        if m:
            out[pm(m["prefix"]) + _SIMPLE[f"{m['name']}.{m['p']}"]] = value
            continue
        out[key] = value
    for prefix, params in groups.items():
        ks = None
        for name, by_k in sorted(params.items()):
            idx = sorted(by_k)
            if idx != list(range(len(idx))):
                raise ValueError(f"convert_official_state_dict: specialists of '{prefix}Multi_LC_Trans' "
                                 f"for Lora_CAM {name} are {idx}; expected 0..K-1 with none missing")
            if ks is not None and len(idx) != ks:
                raise ValueError(f"convert_official_state_dict: '{prefix}Multi_LC_Trans' has {ks} "
                                 f"specialists for one matrix and {len(idx)} for {name}")
            ks = len(idx)
            out[pm(prefix) + name] = torch.stack([by_k[k] for k in idx])
    return out
