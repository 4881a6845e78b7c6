"""Hooks on a model's sites: the one mechanism optolab uses to read or change activations
outside nnsight.

Rules:
- A site is a :class:`~optolab.model.transformer.HookPoint`, named by its module path
  (TransformerLens names). Hooks are PyTorch forward hooks whose handles are kept and removed.
- :class:`SiteHooks` holds one hook per site it covers, registered once and removed by
  :meth:`SiteHooks.close`. A hook does nothing unless a pass is running (:meth:`SiteHooks.acting`
  sets the pass's ops and context): nnsight traces and plain calls of the same model then see an
  untouched forward. The clamp engine's hooks backend, saved activations, the compiled path and
  ensembles all use it.
- Per-head results (``hook_result``) cost an extra product per head. With ``fuse_heads`` the
  hooks turn them off in every layer (``Attention.per_head_results``) except where a covered
  site needs them; :meth:`close` restores the flags.
- :func:`dry_run` runs a model once with a hook on every site and returns each site's shape, in
  firing order (forward order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn

from optolab.model.transformer import Attention, Transformer

Op = Callable[[torch.Tensor, object], torch.Tensor]


class SiteHooks:
    """Forward hooks on a model's sites that apply the running pass's ops (see the module rules)."""

    def __init__(self, model: nn.Module, fuse_heads: bool = False) -> None:
        self.model = model
        self.ops: dict[str, list[Op]] | None = None
        self.ctx: object = None
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._modules = dict(model.named_modules())
        self._flags = {name: m.per_head_results for name, m in self._modules.items() if isinstance(m, Attention)}
        if fuse_heads:
            for name in self._flags:
                self._modules[name].per_head_results = False

    def cover(self, sites: Iterable[str]) -> None:
        """Hook every site in ``sites`` (once per site)."""
        for site in sites:
            if site in self._handles:
                continue
            self._handles[site] = self._modules[site].register_forward_hook(self._hook(site))
            if site.endswith("attn.hook_result"):  # somebody reads or writes the per-head results
                self._modules[site.rsplit(".", 1)[0]].per_head_results = True

    def _hook(self, site: str):
        def fn(_module, _inputs, out):
            ops = self.ops.get(site) if self.ops is not None else None
            if not ops:
                return None
            new = out
            for op in ops:
                new = op(new, self.ctx)
            return new
        return fn

    @contextmanager
    def acting(self, ops: dict[str, list[Op]], ctx: object):
        """While the block runs, each covered site applies ``ops[site]`` with ``ctx``."""
        self.ops, self.ctx = ops, ctx
        try:
            yield self
        finally:  # an interrupted call must not leave ops acting on later plain calls
            self.ops, self.ctx = None, None

    def close(self) -> None:
        """Remove every hook and restore the per-head flags."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        for name, flag in self._flags.items():
            self._modules[name].per_head_results = flag



def dry_run(model: Transformer, batch) -> dict[str, tuple[int, ...]]:
    """Shapes of every hook site that fires, in firing order."""
    shapes: dict[str, tuple[int, ...]] = {}

    def grab(name: str):
        def hook(_m, _i, out) -> None:  # returns None: a forward hook's return value replaces the output
            shapes.setdefault(name, tuple(out.shape))
        return hook

    handles = [m.register_forward_hook(grab(name)) for name, m in model.hook_points().items()]
    try:
        with torch.no_grad():
            model(*batch.inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes
