"""Built-in tasks, by ``kind``. ``make_task(spec)`` turns a validated spec into a task."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from optolab.tasks.base import IGNORE, Batch, ModelIO, Task, TaskSpec
from optolab.tasks.fewshot import FewshotSpec, FewshotTask
from optolab.tasks.repeat_tokens import RepeatTokensSpec, RepeatTokensTask

TASKS: dict[str, type[Task]] = {FewshotTask.kind: FewshotTask, RepeatTokensTask.kind: RepeatTokensTask}

AnyTaskSpec = Annotated[Union[FewshotSpec, RepeatTokensSpec], Field(discriminator="kind")]


def make_task(spec: TaskSpec) -> Task:
    return TASKS[spec.kind](spec)  # type: ignore[attr-defined]


__all__ = ["IGNORE", "TASKS", "AnyTaskSpec", "Batch", "FewshotSpec", "FewshotTask", "ModelIO",
           "RepeatTokensSpec", "RepeatTokensTask", "Task", "TaskSpec", "make_task"]
