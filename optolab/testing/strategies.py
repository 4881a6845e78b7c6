"""Hypothesis strategies for task specs: built-in ones, and a generic one for your own.

Rules:
- Every strategy yields *valid* specs (instances of the spec class), kept small so a contract
  check runs in milliseconds: few classes, short contexts, small dimensions.
- ``specs(MySpec, field=strategy_or_value, …)`` derives a strategy for any ``TaskSpec``
  subclass from its fields: ``Literal`` → one of the values, ``bool`` → either, numbers →
  a small range starting at the field's lower bound (up to twice its default), anything else
  → its default. Pass a value or a strategy per field to override. Combinations the spec's
  own validators refuse are rejected (``assume``), so keep overrides consistent.
- ``task_specs()`` draws from every built-in kind.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Literal, get_args, get_origin

from hypothesis import assume
from hypothesis import strategies as st
from pydantic import ValidationError

from optolab.tasks import (
    BurstyClassesSpec,
    FewshotSpec,
    FixedLabelsSpec,
    GaussianICLSpec,
    MarkovICLSpec,
    RecurringSegmentsSpec,
    RepeatTokensSpec,
    TaskSpec,
    TriggerBigramSpec,
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
            else:
                data[name] = draw(_field_strategy(info))
        try:
            return spec_cls.model_validate(data)
        except ValidationError:
            assume(False)
            raise AssertionError("unreachable") from None

    return build()


# --- built-in tasks: small, always-valid parameter spaces ----------------------------------


@st.composite
def fewshot_specs(draw: Any) -> FewshotSpec:
    context_pairs = draw(st.integers(1, 4))
    burstiness = draw(st.integers(1, context_pairs))
    k = 1 + context_pairs - burstiness
    n_labels = draw(st.integers(k + 1, k + 5))
    held = 0.3 if math.comb(n_labels, k) >= 4 else 0.0
    n_exemplars = draw(st.integers(2, 5))
    return FewshotSpec(
        n_train_classes=draw(st.integers(max(k, 2), 12)), n_test_classes=draw(st.integers(max(k, 2), 12)),
        n_exemplars=n_exemplars, train_exemplars=draw(st.integers(1, n_exemplars - 1)),
        dim=draw(st.integers(2, 24)), design=draw(st.sampled_from(["relu_lowrank", "lowrank", "relu", "isotropic"])),
        latent_dim=draw(st.integers(1, 6)), noise=draw(st.floats(0, 1)), context_pairs=context_pairs,
        burstiness=burstiness, n_labels=n_labels, heldout_label_frac=held, task_seed=draw(task_seeds))


@st.composite
def repeat_tokens_specs(draw: Any) -> RepeatTokensSpec:
    n_repeats = draw(st.integers(2, 4))
    loss_on = draw(st.sampled_from(["all", "repeats"]))
    shortest = 2 if loss_on == "repeats" and n_repeats == 2 else 1  # something must be scored
    seq_len = draw(st.integers(shortest, 12))
    variable = draw(st.booleans())
    return RepeatTokensSpec(n_tokens=draw(st.integers(2, 40)), seq_len=seq_len,
                            seq_len_min=draw(st.integers(shortest, seq_len)) if variable else None,
                            n_repeats=n_repeats, loss_on=loss_on)


@st.composite
def gaussian_icl_specs(draw: Any) -> GaussianICLSpec:
    n_labels = draw(st.integers(2, 8))
    n_classes = n_labels * draw(st.integers(1, 6))
    context_pairs = draw(st.integers(1, 8))
    divisors = [d for d in range(1, context_pairs + 1) if context_pairs % d == 0 and context_pairs // d <= n_classes]
    burstiness = draw(st.sampled_from(divisors))
    return GaussianICLSpec(
        n_classes=n_classes, n_labels=n_labels, context_pairs=context_pairs, dim=draw(st.integers(1, 16)),
        noise=draw(st.floats(0, 2)), burstiness=burstiness, bursty_frac=draw(st.floats(0, 1)),
        zipf=draw(st.floats(0, 2)), novel_frac=draw(st.floats(0, 1)),
        n_test_classes=draw(st.integers(context_pairs // burstiness, 20)), task_seed=draw(task_seeds))


@st.composite
def bursty_classes_specs(draw: Any) -> BurstyClassesSpec:
    ways = draw(st.integers(1, 3))
    context_pairs = ways * draw(st.integers(2 if ways == 1 else 1, 4))
    shots = draw(st.integers(1, context_pairs // ways))
    n_labels = draw(st.integers(max(2, ways), 10))
    return BurstyClassesSpec(
        n_classes=n_labels * draw(st.integers(1, 4)), n_labels=n_labels,
        n_holdout_classes=draw(st.integers(max(2, ways), 8)), n_exemplars=draw(st.integers(1, 4)),
        dim=draw(st.integers(1, 16)), design=draw(st.sampled_from(["relu_lowrank", "lowrank", "relu", "isotropic"])),
        latent_dim=draw(st.integers(1, 6)), noise=draw(st.floats(0, 1)), context_pairs=context_pairs,
        bursty_frac=draw(st.floats(0, 1)), bursty_classes=ways, shots=shots, zipf=draw(st.floats(0, 2)),
        task_seed=draw(task_seeds))


@st.composite
def markov_icl_specs(draw: Any) -> MarkovICLSpec:
    order = draw(st.integers(1, 2))
    return MarkovICLSpec(n_states=draw(st.integers(2, 5)), order=order, seq_len=draw(st.integers(order + 2, 40)),
                         concentration=draw(st.sampled_from([0.3, 1.0, 2.5])), reference_sequences=50,
                         task_seed=draw(task_seeds))


@st.composite
def trigger_bigram_specs(draw: Any) -> TriggerBigramSpec:
    n_tokens = draw(st.integers(3, 24))
    return TriggerBigramSpec(n_tokens=n_tokens, seq_len=draw(st.integers(32, 64)),
                             n_triggers=draw(st.integers(1, min(4, n_tokens - 1))),
                             fixed_triggers=draw(st.booleans()),
                             background_concentration=draw(st.sampled_from([0.05, 0.3, 1.0])),
                             resolution=draw(st.sampled_from([64, 256, 1024])),
                             loss_on=draw(st.sampled_from(["all", "outputs"])), task_seed=draw(task_seeds))


@st.composite
def fixed_labels_specs(draw: Any) -> FixedLabelsSpec:
    context_pairs = draw(st.integers(2, 4))
    n_labels = draw(st.integers(context_pairs + 1, 12))
    return FixedLabelsSpec(
        n_classes=n_labels * draw(st.integers(1, 4)), n_labels=n_labels,
        n_holdout_classes=draw(st.integers(context_pairs, 8)), n_exemplars=draw(st.integers(2, 5)),
        dim=draw(st.integers(1, 16)), design=draw(st.sampled_from(["relu_lowrank", "lowrank", "relu", "isotropic"])),
        latent_dim=draw(st.integers(1, 6)), noise=draw(st.floats(0, 1)), context_pairs=context_pairs,
        match_query=draw(st.booleans()), task_seed=draw(task_seeds))


@st.composite
def recurring_segments_specs(draw: Any) -> RecurringSegmentsSpec:
    seq_len = draw(st.integers(8, 48))
    min_len = draw(st.integers(2, 6))
    min_gap = draw(st.integers(1, 4))
    return RecurringSegmentsSpec(
        n_tokens=draw(st.integers(2, 40)), seq_len=seq_len, bigram_scale=draw(st.sampled_from([0.0, 1.0, 3.0])),
        skip_scale=draw(st.sampled_from([0.0, 1.0])), copy_rate=draw(st.sampled_from([0.2, 0.5, 1.0])),
        min_len=min_len, max_len=draw(st.integers(min_len, 12)), min_gap=min_gap,
        max_gap=draw(st.one_of(st.none(), st.integers(min_gap, seq_len))), noise=draw(st.sampled_from([0.0, 0.2])),
        task_seed=draw(task_seeds))


BUILTIN_STRATEGIES = {
    "fewshot": fewshot_specs, "repeat_tokens": repeat_tokens_specs, "gaussian_icl": gaussian_icl_specs,
    "bursty_classes": bursty_classes_specs, "markov_icl": markov_icl_specs, "trigger_bigram": trigger_bigram_specs,
    "fixed_labels": fixed_labels_specs, "recurring_segments": recurring_segments_specs,
}


def task_specs() -> st.SearchStrategy:
    """A spec of any built-in kind."""
    return st.one_of(*(make() for make in BUILTIN_STRATEGIES.values()))
