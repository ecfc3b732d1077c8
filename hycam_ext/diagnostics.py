"""Routing diagnostics: does the router follow the tasks, and do the specialists differ?

:func:`routing_diagnostics` takes, per task, what ``HyCAMModel.collect_routing()`` gathered over
that task's held-out data, and the model's HyCAM modules, and returns per layer:

* ``mi``: normalised mutual information between task and route, I(T; R) / H(T), with the
  tokens as samples (T: the token's task, R: its specialist, routes as the eval routing's
  weights g). 0: the routes say nothing about the task; 1: the route identifies the task.
* ``entropy``: route entropy H(R) / log K (1: uniform use of the specialists).
* ``shares``: each specialist's share of the tokens.
* ``similarity``: mean pairwise cosine similarity of the specialists' expansion weights B_k
  (1: they learned the same thing; NaN while B = 0, at initialisation).
* ``aux``: the load-balancing loss L_aux over all the tasks' tokens (1/K when the mean routes
  and the mean router probabilities are both uniform; it is minimal whenever *usage* is
  balanced, however confident the router: it does not measure routing quality).

and ``mean``, the same averaged over layers.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch


def _cosine_similarity_of_specialists(B: torch.Tensor) -> float:
    """Mean pairwise cosine similarity of B[k] (flattened) over k < k'; NaN if K < 2 or B = 0."""
    K = B.shape[0]
    flat = B.detach().float().reshape(K, -1)
    norms = flat.norm(dim=1)
    if K < 2 or bool((norms == 0).any()):
        return float("nan")
    unit = flat / norms[:, None]
    sim = unit @ unit.T
    iu = torch.triu_indices(K, K, offset=1)
    return float(sim[iu[0], iu[1]].mean())


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def routing_diagnostics(per_task: Dict[str, dict], cams: Sequence) -> dict:
    """``per_task``: task name -> a ``collect_routing()`` result (``dist``, ``q_dist``,
    ``tokens``); ``cams``: the HyCAM modules, one per layer. See the module docstring."""
    if not per_task:
        raise ValueError("routing_diagnostics: no tasks")
    tasks = list(per_task)
    L, K = per_task[tasks[0]]["dist"].shape
    layers: List[dict] = []
    for li in range(L):
        counts = torch.tensor([float(per_task[t]["tokens"][li]) for t in tasks],
                              dtype=torch.float64)
        dists = torch.stack([per_task[t]["dist"][li].double() for t in tasks])      # [T, K]
        qd = torch.stack([per_task[t]["q_dist"][li].double() for t in tasks])
        ok = counts > 0
        n = float(counts[ok].sum())
        if n == 0:
            layers.append(dict(mi=float("nan"), entropy=float("nan"), shares=[float("nan")] * K,
                               similarity=float("nan"), aux=float("nan")))
            continue
        joint = (dists[ok] * counts[ok, None]) / n                                    # p(t, k)
        pt, pk = joint.sum(1), joint.sum(0)
        ht = _entropy(pt)
        nz = joint > 0
        mi = float((joint[nz] * (joint[nz] / (pt[:, None] * pk[None, :])[nz]).log()).sum())
        pq = (qd[ok] * counts[ok, None]).sum(0) / n
        layers.append(dict(
            mi=mi / ht if ht > 0 else float("nan"),
            entropy=_entropy(pk) / math.log(K) if K > 1 else float("nan"),
            shares=[float(v) for v in pk],
            similarity=_cosine_similarity_of_specialists(cams[li].B) if li < len(cams) else float("nan"),
            aux=float((pk * pq).sum()),
        ))

    def mean(key):
        vals = [d[key] for d in layers if not math.isnan(d[key])]
        return sum(vals) / len(vals) if vals else float("nan")
    return {"layers": layers, "mean": {k: mean(k) for k in ("mi", "entropy", "similarity", "aux")},
            "tasks": tasks}
