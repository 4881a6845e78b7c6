"""The compiled path (``train.compile: true``): every forward of a run through ``torch.compile``.

Rules:
- Same protocol semantics as the clamp engine: the same :class:`~optolab.clamps.engine.Program`
  (passes, sites in forward order, ops in protocol order) built by the same engine, applied at
  the same hook points. Only the mechanism differs: each site the run's programs touch has one
  site hook (:class:`~optolab.model.hooks.SiteHooks`, through :class:`SiteDispatch`) that does
  nothing until a program call sets the ops of the pass being run; the whole program (every
  pass, plus the copy head's logits) is one compiled graph. Per-head attention results are
  computed only in layers whose ``hook_result`` a clamp touches.
- The call's random key (:mod:`optolab.clamps.rng`) and its step are inputs of the graph, made
  outside it (:func:`~optolab.clamps.values.call_inputs`): a step-aware or stochastic op compiles
  once for every step (``tests/test_ramp.py`` counts the graphs).
- So are clamp windows: programs are asked of the engine with ``windows=True``, so a site clamp
  with a window is in the program at every step of its phase, gated by ``live`` (which clamps
  act at the call, made outside the graph from the step and the windows; rules in
  :mod:`optolab.clamps.engine`). Crossing a window's boundary, or packing conditions that differ
  only in their windows (a window scan), compiles no new graph (``tests/test_windows.py`` counts
  them). Clamps that add passes, define the output or prepare inputs still switch programs at
  their boundaries.
- What is compiled: every forward of the run. Evaluations call :class:`CompiledForward` (which
  saves the activations measures read through the same dispatch, ``save`` ops last at their
  site, as the engine orders them); a training step compiles its forward, loss and backward as
  one graph (:mod:`optolab.training.compiled_step`, and the ensemble's ``_Step``), after which
  torch's Adam updates.
- Each distinct program compiles once per input shape (shapes are static, so an eval set of
  another size is another graph). Before that, one eager pass without gradients fills the
  per-shape caches the ops keep (selection masks, fixed patterns), so the compiler only ever
  sees dictionary lookups. Every step is compiled, so a resumed run repeats the uninterrupted
  one exactly.
- Results equal the nnsight path up to float rounding (the compiler reorders sums); the
  tolerance is stated and tested in ``tests/test_compiled.py``.
- A compiled run starts by clearing torch.compile's caches (:func:`fresh_caches`) and allowing
  :data:`RECOMPILES` graphs per function (torch's default, 8, is below what a run with
  pass-adding clamps' windows and two eval shapes needs): a long-lived process (a sweep worker, a notebook) then
  never hits the limit, where torch would silently fall back to eager.
- On CPU the compiler needs a C++ compiler; without one the protocol is refused before anything
  runs (:func:`require_compiler`), not at the first step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from optolab.clamps.engine import (
    ClampForward,
    Program,
    program_logits,
    saving,
)
from optolab.clamps.union import Conditions
from optolab.clamps.values import PassContext
from optolab.core.device import has_compiler
from optolab.core.errors import OptolabError
from optolab.model.forward import Forward
from optolab.model.hooks import SiteHooks
from optolab.tasks.base import Batch

RECOMPILES = 64


# Inductor's CPU kernels vectorise the innermost axis. Ours are a head's 8 dims and a context of
# a few keys: with 256-bit vectors (8 floats) those are whole vectors, with the default 512-bit
# ones they are masked half-vectors and horizontal reductions. Measured on the attention block
# of the main config (one core, forward + backward): 868 µs at 512 bits, 462 µs at 256 bits;
# a compiled ensemble of 8: 618 -> 733 model-steps/s.
# ``cpp.vec_isa_ok``: the vector ISA is the CPU's own (256-bit AVX2 here), taken without torch's
# probe, which builds and loads a test library per ISA in every process: ≈6 s of each sweep
# worker's first compile (measured, cold cache), for a check that g++ can target AVX2.
OPTIONS = {"cpp.simdlen": 256, "cpp.vec_isa_ok": True}
# A training step's graph runs every step: there, a C++ wrapper (instead of Python code calling
# each kernel and allocating each buffer) and no per-call stride asserts on extern kernels' outputs
# take the main config from 575 to 590 steps/s (one clamp, one core); it costs a few seconds more
# compiling, which evals (a few hundred calls per run) would not earn back.
STEP_OPTIONS = {**OPTIONS, "cpp_wrapper": True, "size_asserts": False}


def step_options(device: torch.device) -> dict:
    """A training step's compile options on ``device`` (the C++ wrapper is measured on CPUs only)."""
    return STEP_OPTIONS if device.type == "cpu" else OPTIONS


