"""The protocol: one YAML file that says what to train, how, and what to measure.

Rules:
- Sections: ``name``, ``description``, ``task``, ``data`` (a data schedule:
  :mod:`optolab.protocol.data_schedule`), ``model``, ``train``, ``seeds``, ``measures``
  and ``clamps`` (each validated by its kind's schema: :mod:`optolab.clamps.registry`). Unknown keys at any level are errors, never
  ignored.
- ``task`` is a path to a task spec YAML (relative to the protocol file), or a mapping that is
  either a whole spec (with ``kind``) or ``{spec: PATH, <field>: <override>, …}``.
- Counts (``sequences``, ``steps``, ``every``, …) accept ``1e6``-style numbers if integral.
- Schedules in ``sequences`` fire at the first step whose sequence count reaches the point
  (``step = ceil(sequences / batch_size)``), as in the authors' loop. Step 0 (the initial model)
  and the last step are always evaluated and checkpointed.
- The *resolved* protocol (every default filled in, the task spec inlined) is what a run
  records; loading it again gives the same protocol.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr, SerializeAsAny, field_validator, model_validator

from optolab.clamps.kind import ClampSpec
from optolab.clamps.plan import Plan, plan_clamps
from optolab.clamps.registry import validate_clamps
from optolab.core.counts import Count, PosCount, Seed
from optolab.core.device import DEVICE_PATTERN
from optolab.core.errors import OptolabError, SpecError
from optolab.core.schedule import Schedule
from optolab.core.strict import StrictModel
from optolab.measures.registry import measures_spec
from optolab.model.config import ModelConfig
from optolab.protocol.data_schedule import DataSchedule
from optolab.tasks import Task, TaskSpec, validate_task_spec

MAX_PARAMS = 1_000_000_000  # parameters in the blocks; 16 GiB with Adam's two moments and grads


class ModelSpec(StrictModel):
    # Upper bounds catch typos (an extra zero or three), not ambition: see MAX_PARAMS.
    n_ctx: int | None = Field(None, ge=1, le=65_536, description="context length; default: the task's")
    n_layers: int = Field(2, ge=1, le=256)
    n_heads: int = Field(8, ge=1, le=1024)
    d_model: int = Field(64, ge=1, le=65_536)
    d_head: int | None = Field(None, ge=1, le=65_536, description="default: d_model / n_heads")
    attn_only: bool = True
    d_mlp: int = Field(256, ge=1, le=262_144)
    layer_norm: bool = Field(True, description="pre-LayerNorm in every block")
    final_ln: bool = True
    positional: Literal["rope", "learned", "none"] = "rope"
    rope_base: float = Field(10000.0, gt=0)
    smeared_keys: bool = False
    qkv_bias: bool = False
    unembed_bias: bool = True
    init_std: float | None = Field(None, gt=0, description="default: 1/sqrt(fan_in)")

    @model_validator(mode="after")
    def _fill_d_head(self) -> ModelSpec:
        if self.d_head is None:
            if self.d_model % self.n_heads:
                divisors = [h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]
                raise SpecError("n_heads", f"n_heads ({self.n_heads}) does not divide d_model ({self.d_model}).",
                                f"use n_heads in {divisors[-6:]}, or set d_head explicitly.")
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        block = 4 * self.d_model * self.n_heads * self.d_head + (0 if self.attn_only else 2 * self.d_model * self.d_mlp)
        if self.n_layers * block > MAX_PARAMS:
            raise SpecError("d_model", f"this model has about {self.n_layers * block:.2g} parameters in its blocks "
                            f"(over {MAX_PARAMS:.0e}; with Adam that is {16 * self.n_layers * block / 2**30:.0f} GiB).",
                            "optolab trains small models: check n_layers, d_model, n_heads and d_head for a typo.")
        return self


class Checkpoints(StrictModel):
    # log-spaced early, so a run keeps something to open near its early dynamics and its drop
    schedule: Schedule = Field(default_factory=lambda: Schedule(every=100_000, per_decade=4))
    keep: int | None = Field(None, ge=1, description="keep only the newest N (default: all)")


class StopAtAnswer(StrictModel):
    """Stop a run once its question is answered (:mod:`optolab.training.stopping`)."""

    metric: str = Field("loss", description="the metric whose crossing is the question (on `split`)")
    split: str | None = Field(None, description="default: the task's main split")
    threshold: float = Field(0.5, description="the crossing: at or below it (direction down), at or above (up)")
    direction: Literal["down", "up"] = "down"
    layer: int | None = Field(None, ge=0, description="a per-head score: the best head of this layer (default: of any)")
    margin_evals: Count = Field(3, description="evals to keep training after the crossing (for curves and detectors)")
    cap_sequences: PosCount | None = Field(None, description="stop uncrossed at the first eval at or past this many "
                                                             "sequences: the run is censored there")


class TrainSpec(StrictModel):
    lr: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0, description="max global grad norm; null: none")
    batch_size: PosCount = 32
    sequences: PosCount | None = Field(None, description="budget in sequences (or give steps)")
    steps: PosCount | None = Field(None, description="budget in optimizer steps (or give sequences)")
    fused: bool = Field(True, description="fused Adam kernel where the device has one")
    flush_denormals: bool = Field(True, description="treat denormal floats as 0 while training (CPU speed)")
    clamp_engine: Literal["nnsight", "hooks"] = Field(
        "nnsight", description="how clamps are applied: nnsight traces, or the same ops as raw forward hooks")
    compile: bool | Literal["auto"] = Field(
        "auto", description="every forward (training and evals) through torch.compile (optolab.training.compiled): "
                            "~2.5-4x faster, equal to the nnsight path up to float rounding; costs a compile per "
                            "clamp program. auto: compiled when the run is long enough to repay that "
                            "(optolab.core.device.decide_compile)")
    device: str = Field("auto",
                        description="auto (a GPU where torch sees one, else the CPU), cpu, cuda, cuda:N or mps "
                                    "(optolab.core.device); not part of the run's identity: a run may resume "
                                    "on another device")
    precision: Literal["fp32", "tf32", "bf16"] = Field(
        "fp32", description="fp32; tf32 (TensorFloat-32 matmuls on GPUs); bf16 (forward under bfloat16 autocast)")
    deterministic: bool = Field(False, description="torch's deterministic algorithms (GPUs; CPU runs always are)")
    track: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="also log every metrics row and figure to TensorBoard and/or Weights & "
                                          "Biases (offline unless WANDB_MODE=online; optolab.training.trackers); "
                                          "not part of the run's identity")
    checkpoints: Checkpoints = Field(default_factory=Checkpoints)
    stop: StopAtAnswer | None = Field(None, description="stop once a crossing is seen (plus a margin) or at a cap; "
                                                        "not part of the run's identity: a stopped run resumes to "
                                                        "its full budget without it")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, v):
            raise SpecError("", f"'{v}' is not a device.", "use auto, cpu, cuda, cuda:N or mps.")
        return v

    @model_validator(mode="after")
    def _budget(self) -> TrainSpec:
        if (self.sequences is None) == (self.steps is None):
            both = "both are given" if self.steps is not None else "neither is given"
            raise SpecError("steps", f"give exactly one of train.sequences or train.steps ({both}).",
                            "keep one budget, e.g. steps: 1000 or sequences: 1e6.")
        for b in self.betas:
            if not 0 <= b < 1:
                raise SpecError("betas", f"Adam betas must lie in [0, 1), got {self.betas}.",
                                "use e.g. betas: [0.9, 0.999].")
        return self

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else math.ceil(self.sequences / self.batch_size)


class InitFrom(StrictModel):
    """Start from another run's weights (``init_from``), instead of ``seeds.init``."""

    run: str = Field(description="a run directory (its checkpoint at `step`) or a step_*.safetensors file")
    step: Count | None = Field(None, description="the checkpoint's step (default: the run's last)")
    optimizer: bool = Field(False, description="also take its Adam state (moments and step counts)")


