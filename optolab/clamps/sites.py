"""Hook sites: names, shorthands, and which tensor axes hold heads and positions.

Rules:
- Canonical names are the model's module paths, which follow TransformerLens
  (``blocks.1.attn.hook_pattern``). Shorthands expand to them: ``pattern1``, ``scores1`` /
  ``attn_scores1``, ``q0`` ``k0`` ``v0`` ``z0`` ``result0``, ``attn_out0``, ``resid_pre0`` /
  ``resid_mid0`` / ``resid_post0``, ``mlp_out0``, ``embed``.
- Per-head sites: q/k/v/z and result are ``[batch, pos, head, …]`` (head axis 2, position axis
  1); attn_scores and pattern are ``[batch, head, query_pos, key_pos]`` (head axis 1, and the
  positions a clamp selects are query rows, axis 2). Other sites have no head axis.
- Named positions: ``query`` is the last position; ``labels`` / ``exemplars`` are the label and
  exemplar slots of exemplar–label sequences (``x1 l1 x2 l2 … q``: labels at odd positions).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

SHORTHAND = re.compile(r"^(pattern|attn_scores|scores|q|k|v|z|result|attn_out|resid_pre|resid_mid|resid_post|mlp_out)(\d+)$")
ATTN_LEAVES = {"pattern": "hook_pattern", "attn_scores": "hook_attn_scores", "scores": "hook_attn_scores",
               "q": "hook_q", "k": "hook_k", "v": "hook_v", "z": "hook_z", "result": "hook_result"}


def canonical(site: str) -> str:
    """The TransformerLens name for a site or shorthand (not checked against a model)."""
    if site in ("embed", "hook_embed"):
        return "hook_embed"
    m = SHORTHAND.match(site)
    if m:
        kind, layer = m.groups()
        if kind in ATTN_LEAVES:
            return f"blocks.{layer}.attn.{ATTN_LEAVES[kind]}"
        return f"blocks.{layer}.hook_{kind}"
    return site


def suggest(site: str, valid: list[str], n: int = 3) -> str:
    close = difflib.get_close_matches(canonical(site), valid, n=n, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(f"'{c}'" for c in close) + "? (`optolab sites PROTOCOL` lists them all)"
    return "run `optolab sites PROTOCOL` to list every hook name with its shape."


@dataclass(frozen=True)
class SiteInfo:
    name: str
    layer: int | None
    head_axis: int | None
    pos_axis: int | None

    @property
    def is_pattern(self) -> bool:
        return self.name.endswith("attn.hook_pattern")

    @property
    def is_scores(self) -> bool:
        return self.name.endswith("attn.hook_attn_scores")


def site_info(name: str) -> SiteInfo:
    m = re.match(r"^blocks\.(\d+)\.", name)
    layer = int(m.group(1)) if m else None
    leaf = name.rsplit(".", 1)[-1]
    if ".attn." in name and leaf in ("hook_pattern", "hook_attn_scores"):
        return SiteInfo(name, layer, head_axis=1, pos_axis=2)
    if ".attn." in name and leaf in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result"):
        return SiteInfo(name, layer, head_axis=2, pos_axis=1)
    return SiteInfo(name, layer, head_axis=None, pos_axis=1)


def resolve_positions(positions: str | tuple[int, ...], n: int, exemplar_label: bool,
                      strict: bool = True) -> tuple[int, ...] | None:
    """Position indices for a sequence of length ``n`` (None = all). Raises ValueError, or with
    ``strict=False`` drops indices a shorter sequence (e.g. a probe) does not have."""
    if positions == "all":
        return None
    if positions == "query":
        return (n - 1,)
    if positions in ("labels", "exemplars"):
        if not exemplar_label:
            raise ValueError(f"positions: {positions} needs an exemplar-label task (x1 l1 x2 l2 … q)")
        return tuple(range(1 if positions == "labels" else 0, n - 1, 2)) + (() if positions == "labels" else (n - 1,))
    out = []
    for p in positions:
        if not -n <= p < n:
            if not strict:
                continue
            raise ValueError(f"position {p} is outside a sequence of {n} positions (0..{n - 1}, or -{n}..-1)")
        out.append(p % n)
    return tuple(sorted(set(out)))


@lru_cache(maxsize=256)
def selection_mask(shape: tuple[int, ...], head_axis: int | None, heads: tuple[int, ...] | None,
                   pos_axis: int | None, positions: tuple[int, ...] | None) -> torch.Tensor | None:
    """A bool mask broadcastable to ``shape`` that is True on the selected entries (None: all)."""
    if heads is None and positions is None:
        return None
    mask_shape = [1] * len(shape)
    mask = torch.ones(mask_shape, dtype=torch.bool)
    for axis, chosen in ((head_axis, heads), (pos_axis, positions)):
        if axis is None or chosen is None:
            continue
        view = [1] * len(shape)
        view[axis] = shape[axis]
        sel = torch.zeros(shape[axis], dtype=torch.bool)
        sel[list(chosen)] = True
        mask = mask & sel.view(view)
    return mask
