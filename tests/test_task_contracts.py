"""The contract checker on every built-in generator (hypothesis), and on broken ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from optolab.tasks import FewshotSpec, FewshotTask, GaussianICLSpec, RepeatTokensSpec, TriggerBigramSpec, make_task
from optolab.testing import BUILTIN_STRATEGIES, TaskContractError, check_task, specs

PROPERTY = settings(max_examples=12, deadline=None)
QUICK = dict(batch_size=8, eval_sequences=16, max_batch_ms=None)


@pytest.mark.parametrize("kind", sorted(BUILTIN_STRATEGIES))
def test_every_builtin_generator_keeps_its_contract(kind):
    @PROPERTY
    @given(spec=BUILTIN_STRATEGIES[kind]())
    def check(spec):
        report = check_task(spec, **QUICK)
        assert {"determinism", "shapes", "holdouts", "icl_recoverable"} <= set(report.checks)

    check()


def test_generic_spec_strategy_yields_valid_specs_of_any_spec_class():
    @PROPERTY
    @given(spec=specs(GaussianICLSpec, n_classes=64, n_labels=8, dim=4, n_test_classes=16))
    def check(spec):
        assert isinstance(spec, GaussianICLSpec) and spec.n_classes == 64
        check_task(spec, **QUICK)

    check()


def test_shipped_task_specs_pass_with_the_speed_budget():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "tasks").glob("*.yaml")):
        report = check_task(path, max_batch_ms=50.0)
        assert report.batch_ms > 0, path


# --- deliberately broken generators ---------------------------------------------------------


class LeakyFewshot(FewshotTask):
    """The first sequence of every training batch draws its query from a held-out class."""

    def train_batch(self, seed, step, batch_size):
        batch = super().train_batch(seed, step, batch_size)
        leak = self.spec.n_train_classes  # the first held-out class
        batch.extra["classes"] = batch.extra["classes"].clone()
        batch.extra["classes"][0, -1] = leak
        batch.inputs = (batch.inputs[0].clone(), batch.inputs[1])
        batch.inputs[0][0, -1] = self.exemplars[leak, 0]
        return batch


class GlobalRNGFewshot(FewshotTask):
    def train_batch(self, seed, step, batch_size):
        batch = super().train_batch(seed, step, batch_size)
        batch.inputs = (batch.inputs[0] + 0.01 * torch.randn_like(batch.inputs[0]), batch.inputs[1])
        return batch


class WrongLabelFewshot(FewshotTask):
    """The ICL splits' targets are shifted, so the context no longer gives the answer."""

    def eval_batch(self, split, seed, n):
        batch = super().eval_batch(split, seed, n)
        batch.targets = batch.targets.clone()
        batch.targets[:, -1] = (batch.targets[:, -1] + 1) % self.spec.n_labels
        return batch


class OutOfRangeRepeat(make_task(RepeatTokensSpec()).__class__):
    def train_batch(self, seed, step, batch_size):
        batch = super().train_batch(seed, step, batch_size)
        batch.targets = torch.where(batch.targets >= 0, batch.targets + 100, batch.targets)
        return batch


def test_a_leaked_heldout_class_is_caught_with_a_clear_message():
    with pytest.raises(TaskContractError) as e:
        check_task(LeakyFewshot(FewshotSpec(dim=16)), **QUICK)
    msg = str(e.value)
    assert "contract.holdouts" in msg and "held-out classes [50]" in msg and "seed 0, step 0" in msg
    assert "Fix:" in msg and "\n" not in msg


@pytest.mark.parametrize("broken, check", [
    (GlobalRNGFewshot(FewshotSpec(dim=16)), "contract.determinism"),
    (WrongLabelFewshot(FewshotSpec(dim=16)), "contract.metadata"),
    (OutOfRangeRepeat(RepeatTokensSpec()), "contract.shapes"),
])
def test_other_broken_promises_are_caught(broken, check):
    with pytest.raises(TaskContractError, match=check):
        check_task(broken, **QUICK)


def test_unrecoverable_icl_target_is_caught():
    class NoMatchFewshot(FewshotTask):
        def eval_batch(self, split, seed, n):  # labels shuffled without updating the masks
            batch = super().eval_batch(split, seed, n)
            batch.match_mask = batch.nonmatch_mask = None
            batch.inputs = (batch.inputs[0], (batch.inputs[1] + 1) % self.spec.n_labels)
            batch.context_labels = None
            return batch

    with pytest.raises(TaskContractError, match="icl_recoverable.*cannot be read off"):
        check_task(NoMatchFewshot(FewshotSpec(dim=16)), **QUICK)


def test_the_speed_budget_is_enforced():
    with pytest.raises(TaskContractError, match="contract.speed"):
        check_task(TriggerBigramSpec(seq_len=64), max_batch_ms=1e-6)


def test_the_pytest_fixture_is_the_checker(check_task):
    assert check_task(RepeatTokensSpec(), **QUICK).kind == "repeat_tokens"


def test_a_generator_that_raises_is_reported_in_one_line():
    class Crashing(FewshotTask):
        def eval_batch(self, split, seed, n):
            if split == "fsl_test_class":
                raise IndexError("index 150 is out of bounds")
            return super().eval_batch(split, seed, n)

    with pytest.raises(TaskContractError) as e:
        check_task(Crashing(FewshotSpec(dim=16)), **QUICK)
    assert "contract.calls" in str(e.value) and "eval_batch('fsl_test_class', 0, 16) raised IndexError" in str(e.value)
