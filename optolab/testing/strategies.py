"""Hypothesis strategies for task specs: built-in ones, and a generic one for your own.

Rules:
- Every strategy yields *valid* specs (instances of the spec class), kept small so a contract
  check runs in milliseconds: few classes, short contexts, small dimensions.
- ``specs(MySpec, field=strategy_or_value, …)`` derives a strategy for any ``TaskSpec``
  subclass from its fields: ``Literal`` → one of the values, ``bool`` → either, numbers →
  a small range starting at the field's lower bound (up to twice its default), anything else
  → its default. Pass a value or a strategy per field to override. Combinations the spec's
  own validators refuse are rejected (``assume``), so keep overrides consistent.
- ``task_specs()`` draws from every built-in kind; ``BUILTIN_STRATEGIES`` maps each built-in kind
  (found by the registry) to its task's own strategy (``Task.spec_strategy``), or to ``specs(Spec)``.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, get_args, get_origin

from hypothesis import assume
from hypothesis import strategies as st
from pydantic import ValidationError

from optolab.tasks import (
    BUILTIN,
    BurstyClassesTask,
    FewshotTask,
    FixedLabelsTask,
    GaussianICLTask,
    MarkovICLTask,
    RecurringSegmentsTask,
    RepeatTokensTask,
    TaskSpec,
    TriggerBigramTask,
)

task_seeds = st.integers(0, 2**31 - 1)
data_seeds = st.integers(0, 2**31 - 1)
steps = st.integers(0, 10**6)


def _bounds(info: Any) -> tuple[float | None, float | None, bool, bool]:
    lo = hi = None
    lo_open = hi_open = False
    for m in info.metadata:
        for name in ("ge", "gt", "le", "lt"):
            v = getattr(m, name, None)
            if v is None:
                continue
            if name in ("ge", "gt"):
                lo, lo_open = v, name == "gt"
            else:
                hi, hi_open = v, name == "lt"
    return lo, hi, lo_open, hi_open


def _field_strategy(info: Any) -> st.SearchStrategy:
    tp = info.annotation
    optional = False
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        tp = args[0] if len(args) == 1 else tp
    default = info.default
    lo, hi, lo_open, hi_open = _bounds(info)
    if get_origin(tp) is Literal:
        inner = st.sampled_from(get_args(tp))
    elif tp is bool:
        inner = st.booleans()
    elif tp is int:
        low = int(lo) + (1 if lo_open else 0) if lo is not None else 0
        base = default if isinstance(default, int) else low + 4
        top = max(low + 2, min(2 * base, low + 12))
        if hi is not None:
            top = min(top, int(hi) - (1 if hi_open else 0))
        inner = st.integers(low, max(low, top))
    elif tp is float:
        low = float(lo) if lo is not None else 0.0
        base = default if isinstance(default, (int, float)) else low + 1.0
        top = max(low + 1e-3, 2 * base if base > 0 else low + 1.0)
        if hi is not None:
            top = min(top, float(hi))
        inner = st.floats(low, top, exclude_min=lo_open, exclude_max=hi_open and top == hi, allow_nan=False)
    else:
        return st.just(default)
    return st.one_of(st.none(), inner) if optional and default is None else inner


def specs(spec_cls: type[TaskSpec], **fixed: Any) -> st.SearchStrategy:
    """Valid instances of ``spec_cls``; ``fixed`` gives a value or a strategy per field."""

    @st.composite
    def build(draw: Any) -> TaskSpec:
        data = {}
        for name, info in spec_cls.model_fields.items():
            if name in ("kind", "generator"):
                continue
            if name in fixed:
                value = fixed[name]
                data[name] = draw(value) if isinstance(value, st.SearchStrategy) else value
            elif name == "task_seed":
                data[name] = draw(task_seeds)
            elif name == "data_stream":  # only the streams the task has
                data[name] = draw(st.sampled_from(spec_cls.DATA_STREAMS))
            else:
                data[name] = draw(_field_strategy(info))
        try:
            return spec_cls.model_validate(data)
        except ValidationError:
            assume(False)
            raise AssertionError("unreachable") from None

    return build()


# --- built-in tasks: each module's own small, always-valid parameter space ------------------


def spec_strategy(cls: type) -> st.SearchStrategy:
    """The task class's own strategy (``Task.spec_strategy``), or one derived from its ``Spec``."""
    own = cls.spec_strategy()
    return own if own is not None else specs(cls.Spec)


# every built-in kind, found by the registry: a new task module needs no line here
BUILTIN_STRATEGIES = {kind: (lambda cls=cls: spec_strategy(cls)) for kind, cls in sorted(BUILTIN.items())}
# the names earlier releases exported
fewshot_specs = FewshotTask.spec_strategy
repeat_tokens_specs = RepeatTokensTask.spec_strategy
gaussian_icl_specs = GaussianICLTask.spec_strategy
bursty_classes_specs = BurstyClassesTask.spec_strategy
markov_icl_specs = MarkovICLTask.spec_strategy
trigger_bigram_specs = TriggerBigramTask.spec_strategy
fixed_labels_specs = FixedLabelsTask.spec_strategy
recurring_segments_specs = RecurringSegmentsTask.spec_strategy


def task_specs() -> st.SearchStrategy:
    """A spec of any built-in kind."""
    return st.one_of(*(make() for make in BUILTIN_STRATEGIES.values()))
