"""Property-testing kit for data generators: a contract checker and hypothesis strategies.

Ten lines make a new generator trustworthy::

    from hypothesis import given, settings
    from optolab.testing import check_task, specs
    from mypkg.tasks import MySpec

    @settings(max_examples=30, deadline=None)
    @given(spec=specs(MySpec, n_tokens=st.integers(4, 32)))
    def test_my_generator_keeps_its_contract(spec):
        check_task(spec)

``check_task`` also takes a task YAML path, and is a pytest fixture of the same name (the
``optolab`` pytest plugin is registered when optolab is installed).
"""

from __future__ import annotations

import importlib
from typing import Any

# loaded on first use: the pytest plugin (optolab.testing.pytest_plugin) lives in this package,
# and every pytest session of an environment with optolab installed imports it
_CONTRACT = ("ContractReport", "TaskContractError", "as_task", "check_task")
_STRATEGIES = ("BUILTIN_STRATEGIES", "bursty_classes_specs", "data_seeds", "fewshot_specs", "fixed_labels_specs",
               "gaussian_icl_specs",
               "markov_icl_specs", "recurring_segments_specs", "repeat_tokens_specs", "spec_strategy", "specs", "steps",
               "task_seeds", "task_specs",
               "trigger_bigram_specs")
__all__ = sorted(_CONTRACT + _STRATEGIES)


def __getattr__(name: str) -> Any:
    module = "contract" if name in _CONTRACT else "strategies" if name in _STRATEGIES else None
    if module is None:
        raise AttributeError(f"module 'optolab.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"optolab.testing.{module}"), name)
    globals()[name] = value
    return value
