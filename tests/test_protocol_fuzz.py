"""Fuzzing the protocol loader: random protocol documents and random mutations of valid ones.

The loader's contract: a document is either accepted (a ``Protocol``) or refused with
optolab's own ``OptolabError`` (one line, exit 2 at the CLI) — never any other exception.
"""

from __future__ import annotations

import copy
import math

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optolab.core.errors import OptolabError
from optolab.protocol.loader import load_protocol, validate_protocol

from .conftest import fewshot_protocol

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KEYS = ["name", "task", "model", "train", "measures", "seeds", "clamps", "conditions", "kind", "dim", "n_layers",
        "n_heads", "d_model", "d_head", "lr", "batch_size", "steps", "sequences", "schedule", "unit", "every",
        "eval_sequences", "init", "data", "eval", "site", "heads", "window", "start", "stop", "to", "how",
        "strength", "n_labels", "n_train_classes", "positional", "n_ctx", "checkpoints", "keep", "betas",
        "generator", "spec", "value", "file", "source", "param", "layer", "head", "apply_at", "d_mlp"]
SITES = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_z",
         "blocks.9.attn.hook_q", "blocks.-1.hook_resid_post", "blocks.1.attn.hook_result", "nonsense"]
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 70), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e3, 1e3),
    st.sampled_from(["", "fewshot", "repeat_tokens", "gaussian_icl", "markov_icl", "steps", "sequences", "all",
                     "previous_token", "ablate", "set", "freeze", "graft", "rope", "zero", "1e-3", "∞", "a b"]),
    st.sampled_from(SITES),
    st.text(max_size=8),
)
DOCS = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner, max_size=5)), max_leaves=25)


def _accepts_or_refuses(data) -> None:
    try:
        if not isinstance(data, dict):
            raise OptolabError("not a mapping")  # what read_yaml says for such a document
        validate_protocol(data)
    except OptolabError:
        pass


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(KEYS), DOCS, max_size=8))
def test_random_protocol_documents_are_accepted_or_refused_cleanly(doc):
    _accepts_or_refuses(doc)


def _paths(d, prefix=()):
    """Every (path to a value) in a nested dict/list document."""
    out = [prefix] if prefix else []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _paths(v, prefix + (i,))
    return out


VALID = fewshot_protocol(steps=50)
VALID["clamps"] = [{"kind": "set", "site": "blocks.0.attn.hook_pattern", "heads": [0], "to": "previous_token",
                    "window": {"start": 0, "stop": 20, "unit": "steps"}},
                   {"kind": "ablate", "site": "blocks.1.attn.hook_v", "heads": [1, 2]}]
VALID["seeds"] = {"init": 0, "data": 0, "eval": 1}


@st.composite
def mutations(draw):
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        key = path[-1]
        op = draw(st.sampled_from(["replace", "delete", "rename", "insert", "wrap"]))
        if op == "replace":
            parent[key] = draw(DOCS)
        elif op == "delete":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = parent.pop(key)
        elif op == "insert" and isinstance(parent, dict):
            parent[draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)))] = draw(SCALARS)
        elif op == "wrap":
            parent[key] = [parent[key]]
    return doc


@FUZZ
@given(doc=mutations())
def test_mutations_of_a_valid_protocol_are_accepted_or_refused_cleanly(doc):
    _accepts_or_refuses(doc)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(doc=mutations())
def test_mutated_protocol_files_load_or_fail_with_one_line(doc, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "p.yaml"
    try:
        path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    except (yaml.YAMLError, ValueError):
        return
    try:
        load_protocol(path)
    except OptolabError as e:
        assert "\n" not in str(e) and str(path) in str(e)


def test_the_valid_seed_document_is_valid():
    assert validate_protocol(copy.deepcopy(VALID)).train.total_steps == 50
    assert not math.isnan(validate_protocol(copy.deepcopy(VALID)).train.lr)
