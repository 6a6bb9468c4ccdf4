"""Matrix-multiply FLOPs of a traced program, counted from its jaxpr.

XLA's ``cost_analysis()`` counts the body of a loop once, whatever its trip count, so for a train
step with gradient accumulation (a ``lax.scan`` over micro-batches), a chunked loss or a sampler
loop it reports a fraction of the work. Here every ``dot_general`` is counted (2·M·N·K) and
multiplied by the trip counts of the scans around it; a ``while_loop`` has no static trip count,
so its body is counted once and the result is flagged as a lower bound. Elementwise work
(softmax, norms, the optimizer) is left out: on a matrix unit it is a few percent of the time.
Recomputation under remat is in the jaxpr of the gradient, so it is counted.
"""

from __future__ import annotations

import math
from typing import Any

import jax.extend.core as jcore


def _subjaxprs(params: dict) -> list[Any]:
    out = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jcore.ClosedJaxpr):
                out.append(item.jaxpr)
            elif isinstance(item, jcore.Jaxpr):
                out.append(item)
    return out


def _count(jaxpr: Any) -> tuple[float, bool]:
    total, exact = 0.0, True
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
            continue
        subs = [_count(j) for j in _subjaxprs(eqn.params)]
        if not subs:
            continue
        if name == "scan":
            total += eqn.params["length"] * sum(f for f, _ in subs)
        elif name == "cond":  # one branch runs: count the costliest
            total += max(f for f, _ in subs)
        else:  # pjit, remat, custom_jvp/vjp calls, while (body once: trip count unknown)
            total += sum(f for f, _ in subs)
            exact = exact and name != "while"
        exact = exact and all(e for _, e in subs)
    return total, exact


def matmul_flops(closed_jaxpr: Any) -> tuple[float, bool]:
    """(FLOPs of every matrix multiply of the program at its global shapes, exact). ``exact`` is
    False when a while loop was counted once (the number is then a lower bound)."""
    return _count(closed_jaxpr.jaxpr)
