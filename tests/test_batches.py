"""Training batches drawn ahead: the same batches as drawn on time, once per data seed, never
past the run's end, and a step out of order (a resume) still gets its own batch."""

from __future__ import annotations

import torch

from optolab.protocol.loader import validate_protocol
from optolab.tasks import make_task
from optolab.training.batches import Batches

from .conftest import fewshot_protocol


class Counting:
    def __init__(self, task):
        self.task, self.calls = task, []

    def train_batch(self, seed, step, bs):
        self.calls.append((seed, step))
        return self.task.train_batch(seed, step, bs)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip((*a.inputs, a.targets), (*b.inputs, b.targets)))


def test_batches_drawn_ahead_are_the_batches_drawn_on_time():
    task = make_task(validate_protocol(fewshot_protocol(steps=10)).task)
    source = Counting(task)
    draw = Batches(source, [3, 3, 5], 4, total=10, ahead=4)
    first = draw(0)
    assert first[0] is first[1]  # one seed, one batch
    assert sorted(source.calls) == [(3, s) for s in range(4)] + [(5, s) for s in range(4)]
    for step in range(1, 10):
        got = draw(step)
        assert _same(got[0], task.train_batch(3, step, 4)) and _same(got[2], task.train_batch(5, step, 4))
    assert max(s for _, s in source.calls) == 9  # never past the last step
    assert len(source.calls) == 20  # each (seed, step) once
    assert _same(draw(2)[2], task.train_batch(5, 2, 4))  # out of order: drawn again
