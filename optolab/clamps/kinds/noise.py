"""``noise``: add Gaussian noise to the selected entries, fresh at every step.

The numbers come from the randomness channel (:mod:`optolab.clamps.rng`): keyed by the run's
seeds, the step, the phase and the clamp's index, so a run is reproducible and resumable, and
the nnsight, hooks, compiled and ensemble paths draw the same noise. With ``relative: true``,
``sigma`` is in units of the activation's root mean square per sequence (over all its entries
but the masked −inf scores; no gradient through the scale). The noise adds to the activation:
gradients pass through unchanged.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field

from optolab.clamps.kind import Planned, SiteClamp


class Noise(SiteClamp):
    """Add ``sigma`` × standard normal noise (× the activation's RMS with ``relative``)."""

    KIND: ClassVar[str] = "noise"
    shareable: ClassVar[bool] = False  # each condition draws with its own clamp index (the planner finds it too)

    sigma: float = Field(gt=0, description="the noise's standard deviation")
    relative: Annotated[bool, Field(strict=True)] = Field(
        False, description="sigma in units of the activation's RMS per sequence")

    def fill(self, c: Planned):
        sigma, relative, stream = self.sigma, self.relative, c.index
        scores = c.site.is_scores

        def noisy(out, ctx):
            z = ctx.normal_like(out, stream)
            scale = sigma
            if relative:
                x = out.detach()
                dims = tuple(range(1, x.dim()))
                if scores:  # masked keys hold -inf: leave them out of the scale
                    keep = torch.isfinite(x)
                    x = torch.where(keep, x, torch.zeros(()))
                    mean_sq = x.pow(2).sum(dims, keepdim=True) / keep.sum(dims, keepdim=True).clamp_min(1)
                else:
                    mean_sq = x.pow(2).mean(dims, keepdim=True)
                scale = sigma * mean_sq.sqrt()
            return out + scale * z

        return noisy

    def describe(self, c: Planned, words) -> str:
        how = f"{self.sigma:g} × its RMS per sequence" if self.relative else f"{self.sigma:g}"
        return f"Gaussian noise with standard deviation {how} is added to {words.where(c)}, drawn anew at every step."
