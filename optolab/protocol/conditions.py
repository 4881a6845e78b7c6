"""Post-hoc conditions: a protocol's ``conditions: {name: [clamps…]}``, each evaluated as the
protocol's own clamps (condition ``base``) plus its own (``optolab evaluate``,
:mod:`optolab.experiments.posthoc`).

Rules:
- A condition is the protocol with ``clamps`` extended and ``conditions`` emptied.
- Errors in a condition's own clamps are reported at ``conditions.<name>.<i>.<field>``.
"""

from __future__ import annotations

from optolab.core.errors import OptolabError
from optolab.protocol.schema import Protocol


def condition_protocols(protocol: Protocol) -> dict[str, Protocol]:
    out = {"base": protocol}
    for name, clamps in protocol.conditions.items():
        out[name] = protocol.model_copy(update={"clamps": [*protocol.clamps, *clamps], "conditions": {}})
    return out


def plan_condition(protocol: Protocol, name: str, n_base: int, task, cfg):
    """Plan one condition, reporting errors at ``conditions.<name>.<i>``."""
    try:
        return protocol.clamp_plan(task, cfg)
    except OptolabError as e:
        field = e.field or ""
        if name != "base" and field.startswith("clamps."):
            i, _, rest = field[len("clamps."):].partition(".")
            if i.isdigit() and int(i) >= n_base:
                field = f"conditions.{name}.{int(i) - n_base}" + (f".{rest}" if rest else "")
        raise OptolabError(e.message, field=field or None, fix=e.fix) from None