class Origin:
    """The file (and its line map) a protocol was read from. Not part of what the protocol is:
    two equal protocols read from two files are equal."""

    __slots__ = ("source", "lines")

    def __init__(self, source: str | None = None, lines: dict | None = None) -> None:
        self.source, self.lines = source, lines

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Origin)

    def __hash__(self) -> int:
        return 0


class Seeds(StrictModel):
    init: Seed = Field(0, description="model initialisation")
    data: Seed = Field(0, description="training batches")
    eval: Seed = Field(1, description="fixed evaluation sets (keep fixed across seeds)")


MeasuresSpec = measures_spec()  # schedule, eval set size, and each registered measure's switch and options


class Protocol(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    description: str = ""
    # validated by the task's own Spec class (found by kind or generator; see tasks/registry.py)
    task: Annotated[SerializeAsAny[TaskSpec], BeforeValidator(validate_task_spec)]
    # training data by step windows: switch or mix tasks (optolab.protocol.data_schedule); evals stay on `task`
    data: DataSchedule | None = Field(None, description="switch the training task, or mix tasks, in step windows")
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec
    seeds: Seeds = Field(default_factory=Seeds)
    init_from: InitFrom | None = Field(None, description="start from another run's checkpoint (weights, optionally "
                                                         "Adam's state); the task may differ, the model may not")
    measures: MeasuresSpec = Field(default_factory=MeasuresSpec)  # type: ignore[valid-type]
    # validated by each kind's own class (found by kind: clamps/registry.py) in _clamps below
    clamps: list[SerializeAsAny[ClampSpec]] = Field(default_factory=list)
    conditions: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.+-]+$")], list[SerializeAsAny[ClampSpec]]] = Field(
        default_factory=dict, description="post-hoc conditions for `optolab evaluate` (base clamps + these)")
    _plan: tuple | None = PrivateAttr(default=None)
    _origin: Origin = PrivateAttr(default_factory=lambda: Origin())

    @model_validator(mode="before")
    @classmethod
    def _clamps(cls, data: Any) -> Any:
        """Each clamp by its kind's schema; errors name ``clamps.<i>.<field>`` or
        ``conditions.<name>.<i>.<field>``."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "clamps" in data:
            data["clamps"] = validate_clamps(data["clamps"], "clamps")
        if isinstance(data.get("conditions"), dict):
            data["conditions"] = {k: validate_clamps(v, f"conditions.{k}") for k, v in data["conditions"].items()}
        return data  # (what it depends on, the clamp plan)

    def locate(self, err: OptolabError) -> OptolabError:
        """``err`` (about one of this protocol's fields, found at run time) with the protocol's
        file and the field's line, where the protocol was read from a file."""
        o = self._origin
        return err.located(o.source, o.lines) if o.source is not None else err

    def clamp_plan(self, task: Task, cfg: ModelConfig) -> Plan:
        """The clamps checked against the model and task (:func:`optolab.clamps.plan.plan_clamps`),
        made once and kept: validation plans, and the run reuses that plan. A copy of the protocol
        with other clamps, model, task or budget plans anew."""
        data = self.model_dump(mode="json", include={"task", "model", "train", "clamps"})
        key = json.dumps(data, sort_keys=True, default=str)
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, plan_clamps(self, task, cfg))
        return self._plan[1]

    def model_config_for(self, task: Task) -> ModelConfig:
        io = task.model_io()
        m = self.model
        if m.n_ctx is not None and io.n_ctx > m.n_ctx:
            from optolab.core.errors import OptolabError

            raise OptolabError(
                f"the task's sequences are {io.n_ctx} positions long but model.n_ctx is {m.n_ctx}.",
                field="model.n_ctx", fix=f"raise model.n_ctx to at least {io.n_ctx}, or shorten the task's "
                "context (seq_len, context_pairs, …).")
        return ModelConfig(
            n_layers=m.n_layers, n_heads=m.n_heads, d_model=m.d_model, d_head=m.d_head,
            n_ctx=m.n_ctx or io.n_ctx, d_out=io.d_out, input_mode=io.input_mode, d_vocab=io.d_vocab,
            d_input=io.d_input, n_labels=io.n_labels, attn_only=m.attn_only, d_mlp=m.d_mlp,
            layer_norm=m.layer_norm, final_ln=m.final_ln, positional=m.positional,
            rope_base=m.rope_base, smeared_keys=m.smeared_keys, qkv_bias=m.qkv_bias,
            unembed_bias=m.unembed_bias, init_std=m.init_std,
        ).validate()

    def eval_steps(self) -> list[int]:
        return self.measures.schedule.steps(self.train.batch_size, self.train.total_steps, "measures.schedule")

    def checkpoint_steps(self) -> list[int]:
        return self.train.checkpoints.schedule.steps(
            self.train.batch_size, self.train.total_steps, "train.checkpoints.schedule")

    def resolved(self) -> dict:
        """Every field, defaults filled in, as plain YAML-able data."""
        out = self.model_dump(mode="json")
        if out["task"].get("generator") is None:
            out["task"].pop("generator", None)
        return out
