"""token_corpus: windows of the user's own token data (a .bin of ids, or text), deterministic,
split by position, memory-mapped, refused in one line when the file does not fit the spec; and
trained like every task (a clamp, the compiled path, resume)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from optolab.cli import main
from optolab.core.errors import OptolabError
from optolab.protocol.loader import validate_protocol
from optolab.tasks import make_task, validate_task_spec
from optolab.tasks.token_corpus import TokenCorpusTask
from optolab.training.trainer import train

TEXT = ("def f(x):\n    return x + 1\n\n" * 40 + "class A:\n    pass\n" * 40 + "é ü ß\n" * 10)


def _text(tmp_path, text: str = TEXT):
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def _bin(tmp_path, ids, dtype="uint16"):
    path = tmp_path / f"ids_{dtype}.bin"
    np.asarray(ids, dtype=dtype).tofile(path)
    return path


def _task(**spec) -> TokenCorpusTask:
    return make_task(validate_task_spec({"kind": "token_corpus", **spec}))


def test_batches_are_deterministic_windows_of_the_bytes(tmp_path):
    task = _task(path=str(_text(tmp_path)), seq_len=16)
    a, b = task.train_batch(3, 7, 8), task.train_batch(3, 7, 8)
    assert torch.equal(a.inputs[0], b.inputs[0]) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs[0], task.train_batch(3, 8, 8).inputs[0])
    assert not torch.equal(a.inputs[0], task.train_batch(4, 7, 8).inputs[0])
    raw = TEXT.encode("utf-8")
    for row, target in zip(a.inputs[0].tolist(), a.targets.tolist()):  # consecutive bytes, shifted by one
        window = bytes(row + target[-1:])
        assert window in raw and target[:-1] == row[1:]
    assert task.model_io().d_vocab == 256 and a.inputs[0].shape == (8, 16)
    for split in task.eval_splits:
        assert torch.equal(task.eval_batch(split, 1, 5).targets, task.eval_batch(split, 1, 5).targets)


def test_training_and_heldout_windows_never_share_a_position(tmp_path):
    n = 5000  # id = its own position, so a window says where it came from
    task = _task(path=str(_bin(tmp_path, np.arange(n), "uint32")), format="bin", dtype="uint32",
                 vocab_size=n, seq_len=20, val_frac=0.2)
    assert task.n_train == 4000
    seen = torch.cat([task.train_batch(0, s, 64).targets for s in range(50)])
    assert int(seen.max()) < 4000 and int(seen.min()) >= 1
    val = task.eval_batch("val", 0, 500)
    assert int(val.inputs[0].min()) >= 4000 and int(val.targets.max()) < n
    assert (val.targets[:, :-1] == val.inputs[0][:, 1:]).all()


def test_repeated_random_tokens_repeat_ids_of_the_corpus_with_induction_targets(tmp_path):
    task = _task(path=str(_text(tmp_path)), seq_len=24, repeat_len=8)
    batch = task.eval_batch("repeated_random", 0, 16)
    tokens = batch.tokens
    assert torch.equal(tokens[:, 8:16], tokens[:, :8]) and torch.equal(tokens[:, 16:24], tokens[:, :8])
    assert set(tokens.unique().tolist()) <= set(TEXT.encode("utf-8"))
    it = batch.induction_targets
    assert it[:, 8:].any(-1).all() and not it[:, :8].any()  # every query in a repeat has a target key


def test_a_corpus_larger_than_memory_is_read_window_by_window(tmp_path):
    path = tmp_path / "huge.bin"
    size = 64 * 2**30  # sparse: no disk used, and far more than this machine's memory
    n = size // 2
    tail = np.arange(1, 4097, dtype=np.uint16) % 50 + 1  # the held-out part: a known pattern
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(size - 2 * len(tail))
        f.write(tail.tobytes())
    task = _task(path=str(path), format="bin", dtype="uint16", vocab_size=64, seq_len=32, val_frac=3e-8)
    assert isinstance(task.ids, np.memmap) and len(task.ids) == n
    held = n - task.n_train
    assert 32 < held <= len(tail)
    val = task.eval_batch("val", 0, 8)
    pattern = tail[-held:].tolist()
    for row, target in zip(val.inputs[0].tolist(), val.targets.tolist()):
        window = row + target[-1:]
        start = pattern.index(window[0])
        assert window == pattern[start:start + 33]
    train_batch = task.train_batch(0, 123456, 4)  # anywhere in 32 Gi ids, beyond what the build checked
    assert train_batch.inputs[0].shape == (4, 32)


def test_an_id_beyond_the_vocabulary_past_the_checked_part_stops_the_window_that_reads_it(tmp_path):
    path = tmp_path / "big.bin"
    n = (1 << 24) + 4096
    with path.open("wb") as f:
        f.truncate(2 * n)
        f.seek(2 * (n - 2048))
        f.write(np.full(2048, 9, dtype=np.uint16).tobytes())  # ids 9 >= vocab_size 8
    task = _task(path=str(path), format="bin", vocab_size=8, seq_len=16, val_frac=1e-3)
    with pytest.raises(OptolabError, match="has id 9") as e:
        task.eval_batch("val", 0, 64)
    assert e.value.field == "task.dtype" and "\n" not in str(e.value)


def test_a_local_tokenizers_file_tokenises_the_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    task = _task(path=str(_text(tmp_path)), tokenizer=str(tok_path), seq_len=8)
    ids = tok.encode(TEXT).ids
    assert task.model_io().d_vocab == tok.get_vocab_size() and task.ids.tolist() == ids
    batch = task.train_batch(0, 0, 4)
    joined = ",".join(map(str, ids))
    for row in batch.inputs[0].tolist():
        assert ",".join(map(str, row)) in joined
    assert tok.get_vocab_size() > 40
    with pytest.raises(OptolabError, match=f"has {tok.get_vocab_size()} ids but vocab_size is 40") as e:
        _task(path=str(_text(tmp_path)), tokenizer=str(tok_path), vocab_size=40, seq_len=8)
    assert e.value.field == "task.vocab_size"


@pytest.mark.parametrize("make, field, words", [
    (lambda d: dict(path=str(d / "nope.bin"), format="bin", vocab_size=10), "task.path", "not found"),
    (lambda d: dict(path=str(_text(d)), tokenizer=str(d / "tok.json")), "task.tokenizer", "not found"),
    (lambda d: dict(path=str(_bin(d, [1, 2, 3], "uint16")), format="bin", dtype="uint32", vocab_size=10),
     "task.dtype", "not a whole number of uint32 ids"),
    (lambda d: dict(path=str(_bin(d, np.arange(100) * 1000, "uint32")), format="bin", dtype="uint16",
                    vocab_size=60000), "task.dtype", "has id"),
    (lambda d: dict(path=str(_bin(d, np.arange(100), "uint16")), format="bin", vocab_size=50), "task.dtype",
     "has id 99"),
    (lambda d: dict(path=str(_text(d)), vocab_size=128), "task.vocab_size", "has id 195"),
    (lambda d: dict(path=str(_text(d, "short text")), seq_len=16), "task.seq_len", "holds 10 ids"),
    (lambda d: dict(path=str(_bin(d, np.arange(100), "uint16")), format="bin", vocab_size=100, seq_len=10),
     "task.seq_len", "held-out part (10)"),
])
def test_a_corpus_that_does_not_fit_the_spec_is_refused_in_one_line(tmp_path, make, field, words):
    with pytest.raises(OptolabError) as e:
        _task(**make(tmp_path))
    assert e.value.field == field and words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec, field", [
    ({"format": "bin"}, "vocab_size"),
    ({"format": "bin", "dtype": "int64", "vocab_size": 8}, "dtype"),
    ({"repeat_len": 99, "seq_len": 16}, "repeat_len"),
])
def test_spec_errors_name_the_field(tmp_path, spec, field):
    with pytest.raises(OptolabError) as e:
        validate_task_spec({"kind": "token_corpus", "path": str(_text(tmp_path)), **spec})
    assert field in str(e.value) and "\n" not in str(e.value)


def test_the_command_line_refuses_a_missing_corpus_in_one_line_with_exit_2(tmp_path, capsys):
    spec = tmp_path / "t.yaml"
    spec.write_text(f"kind: token_corpus\npath: {tmp_path / 'gone.txt'}\n")
    assert main(["tasks", "show", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert "gone.txt" in err and "task.path" in err and len(err.splitlines()) == 1


def test_a_pickled_task_reopens_its_memory_map(tmp_path):
    import pickle

    task = _task(path=str(_bin(tmp_path, np.arange(3000) % 7, "uint16")), format="bin", vocab_size=7, seq_len=12)
    copy = pickle.loads(pickle.dumps(task))
    assert len(pickle.dumps(task)) < 3000  # the path travels, not the ids
    assert torch.equal(copy.train_batch(0, 5, 4).inputs[0], task.train_batch(0, 5, 4).inputs[0])


# --- trained like every task ---------------------------------------------------------------

CLAMP = [{"kind": "ablate", "site": "blocks.0.attn.hook_v", "heads": [1]}]


def _protocol(corpus, compiled: bool) -> object:
    return validate_protocol({
        "name": "tiny_corpus",
        "task": {"kind": "token_corpus", "path": str(corpus), "seq_len": 24},
        "model": {"n_layers": 2, "n_heads": 4, "d_model": 32, "positional": "learned"},
        "train": {"lr": 3e-3, "batch_size": 16, "steps": 30, "compile": compiled,
                  "checkpoints": {"schedule": {"unit": "steps", "every": 10}}},
        "measures": {"schedule": {"unit": "steps", "every": 10}, "eval_sequences": 32},
        "clamps": CLAMP,
    })


def test_it_trains_under_a_clamp_compiled_and_resumed_like_every_task(tmp_path):
    corpus = _text(tmp_path)
    eager = train(_protocol(corpus, False), tmp_path / "eager", progress=False)
    compiled = train(_protocol(corpus, True), tmp_path / "compiled", progress=False)
    train(_protocol(corpus, False), tmp_path / "cut", progress=False, stop_after=15)
    resumed = train(_protocol(corpus, False), tmp_path / "cut", progress=False)
    for (name, a), b in zip(eager.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    m_full, m_compiled = eager.run_dir.metrics(), compiled.run_dir.metrics()
    assert m_full["value"].equals(resumed.run_dir.metrics()["value"])
    assert np.nanmax(np.abs(m_full["value"].to_numpy() - m_compiled["value"].to_numpy())) < 1e-5  # as test_compiled
    metrics = set(zip(m_full["split"], m_full["metric"]))
    for split in ("val", "repeated_random"):
        assert {(split, "loss"), (split, "icl_score"), (split, "prev_token")} <= metrics
    assert ("repeated_random", "prefix_matching") in metrics
    loss = m_full[(m_full.split == "val") & (m_full.metric == "loss")].sort_values("step")["value"].to_numpy()
    assert loss[-1] < loss[0] - 1.0  # it learns the bytes' statistics (from ln 256 = 5.5)


def test_ensemble_members_equal_their_runs_alone(tmp_path):
    from optolab.training.ensemble import train_ensemble

    corpus = _text(tmp_path)
    members = []
    for seed in (0, 1):
        data = _protocol(corpus, False).resolved()
        data.update(name=f"m{seed}", seeds={"init": seed, "data": seed, "eval": 1})
        data["train"]["steps"] = 20
        members.append(validate_protocol(data))
    train_ensemble(members, [tmp_path / "e0", tmp_path / "e1"])
    solo = train(members[1], tmp_path / "solo1", progress=False)
    ens = pd.read_parquet(tmp_path / "e1" / "metrics.parquet")["value"].to_numpy()
    # batched members round differently from one model alone (tests/test_ensemble.py: 6e-7 measured)
    assert np.nanmax(np.abs(ens - solo.run_dir.metrics()["value"].to_numpy())) < 1e-5
