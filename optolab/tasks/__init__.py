"""Tasks: synthetic sequence generators behind one interface (:class:`Task`).

Built-in kinds: ``fewshot`` (Singh et al. 2024), ``repeat_tokens`` (Olsson et al. 2022),
``gaussian_icl`` (Reddy 2023), ``bursty_classes`` (Chan et al. 2022), ``markov_icl`` (Edelman et
al. 2024), ``trigger_bigram`` (Bietti et al. 2023), ``fixed_labels`` (Singh et al. 2025) and
``recurring_segments`` (Olsson et al. 2022's induction heads on a Markov background). Users add their own by entry point or by
``generator: package.module:Class`` (:mod:`optolab.tasks.registry`).
"""

from __future__ import annotations

from optolab.tasks.base import IGNORE, Batch, Holdout, ModelIO, Task, TaskSpec, rng
from optolab.tasks.bursty_classes import BurstyClassesSpec, BurstyClassesTask
from optolab.tasks.fewshot import FewshotSpec, FewshotTask
from optolab.tasks.fixed_labels import FixedLabelsSpec, FixedLabelsTask
from optolab.tasks.gaussian_icl import GaussianICLSpec, GaussianICLTask
from optolab.tasks.markov_icl import MarkovICLSpec, MarkovICLTask
from optolab.tasks.recurring_segments import RecurringSegmentsSpec, RecurringSegmentsTask
from optolab.tasks.registry import BUILTIN, known_kinds, make_task, task_class, validate_task_spec
from optolab.tasks.repeat_tokens import RepeatTokensSpec, RepeatTokensTask
from optolab.tasks.trigger_bigram import TriggerBigramSpec, TriggerBigramTask

__all__ = ["BUILTIN", "IGNORE", "Batch", "BurstyClassesSpec", "BurstyClassesTask", "FewshotSpec", "FewshotTask",
           "FixedLabelsSpec", "FixedLabelsTask",
           "GaussianICLSpec", "GaussianICLTask", "Holdout", "MarkovICLSpec", "MarkovICLTask", "ModelIO",
           "RecurringSegmentsSpec", "RecurringSegmentsTask",
           "RepeatTokensSpec", "RepeatTokensTask", "Task", "TaskSpec", "TriggerBigramSpec", "TriggerBigramTask",
           "known_kinds", "make_task", "rng", "task_class", "validate_task_spec"]