def compile_fn(fn: Callable, options: dict = OPTIONS) -> Callable:
    """``fn`` through torch.compile as this module uses it: one graph, static shapes."""
    return torch.compile(fn, fullgraph=True, dynamic=False, options=options)


def require_compiler(device: torch.device = torch.device("cpu")) -> None:
    if not has_compiler(device):
        need = "a C++ compiler on PATH (e.g. g++)" if device.type == "cpu" else \
            "Triton" if device.type == "cuda" else "a device torch.compile supports here (cpu or cuda)"
        raise OptolabError(f"train.compile needs {need} on {device} (torch.compile builds its kernels), "
                           "and it is missing.", field="train.compile",
                           fix="install it, or set train.compile: false (or auto, which then runs eagerly).")




def fresh_caches() -> None:
    torch.compiler.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILES)


def layout(x: object) -> object:
    """A hashable description of what a compiled call may depend on besides tensor values:
    tensor shapes and dtypes, containers' keys, and any other value itself (as its repr)."""
    if isinstance(x, Tensor):
        return ("T", tuple(x.shape), x.dtype)
    if isinstance(x, dict):
        return tuple((k, layout(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, *(layout(v) for v in x))
    if hasattr(x, "__dataclass_fields__"):
        return (type(x).__name__, layout(vars(x)))
    return repr(x)


class CallKeys:
    """Skips torch's per-call guard check on a training step where it cannot change the answer.

    A training step's compiled function runs every call under :meth:`guards` with the call's
    key: its program and the layout of its other inputs (:func:`layout`). A key's first call
    checks every guard (and compiles a graph when none fits); later calls with the same key run
    under ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, which checks the inputs'
    tensor properties and the guards that have ever told the function's graphs apart (torch
    records those at each recompile), so the graph that ran for the key the first time is the one
    chosen. That is sound because nothing else such a graph reads changes within a run: the
    model, its parameters and buffers, and the ops' caches keep their identity and shapes, and a
    site hook added later for another program does nothing outside that program's passes. It
    saves ~0.2 ms of guard checks per step (~4 % of a solo step on the main config, ~5 % of an
    ensemble's). Evals keep torch's full check."""

    def __init__(self) -> None:
        self._seen: set[tuple] = set()

    def guards(self, program: Program, *inputs: object):
        key = (id(program), layout(inputs))  # programs live as long as their engine: ids stay unique
        if key in self._seen:
            return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
        self._seen.add(key)
        return contextlib.nullcontext()


def unused_parameters(loss_fn: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor]) -> frozenset[str]:
    """The parameters ``loss_fn`` does not depend on at all (a layer clamp cuts the layers below
    it off the loss). Autograd leaves them without a gradient and torch's optimizers skip them
    (no update, no weight decay, no step count); ``torch.func.grad`` gives them zeros instead, so
    a compiled step must skip them itself. One eager forward and backward."""
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    grads = torch.autograd.grad(loss_fn(leaves), list(leaves.values()), allow_unused=True)
    return frozenset(n for n, g in zip(leaves, grads) if g is None)


class SiteDispatch:
    """Runs clamp programs through site hooks (:class:`~optolab.model.hooks.SiteHooks`, with
    per-head results fused where no clamp needs them): every pass of a program, the logits the
    loss is taken on, and the saved activations. The hooks stay for the dispatch's life (one
    model's run) and act only inside a program call, so plain calls of the model are untouched."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.hooks = SiteHooks(model, fuse_heads=True)
        self._warm: set[tuple] = set()

    def warm(self, program: Program, shapes: tuple, eager: Callable[[], object]) -> None:
        """Before ``program``'s first compiled call at these input shapes: hook its sites and run
        it once eagerly (``eager()``) without gradients, which fills the per-shape caches the ops
        keep (selection masks, fixed patterns), so the compiler only sees dictionary lookups."""
        key = (id(program), shapes)  # programs live as long as their engine's cache: ids stay unique
        if key in self._warm:
            return
        self.cover(program)
        with torch.no_grad():
            eager()
        self._warm.add(key)

    def cover(self, program: Program) -> None:
        """Hook every site ``program`` acts at (once per site)."""
        self.hooks.cover(site for p in program.passes for site, _ops in p.steps)

    def run(self, program: Program, batch: Batch, inputs: dict, model: Callable | None = None,
            gate: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Every pass of ``program`` on ``batch``: the logits the loss is taken on, and the saved
        activations. ``inputs`` are the pass context's (``prepared``, ``key``); ``model`` stands in
        for the hooked model (an ensemble member's ``functional_call`` of it); ``gate`` is the
        member's condition in a union program."""
        model = self.model if model is None else model
        ctx = PassContext(batch, gate=gate, **inputs)
        logits = {}
        for p in program.passes:
            with self.hooks.acting(dict(p.steps), ctx):
                logits[p.name] = model(*batch.inputs)
        return program_logits(program, logits, ctx, batch), ctx.saved

    def close(self) -> None:
        self.hooks.close()


class CompiledForward(Forward):
    """The protocol's Forward (``inner``: the clamp engine, or plain; or an ensemble's
    conditions) with every call compiled."""

    def __init__(self, inner: Forward) -> None:
        self.inner = inner
        self._dispatch: SiteDispatch | None = None
        self._compiled: Callable | None = None
        self._saving: dict[tuple[str, ...], Program] = {}

    def __call__(self, model: nn.Module, batch: Batch, *, step: int, training: bool,
                 save: Sequence[str] = (), gate: Tensor | None = None,
                 seeds: tuple[int, int] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """As any Forward; ``gate`` is the member's condition when ``inner`` is an ensemble's
        :class:`~optolab.clamps.union.Conditions` (one graph serves every condition); ``seeds``
        an ensemble member's (its random key)."""
        program, inputs = self.program(model, batch, step, training, save, seeds)
        dispatch = self.dispatch(model)
        args = (program, batch, inputs) if gate is None else (program, batch, inputs, None, gate)
        dispatch.warm(program, tuple(t.shape for t in batch.inputs), lambda: dispatch.run(*args))
        return self._compiled(*args)

    def program(self, model: nn.Module, batch: Batch, step: int, training: bool,
                save: Sequence[str] = (), seeds: tuple[int, int] | None = None) -> tuple[Program, dict]:
        """The clamp program of this call (the engine's, or the plain one that saves ``save``)
        and the pass context's inputs (:meth:`ClampForward.prepare
        <optolab.clamps.engine.ClampForward.prepare>`)."""
        program, inputs = None, {}
        if isinstance(self.inner, (ClampForward, Conditions)):
            program, inputs = self.inner.prepare(model, batch, step, training, save, seeds, windows=True)
        if program is None:
            key = tuple(save)
            program = self._saving.get(key) or self._saving.setdefault(key, saving(key))
            inputs = {}
        return program, inputs

    def own_program(self, step: int, training: bool) -> Program:
        """The program of the clamps acting at ``step``, windows as constants (the switching
        path's): what :func:`unused_parameters` is asked of, so that a gated clamp's window
        changes which parameters get no update exactly as it does without gating."""
        program = self.inner.program_at(step, training) if isinstance(self.inner, ClampForward) else None
        if program is None:
            program = self._saving.get(()) or self._saving.setdefault((), saving(()))
        return program

    def dispatch(self, model: nn.Module) -> SiteDispatch:
        """The site hooks on ``model`` (one set per model, shared with :mod:`optolab.training.compiled_step`)."""
        if self._dispatch is None or self._dispatch.model is not model:
            if self._dispatch is not None:
                self._dispatch.close()
            self._dispatch = SiteDispatch(model)
            self._compiled = compile_fn(self._dispatch.run)
        return self._dispatch

    def close(self) -> None:
        if self._dispatch is not None:
            self._dispatch.close()
            self._dispatch = None
        self.inner.close()

    def after_backward(self, model: nn.Module, step: int) -> None:
        self.inner.after_backward(model, step)

    def after_update(self, model: nn.Module, step: int) -> None:
        self.inner.after_update(model, step)
