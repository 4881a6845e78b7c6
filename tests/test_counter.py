"""The counter stream (``task.data_stream: counter``): the hash against its definition, every
member's batches at once equal to one seed at a time, the moments of what it draws, the task
contract, and training on it (resume, ensembles)."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch

import optolab
from optolab.protocol.loader import validate_protocol
from optolab.tasks import counter, make_task
from optolab.tasks.base import Batch
from optolab.tasks.registry import validate_task_spec
from optolab.testing import check_task
from optolab.training.ensemble import train_ensemble
from optolab.training.trainer import train

from .conftest import fewshot_protocol, repeat_protocol

torch.set_num_threads(1)

M32, M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF


# --- the definition, transcribed in plain Python integers (optolab/tasks/counter.py's rules) ----


def ref_mix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def ref_key(seed: int, *words: int) -> int:
    v = seed & M64
    h = ref_mix((v & M32) ^ 0x9E3779B9)
    h = ref_mix(h ^ (v >> 32))
    for w in words:
        w &= M64
        h = ref_mix(h ^ (w & M32))
        h = ref_mix(h ^ (w >> 32))
    return h


def ref_bits(key: int, purpose: int, i: int) -> int:
    return ref_mix(ref_mix(ref_mix(key ^ purpose) ^ i) ^ 0x9E3779B9)


def test_the_hash_is_lowbias32_with_no_overflow_on_any_word():
    # lowbias32 of a few words, worked from the definition (the reference above)
    pinned = {0: 0, 1: 0x688990C0, 2: 0xD1132181, 0xFFFFFFFF: 0x6768824A, 0x9E3779B9: 0x01FCE552}
    x = torch.tensor(list(pinned), dtype=torch.int64)
    assert counter.mix(x).tolist() == list(pinned.values())
    words = torch.cat([torch.arange(0, 4096), M32 - torch.arange(0, 4096),
                       torch.randint(0, 2**32, (4096,), generator=torch.Generator().manual_seed(0))])
    got = counter.mix(words)
    assert got.tolist() == [ref_mix(w) for w in words.tolist()]
    assert int(got.min()) >= 0 and int(got.max()) <= M32


@pytest.mark.parametrize("seed", [0, 1, 7, -1, -(2**40), 2**63 - 1, 2**64 + 5])
def test_keys_and_draws_follow_the_definition(seed):
    key = counter.keys([seed, 3], 101, 12345)
    assert key.tolist() == [ref_key(seed, 101, 12345), ref_key(3, 101, 12345)]
    w = counter.bits(counter.sub(key, 4), (3, 5))
    assert w.shape == (2, 3, 5)
    assert w[0].flatten().tolist() == [ref_bits(ref_key(seed, 101, 12345), 4, i) for i in range(15)]


def test_draws_are_the_same_on_every_call_and_differ_by_seed_step_and_purpose():
    a = counter.bits(counter.keys([5], 101, 9), (1000,))
    assert torch.equal(a, counter.bits(counter.keys([5], 101, 9), (1000,)))
    for other in (counter.keys([6], 101, 9), counter.keys([5], 101, 10), counter.keys([5], 202, 9),
                  counter.sub(counter.keys([5], 101, 9), 1)):
        assert (counter.bits(other, (1000,)) == a).float().mean() < 0.01


def test_integers_and_orderings_are_exact():
    w = torch.tensor([0, 1, 2**31, M32], dtype=torch.int64)
    assert counter.below(w, 10).tolist() == [0, 0, 5, 9]  # (w · 10) >> 32
    assert counter.uniform(w).tolist() == [2.0**-24, 2.0**-24, 0.5 + 2.0**-24, 1 - 2.0**-24]
    assert counter.uniform(w).dtype == torch.float32
    ties = torch.tensor([[7, 7, 7, 3]])  # equal words still sort one way: by position
    assert counter.order(ties).argsort(-1).tolist() == [[3, 0, 1, 2]]


# --- moments: every bound is 5 standard errors (or a chi-square at p ~ 3e-7) under the null --------

N_DRAWS = 2**20


def chi2_bound(df: int, z: float = 5.0) -> float:
    """The chi-square value with the normal tail ``z`` above it (Wilson–Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_uniforms_and_normals_have_their_moments():
    w = counter.bits(counter.keys([11, 12], 101, 0), (N_DRAWS // 2,)).flatten()
    u = counter.uniform(w).double()
    se = 1 / math.sqrt(N_DRAWS)
    assert abs(u.mean() - 0.5) < 5 * se * math.sqrt(1 / 12)
    assert abs(u.var() - 1 / 12) < 5 * se * math.sqrt(1 / 180)  # Var((U - ½)²) = 1/80 − 1/144
    # neighbouring draws and neighbouring seeds are uncorrelated (se of a correlation: 1/√n)
    n = N_DRAWS // 2
    a, b = u[:n] - 0.5, u[n:] - 0.5
    assert abs((a * b).mean() / (1 / 12)) < 5 / math.sqrt(n)
    assert abs((a[:-1] * a[1:]).mean() / (1 / 12)) < 5 / math.sqrt(n)
    # uniform in 16 bins of the top bits and of the low bits
    for bins in (w >> 28, w & 15):
        counts = torch.bincount(bins, minlength=16).double()
        assert float(((counts - N_DRAWS / 16) ** 2 / (N_DRAWS / 16)).sum()) < chi2_bound(15)
    key = counter.keys([3], 7, 0)
    z = counter.normal(counter.bits(counter.sub(key, 0), (N_DRAWS,)), counter.bits(counter.sub(key, 1), (N_DRAWS,)))
    z = z.double()
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * se * math.sqrt(2)  # Var(Z²) = 2
    assert abs((z**3).mean()) < 5 * se * math.sqrt(15)  # Var(Z³) = 15
    assert abs((z > 1.96).double().mean() - 0.025) < 5 * math.sqrt(0.025 * 0.975 / N_DRAWS)


def test_fewshot_counter_batches_draw_classes_exemplars_and_positions_uniformly():
    spec = validate_task_spec({"kind": "fewshot", "dim": 4, "n_train_classes": 12, "n_test_classes": 4,
                               "n_exemplars": 4, "train_exemplars": 3, "data_stream": "counter"})
    task = make_task(spec)
    batch = task.train_batches(list(range(40)), 0, 512)  # 20,480 sequences
    classes = batch.extra["classes"].flatten(0, 1)  # [n, N+1]
    n = classes.shape[0]
    # the query's label: a uniform train label set, then a uniform member of it
    sets = task.label_sets["train"]
    label_p = torch.bincount(sets.flatten(), minlength=5).double() / sets.numel()
    for counts, p in [(torch.bincount(classes[:, -1], minlength=12), torch.full((12,), 1 / 12)),  # query class
                      (torch.bincount(batch.extra["exemplar_ids"].flatten(), minlength=3), torch.full((3,), 1 / 3)),
                      (torch.bincount(batch.extra["query_label"].flatten(), minlength=5), label_p)]:
        expected = counts.sum() * p
        assert float(((counts - expected) ** 2 / expected).sum()) < chi2_bound(len(p) - 1)
    # context_pairs 2, burstiness 1: the query's class sits first or second, half the time each
    first = (classes[:, 0] == classes[:, -1]).double().mean()
    assert abs(first - 0.5) < 5 * math.sqrt(0.25 / n)
    assert bool((classes[:, 0] != classes[:, 1]).all())  # distinct classes per sequence


# --- the device path: every member at once equals one seed at a time --------------------------

SPECS = [
    {"kind": "fewshot", "dim": 8, "n_train_classes": 9, "n_test_classes": 5, "data_stream": "counter"},
    {"kind": "fewshot", "dim": 6, "n_train_classes": 7, "n_test_classes": 5, "context_pairs": 4, "burstiness": 2,
     "n_labels": 6, "n_exemplars": 4, "train_exemplars": 2, "data_stream": "counter"},
    {"kind": "repeat_tokens", "n_tokens": 20, "seq_len": 5, "data_stream": "counter"},
    {"kind": "repeat_tokens", "n_tokens": 9, "seq_len": 6, "seq_len_min": 2, "loss_on": "repeats",
     "data_stream": "counter"},
]


def _fields(batch: Batch) -> dict[str, torch.Tensor]:
    out = {f"inputs.{i}": t for i, t in enumerate(batch.inputs)}
    out.update({k: v for k, v in vars(batch).items() if isinstance(v, torch.Tensor)})
    out.update({f"extra.{k}": v for k, v in batch.extra.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["kind"] + str(len(s)))
def test_every_members_batches_at_once_equal_each_seed_alone(spec):
    task = make_task(validate_task_spec(spec))
    seeds = [0, 5, 5, -3, 2**40 + 1]
    for step in (0, 1, 977):
        together = _fields(task.train_batches(seeds, step, 6, torch.device("cpu")))
        for i, seed in enumerate(seeds):
            alone = _fields(task.train_batch(seed, step, 6))
            assert together.keys() == alone.keys()
            for name, t in alone.items():
                assert together[name].shape[0] == len(seeds), name
                assert torch.equal(together[name][i].expand_as(t), t), (name, seed, step)


def test_the_fewshot_stream_is_the_counter_definition():
    """The task's use of the stream is pinned too: one draw per batch, its parts in a fixed order;
    the query's class is the class with the largest sort key, the exemplar index ``below`` of its
    words (so a change of the layout of draws is a deliberate change of every counter run's data)."""
    spec = validate_task_spec({"kind": "fewshot", "dim": 4, "n_train_classes": 9, "n_test_classes": 4,
                               "n_exemplars": 3, "train_exemplars": 2, "data_stream": "counter"})
    batch = make_task(spec).train_batch(17, 4, 3)
    key = ref_key(17, 101, 4)
    b, N, k = 3, spec.context_pairs, spec.n_distinct
    start_ex = b * 9 + b * N + b + b * k  # after class keys, context order, label set, label order

    def word(i: int) -> int:
        return ref_mix(ref_mix(key ^ i) ^ 0x9E3779B9)

    for row in range(b):
        sort_keys = [word(row * 9 + j) * 9 + j for j in range(9)]
        assert int(batch.extra["classes"][row, -1]) == max(range(9), key=sort_keys.__getitem__)
        assert batch.extra["exemplar_ids"][row].tolist() == \
            [(word(start_ex + row * (N + 1) + j) * 2) >> 32 for j in range(N + 1)]


def test_the_counter_stream_is_a_different_stream_and_eval_sets_are_unchanged():
    base = {"kind": "fewshot", "dim": 8, "n_train_classes": 9, "n_test_classes": 5}
    torch_task = make_task(validate_task_spec(base))
    counter_task = make_task(validate_task_spec({**base, "data_stream": "counter"}))
    assert not torch.equal(torch_task.train_batch(0, 0, 16).inputs[0], counter_task.train_batch(0, 0, 16).inputs[0])
    for split in torch_task.eval_splits:
        assert all(torch.equal(a, b) for a, b in zip(_fields(torch_task.eval_batch(split, 1, 16)).values(),
                                                     _fields(counter_task.eval_batch(split, 1, 16)).values()))
    # the default is left out of dumps: specs and protocols written before the field are unchanged
    assert "data_stream" not in torch_task.spec.model_dump()
    assert counter_task.spec.model_dump()["data_stream"] == "counter"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["kind"] + str(len(s)))
def test_counter_specs_keep_the_task_contract(spec):
    report = check_task(validate_task_spec(spec), batch_size=8, eval_sequences=16, max_batch_ms=None)
    assert {"determinism", "shapes", "holdouts", "icl_recoverable"} <= set(report.checks)


def test_tasks_without_the_counter_stream_refuse_it_in_one_line():
    for kind in ("gaussian_icl", "markov_icl", "bursty_classes"):
        with pytest.raises(optolab.OptolabError) as e:
            validate_task_spec({"kind": kind, "data_stream": "counter"})
        msg = str(e.value)
        assert "\n" not in msg and "task.data_stream" in msg and "Fix:" in msg
        assert "fewshot" in msg and "repeat_tokens" in msg  # which tasks have it


# --- training on the counter stream -----------------------------------------------------------


def _counter(data: dict, **task) -> dict:
    return {**data, "task": {**data["task"], "data_stream": "counter", **task}}


def _metrics(run_dir) -> pd.DataFrame:
    return optolab.open_run(run_dir).metrics.sort_values(
        ["step", "split", "metric", "layer", "head", "src_layer", "src_head"]).reset_index(drop=True)


@pytest.mark.parametrize("make", [fewshot_protocol, repeat_protocol], ids=["fewshot", "repeat_tokens"])
def test_a_counter_run_resumes_bit_identically(tmp_path, make):
    p = validate_protocol(_counter(make(steps=30)))
    full = train(p, tmp_path / "full", progress=False)
    train(p, tmp_path / "part", progress=False, stop_after=15)
    resumed = train(p, tmp_path / "part", progress=False)
    pd.testing.assert_frame_equal(_metrics(full.run_dir.path), _metrics(resumed.run_dir.path))
    for (name, x), (_, y) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(x, y), name


# the tolerance of tests/test_ensemble.py: batched products sum in another order than solo runs
TOLERANCE = 1e-5


def test_counter_ensemble_members_equal_their_runs_alone(tmp_path):
    members = []
    for i, (init, data) in enumerate([(0, 0), (1, 4), (2, 4)]):  # two members share a data seed
        d = _counter(fewshot_protocol(steps=40))
        d.update(name=f"m{i}", seeds={"init": init, "data": data, "eval": 1})
        if i == 2:
            d["clamps"] = [{"kind": "ablate", "site": "blocks.1.attn.hook_v", "heads": [1]}]
        members.append(validate_protocol(copy.deepcopy(d)))
    train_ensemble(members, [tmp_path / f"e{i}" for i in range(3)])
    for i, p in enumerate(members):
        train(p, tmp_path / f"solo{i}", progress=False)
        a, b = _metrics(tmp_path / f"e{i}"), _metrics(tmp_path / f"solo{i}")
        pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
        assert float((a.value - b.value).abs().max()) < TOLERANCE, i


def test_an_ensembles_draw_is_stacked_on_the_device_for_the_counter_stream_only():
    from optolab.training.batches import Batches

    task = make_task(validate_task_spec(SPECS[0]))
    draw = Batches(task, [0, 4, 4, 1], 5, 40, device=torch.device("cpu"))
    assert draw.device is not None
    got = _fields(draw.stacked(3))
    for i, seed in enumerate([0, 4, 4, 1]):
        for name, t in _fields(task.train_batch(seed, 3, 5)).items():
            assert torch.equal(got[name][i], t), (name, i)
    torch_task = make_task(validate_task_spec({k: v for k, v in SPECS[0].items() if k != "data_stream"}))
    assert Batches(torch_task, [0], 5, 40, device=torch.device("cpu")).device is None
