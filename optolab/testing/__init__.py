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

from optolab.testing.contract import ContractReport, TaskContractError, as_task, check_task
from optolab.testing.strategies import (BUILTIN_STRATEGIES, bursty_classes_specs, data_seeds, fewshot_specs,
                                        gaussian_icl_specs, markov_icl_specs, repeat_tokens_specs, specs, steps,
                                        task_seeds, task_specs, trigger_bigram_specs)

__all__ = ["BUILTIN_STRATEGIES", "ContractReport", "TaskContractError", "as_task", "bursty_classes_specs",
           "check_task", "data_seeds", "fewshot_specs", "gaussian_icl_specs", "markov_icl_specs",
           "repeat_tokens_specs", "specs", "steps", "task_seeds", "task_specs", "trigger_bigram_specs"]
