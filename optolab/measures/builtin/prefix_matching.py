"""``prefix_matching`` (Olsson et al. 2022): attention from a repeated token to the tokens that
followed its earlier occurrences, per head — on the task's own splits where they have repeats,
the lagged variant (the best lag up to ``max_lag``), and on Olsson's repeated-random-tokens probe
(split ``probe_repeat``) built from the model's vocabulary (token tasks).

With ``recent_prefix_matching: true`` also ``prefix_matching_recent``: attention to the key after
the query token's most recent earlier occurrence only (stricter: Olsson's score sums over the keys
after every earlier occurrence). A head with no role is not at 0 on either: uniform attention over
the prefix scores :func:`optolab.measures.attention.uniform_prefix_matching` (docs/measures.md)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from optolab.core.counts import PosCount
from optolab.measures.attention import lagged_prefix_matching, most_recent, prefix_matching
from optolab.measures.measure import Curve, Measure, ModelData, SplitData, head_rows
from optolab.measures.probes import repeat_probe

PATTERN = "blocks.{layer}.attn.hook_pattern"


class PrefixMatching(Measure):
    NAME: ClassVar[str] = "prefix_matching"
    METRICS: ClassVar[tuple[str, ...]] = ("prefix_matching", "prefix_matching_recent", "prefix_matching_lagged",
                                          "prefix_matching_lag")
    CURVES: ClassVar[tuple[Curve, ...]] = (
        Curve("prefix_matching", "induction", title="Prefix matching (the task's repeats)"),
        Curve("prefix_matching", "induction", split="probe_repeat", title="Prefix matching (Olsson probe)"))
    SITES: ClassVar[tuple[str, ...]] = (PATTERN,)
    DOC: ClassVar[str] = "Olsson's prefix-matching score, on the task's repeats and on a repeated-tokens probe"
    OPTIONS: ClassVar[dict] = {
        "probe_sequences": (PosCount, Field(10, description="sequences per Olsson probe (prefix matching, copying)")),
        "lagged_prefix_matching": (bool, Field(True, description="also the best score over target keys shifted by "
                                                                 "0..max_lag")),
        "max_lag": (int, Field(8, ge=0, le=64)),
        "recent_prefix_matching": (bool, Field(False, description="also prefix_matching_recent: attention to the "
                                                                  "key after the most recent earlier occurrence only")),
    }

    def build(self, task, spec, seed: int, n_ctx: int):
        vocab = task.token_probe_vocab()
        if vocab is None:
            return None
        return repeat_probe(vocab[0], vocab[1], n_ctx, self.options(spec).probe_sequences, seed)

    def on_split(self, d: SplitData) -> list[dict]:
        targets = d.batch.induction_targets
        if targets is None:
            return []
        rows = []
        for layer in range(d.n_layers):
            pattern = d.saved[PATTERN.format(layer=layer)]
            rows += head_rows(d.split, "prefix_matching", prefix_matching(pattern, targets), layer)
            options = self.options(d.spec)
            if options.recent_prefix_matching:
                rows += head_rows(d.split, "prefix_matching_recent", prefix_matching(pattern, most_recent(targets)),
                                  layer)
            if options.lagged_prefix_matching:
                best, lag = lagged_prefix_matching(pattern, targets, options.max_lag)
                rows += head_rows(d.split, "prefix_matching_lagged", best, layer)
                rows += head_rows(d.split, "prefix_matching_lag", lag, layer)
        return rows

    def on_model(self, d: ModelData) -> list[dict]:
        probe = d.data
        if probe is None:
            return []
        _, saved = d.forward(d.model, probe, step=d.step, training=False, save=d.sites)
        variants = [("prefix_matching", probe.induction_targets)]
        if d.spec.recent_prefix_matching:
            variants.append(("prefix_matching_recent", most_recent(probe.induction_targets)))
        return [row for layer in range(d.model.cfg.n_layers) for metric, targets in variants
                for row in head_rows("probe_repeat", metric, prefix_matching(saved[PATTERN.format(layer=layer)], targets),
                                     layer)]
