"""``layer_clamp``: a named multi-pass recipe that replaces a layer's output (Singh et al.'s
perfect previous-token input)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from optolab.clamps.kind import ClampSpec, Parts, PlanContext, Planned, When, record
from optolab.clamps.values import shift_right


class LayerClamp(ClampSpec):
    """A named multi-pass recipe. ``perfect_prev_token_input``: the output of ``layer`` is
    replaced by the embeddings shifted one position right (pass b, whose next-layer patterns are
    recorded) and by the embeddings themselves (pass c, with those patterns forced). With
    ``copy_head``, the logits come from that next-layer head's scores in pass b instead."""

    KIND: ClassVar[str] = "layer_clamp"
    needs: ClassVar[dict[str, int]] = {"shifted": 10}  # after the clean reference, before main
    shareable: ClassVar[bool] = False

    recipe: Literal["perfect_prev_token_input"] = "perfect_prev_token_input"
    layer: Annotated[int, Field(strict=True, ge=0)] = 0
    copy_head: Annotated[int, Field(strict=True, ge=0)] | None = None

    @property
    def defines_output(self) -> bool:  # type: ignore[override]
        return self.copy_head is not None

    def plan(self, i: int, ctx: PlanContext, when: When) -> Planned:
        L = ctx.cfg.n_layers
        if self.layer + 1 >= L:
            raise ctx.error(i, "layer", f"layer_clamp replaces the output of layer {self.layer} and forces the "
                            f"patterns of the next layer, but the model has {L} layers.", f"use a layer below {L - 1}.")
        if self.copy_head is not None:
            ctx.check_heads(i, [self.copy_head], "copy_head")
        if not ctx.exemplar_label:
            raise ctx.error(i, "recipe", "perfect_prev_token_input shifts exemplar embeddings into label slots; "
                            "it needs an exemplar-label task.", "use it with a fewshot task.")
        earlier = next((c for c in ctx.planned if isinstance(c.spec, LayerClamp)), None)
        if earlier is not None:
            raise ctx.error(i, "kind", f"clamp {earlier.index} is already a layer_clamp; one recipe "
                            "per protocol.", "keep one layer_clamp.")
        return Planned(i, self, when)

    def writes(self, c: Planned):
        return [(f"blocks.{self.layer}.hook_resid_post", None, "all"),
                (f"blocks.{self.layer + 1}.attn.hook_pattern", None, "all")]

    def excludes_main(self) -> bool:
        return self.copy_head is not None

    def always_excludes_main(self) -> bool:
        # a copy-head layer clamp has no main pass, but only while it acts: before, after or
        # between its windows (or phases) the main pass runs
        return (self.copy_head is not None and self.window.start == 0 and self.window.stop is None
                and self.apply_at == "both")

    def pack_constraint(self) -> object:
        # the layers cut off the loss: members that depend on other parameters would share Adam's
        # step counts (optolab.training.ensemble._adam)
        return ("layer_clamp", self.layer)

    def contribute(self, c: Planned, parts: Parts) -> None:
        L = self.layer
        embed, resid, nxt = "blocks.0.hook_resid_pre", f"blocks.{L}.hook_resid_post", f"blocks.{L + 1}.attn"
        parts.add("shifted", embed, 0, record(("shifted", "embed")))
        parts.add("shifted", resid, 3, lambda out, ctx: shift_right(ctx.recorded[("shifted", "embed")]))
        parts.add("shifted", f"{nxt}.hook_pattern", 4, record(("shifted", f"{nxt}.hook_pattern")))
        if self.copy_head is not None:
            parts.add("shifted", f"{nxt}.hook_attn_scores", 4, record(("shifted", f"{nxt}.hook_attn_scores")))
            parts.output = ("shifted", f"{nxt}.hook_attn_scores", self.copy_head)
            return
        parts.add("main", embed, 0, record(("main", "embed")))
        parts.add("main", resid, 3, lambda out, ctx: ctx.recorded[("main", "embed")])
        parts.add("main", f"{nxt}.hook_pattern", 3,
                  lambda out, ctx, k=("shifted", f"{nxt}.hook_pattern"): ctx.recorded[k])

    def describe(self, c: Planned, words) -> str:
        nxt = self.layer + 1
        text = (f"perfect previous-token input — the output of layer {self.layer} is replaced by the embeddings "
                f"shifted one position right (each label slot holds the exemplar before it; first and last keep "
                f"their own), and layer {nxt}'s patterns are recorded")
        if self.copy_head is not None:
            return text + (f"; the output at the query is head {self.copy_head} of layer {nxt}'s pre-softmax scores to "
                           f"the label tokens in that pass, so only the match step (subcircuit B) learns. Layers ≤ "
                           f"{self.layer} get no gradient.")
        return text + (f"; then the output of layer {self.layer} is the embeddings themselves and layer {nxt}'s "
                       f"patterns are forced to the recorded ones (3 passes; 2 traces here). Layers ≤ {self.layer} "
                       "get no gradient.")
