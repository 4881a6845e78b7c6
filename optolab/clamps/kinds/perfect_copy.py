"""``perfect_copy``: the logits at the query are one head's scores to the label tokens."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field

from optolab.clamps.kind import ClampSpec, Parts, PlanContext, Planned, When, record


class PerfectCopy(ClampSpec):
    """The logits at the query become the head's pre-softmax scores query → label tokens
    (every other label −1e9), so only that head's QK path and what feeds it learn."""

    KIND: ClassVar[str] = "perfect_copy"
    defines_output: ClassVar[bool] = True

    layer: Annotated[int, Field(strict=True, ge=0)]
    head: Annotated[int, Field(strict=True, ge=0)]

    def plan(self, i: int, ctx: PlanContext, when: When) -> Planned:
        ctx.check_layer(i, self.layer)
        ctx.check_heads(i, [self.head], "head")
        if ctx.batch.context_labels is None:
            raise ctx.error(i, "kind", "perfect_copy turns attention to label tokens into label logits, but this "
                            f"task ({ctx.task.kind}) has no label tokens.", "use it with a fewshot task.")
        return Planned(i, self, when)

    def contribute(self, c: Planned, parts: Parts) -> None:
        scores = f"blocks.{self.layer}.attn.hook_attn_scores"
        parts.add("main", scores, 4, record(("main", scores)))
        parts.output = ("main", scores, self.head)

    def describe(self, c: Planned, words) -> str:
        return (f"the output at the query is head {self.head} of layer {self.layer}'s pre-softmax scores to the label "
                "tokens (other labels −1e9), so only that head's QK path and what feeds it learn (2 passes in the "
                "paper; 1 here).")
