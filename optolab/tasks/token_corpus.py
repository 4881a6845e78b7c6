"""Token corpora: next-token prediction on your own tokenised data (text, or ids on disk).

Rules:
- ``format: bin``: ``path`` is a flat binary of token ids (``dtype`` ``uint16`` or ``uint32``,
  native byte order, as nanoGPT's ``train.bin``), memory-mapped: a file of any size, of which
  only the windows drawn are read. ``format: text``: a UTF-8 text file, tokenised byte-level
  (``tokenizer: bytes``: the file's bytes are the ids, memory-mapped too) or by a local
  ``tokenizers`` JSON file (``tokenizer: PATH``: the whole text is encoded once, when the task is
  built; pre-tokenise a large corpus to a ``.bin``). Nothing is downloaded. Relative paths are
  read from the current folder.
- The model's vocabulary is ``vocab_size`` (default: 256 for bytes, the tokenizer's size for a
  tokenizer; a ``.bin`` must state it). Every id must be below it: checked over the whole corpus
  up to ``CHECKED_IDS`` ids when the task is built, and beyond that on every window drawn.
- Split by position: the first ``1 − val_frac`` of the ids train, the rest is held out. A window
  lies wholly in its part, so no training window shows a held-out id at any position.
- A sequence is a window of ``seq_len + 1`` consecutive ids at a uniformly drawn offset: the
  inputs are its first ``seq_len`` ids, the targets its last ``seq_len`` (every position is
  scored). A training batch is a pure function of ``(seeds.data, step)``, an eval batch of the
  eval seed, so resuming, ensembles and the compiled path see the same windows.
- Eval splits: ``val`` (held-out windows, the main split) and ``repeated_random`` (Olsson et
  al.'s repeated random tokens: ``repeat_len`` ids, default ``seq_len // 2``, drawn uniformly
  from the ids that occur in the corpus' first ``CHECKED_IDS``, repeated to fill the context;
  every position scored; induction targets on the repeats). The ICL score (loss late minus loss
  early in the context) and the head scores are the ordinary measures, on both splits.
- Refused when the task is built, in one line naming ``task.<field>``: a missing file, a size that
  is not a whole number of ``dtype`` ids, an id or a tokenizer vocabulary beyond
  ``vocab_size``, and a corpus whose training or held-out part is shorter than one window.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from optolab.core.errors import OptolabError, SpecError
from optolab.tasks.base import Batch, ModelIO, TaskSpec, rng
from optolab.tasks.tokens import NextTokenTask, induction_targets_from_tokens

CHECKED_IDS = 1 << 24  # ids checked (and sampled for the probe vocabulary) when the task is built
SPLITS = ("val", "repeated_random")
TRAIN_STREAM, VAL_STREAM, REPEAT_STREAM = 101, 202, 404


class TokenCorpusSpec(TaskSpec):
    kind: Literal["token_corpus"] = "token_corpus"
    path: str = Field(min_length=1, description="the corpus: a .bin of token ids or a UTF-8 text file")
    format: Literal["bin", "text"] = Field("text", description="bin: flat token ids; text: UTF-8 text")
    dtype: Literal["uint16", "uint32"] = Field("uint16", description="format: bin: the ids' type")
    tokenizer: str = Field("bytes", min_length=1,
                           description="format: text: 'bytes' (byte-level) or a local tokenizers JSON file")
    vocab_size: int | None = Field(None, ge=2, description="the model's vocabulary; default 256 (bytes) or "
                                   "the tokenizer's; required for format: bin")
    seq_len: int = Field(128, ge=2, description="the model's context (a window is seq_len + 1 ids)")
    val_frac: float = Field(0.1, gt=0.0, lt=1.0, description="the last fraction of the corpus, held out")
    repeat_len: int | None = Field(None, ge=1, description="repeated_random: ids per copy (default seq_len // 2)")

    @model_validator(mode="after")
    def _fields(self) -> TokenCorpusSpec:
        if self.format == "bin" and self.vocab_size is None:
            raise SpecError("vocab_size", "a .bin corpus does not say how many ids its vocabulary has.",
                            "set vocab_size (e.g. 50304 for GPT-2 ids padded, 256 for bytes).")
        if self.repeat_len is not None and self.repeat_len > self.seq_len:
            raise SpecError("repeat_len", f"repeat_len ({self.repeat_len}) exceeds seq_len ({self.seq_len}): "
                            "the context would hold no repeat.", "set repeat_len <= seq_len // 2.")
        return self


class TokenCorpusTask(NextTokenTask):
    """Next-token prediction on windows of a token corpus (a .bin of ids or a text file)."""

    kind = "token_corpus"
    Spec = TokenCorpusSpec
    spec: TokenCorpusSpec

    def __init__(self, spec: TokenCorpusSpec) -> None:
        super().__init__(spec)
        self._ids: np.ndarray | None = None
        self.vocab_size = self._open_vocab()
        n = len(self.ids)
        head = np.asarray(self.ids[:CHECKED_IDS])
        self._check_ids(head, 0)  # first: a wrong dtype also makes the length wrong
        self.checked_all = n <= CHECKED_IDS
        window = spec.seq_len + 1
        self.n_train = n - max(1, int(n * spec.val_frac))
        if min(self.n_train, n - self.n_train) < window:
            raise OptolabError(
                f"the corpus {spec.path} holds {n} ids: its training part ({self.n_train}) and held-out "
                f"part ({n - self.n_train}) must each hold one window of seq_len + 1 = {window} ids.",
                field="task.seq_len", fix="use a longer corpus, a shorter seq_len, or val_frac nearer 0.5.")
        seen = np.bincount(head[: self.n_train], minlength=self.vocab_size) > 0
        self.seen_ids = torch.from_numpy(np.flatnonzero(seen))

    # --- the corpus ----------------------------------------------------------------------

    @property
    def ids(self) -> np.ndarray:
        """The corpus' ids (a memory map for bin and bytes; opened again after unpickling)."""
        if self._ids is None:
            self._ids = self._load()
        return self._ids

    def __getstate__(self) -> dict:
        # a memory map pickles as a copy of the whole file: send the path, open it again there
        state = dict(self.__dict__)
        if self.spec.format == "bin" or self.spec.tokenizer == "bytes":
            state["_ids"] = None
        return state

    def _file(self, value: str, field: str) -> Path:
        path = Path(value)
        if not path.is_file():
            raise OptolabError(f"file '{value}' not found (looked for {path.resolve()}).", field=f"task.{field}",
                               fix="give the path of an existing file (relative paths start from the current folder).")
        return path

    def _open_vocab(self) -> int:
        s = self.spec
        self._file(s.path, "path")
        if s.format == "bin" or s.tokenizer == "bytes":
            return s.vocab_size or 256
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise OptolabError("reading a tokenizer file needs the tokenizers package, which is not installed.",
                               field="task.tokenizer", fix="pip install tokenizers (or optolab[llc]), or use "
                               "tokenizer: bytes.") from None
        try:
            self._tokenizer = Tokenizer.from_file(str(self._file(s.tokenizer, "tokenizer")))
        except Exception as e:  # the library's own parse error, in one line
            raise OptolabError(f"'{s.tokenizer}' is not a tokenizers JSON file ({type(e).__name__}: {e}).",
                               field="task.tokenizer", fix="save one with Tokenizer.save(PATH), or use bytes.") from None
        size = self._tokenizer.get_vocab_size()
        if s.vocab_size is not None and size > s.vocab_size:
            raise OptolabError(f"the tokenizer {s.tokenizer} has {size} ids but vocab_size is {s.vocab_size}.",
                               field="task.vocab_size", fix=f"set vocab_size >= {size} or leave it out.")
        return s.vocab_size or size

    def _load(self) -> np.ndarray:
        s = self.spec
        path = self._file(s.path, "path")
        if s.format == "text" and s.tokenizer != "bytes":
            text = path.read_text(encoding="utf-8", errors="strict")
            return np.asarray(self._tokenizer.encode(text).ids, dtype=np.uint32)
        dtype = np.dtype(s.dtype if s.format == "bin" else np.uint8)
        size = path.stat().st_size
        if size % dtype.itemsize or size == 0:
            raise OptolabError(f"{s.path} is {size} bytes, not a whole number of {dtype.name} ids "
                               f"({dtype.itemsize} bytes each).", field="task.dtype",
                               fix="set dtype to the type the file was written with (uint16 or uint32).")
        return np.memmap(path, dtype=dtype, mode="r")

    def _check_ids(self, ids: np.ndarray, offset: int) -> None:
        top = int(ids.max()) if ids.size else 0
        if top >= self.vocab_size:
            at = offset + int(np.argmax(ids >= self.vocab_size))
            field = "dtype" if self.spec.format == "bin" else "vocab_size"
            raise OptolabError(f"{self.spec.path} has id {top} (first beyond the vocabulary at position {at}) "
                               f"but vocab_size is {self.vocab_size}.", field=f"task.{field}",
                               fix=f"set vocab_size above {top}, or check dtype (a uint32 file read as uint16 "
                                   "shows stray ids).")

    def _windows(self, starts: torch.Tensor) -> torch.Tensor:
        n = self.spec.seq_len + 1
        rows = np.stack([np.asarray(self.ids[s:s + n]) for s in starts.tolist()])
        if not self.checked_all:
            for s, row in zip(starts.tolist(), rows):
                self._check_ids(row, s)
        return torch.from_numpy(rows.astype(np.int64))

    # --- the task interface --------------------------------------------------------------

    def model_io(self) -> ModelIO:
        v = self.vocab_size
        return ModelIO(input_mode="tokens", n_ctx=self.spec.seq_len, d_out=v, d_vocab=v)

    def token_probe_vocab(self) -> tuple[int, None]:
        return self.vocab_size, None

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return SPLITS

    def reference_losses(self) -> dict[str, float]:
        return {f"ln {self.vocab_size} (uniform)": math.log(self.vocab_size)}

    def train_batch(self, seed: int, step: int, batch_size: int) -> Batch:
        window = self.spec.seq_len + 1
        starts = torch.randint(0, self.n_train - window + 1, (batch_size,), generator=rng(seed, TRAIN_STREAM, step))
        return self._batch(self._windows(starts))

    def eval_batch(self, split: str, seed: int, n: int) -> Batch:
        self.check_split(split)
        window = self.spec.seq_len + 1
        if split == "val":
            starts = torch.randint(self.n_train, len(self.ids) - window + 1, (n,), generator=rng(seed, VAL_STREAM, 0))
            return self._batch(self._windows(starts))
        L = self.spec.repeat_len or max(1, self.spec.seq_len // 2)
        g = rng(seed, REPEAT_STREAM, 0)
        seg = self.seen_ids[torch.randint(len(self.seen_ids), (n, L), generator=g)]
        rows = seg.repeat(1, -(-window // L))[:, :window]
        batch = self._batch(rows)
        batch.induction_targets = induction_targets_from_tokens(batch.tokens, torch.arange(self.spec.seq_len)[None, :] >= L)
        return batch

    def _batch(self, rows: torch.Tensor) -> Batch:
        tokens = rows[:, :-1].contiguous()
        return Batch(inputs=(tokens,), targets=rows[:, 1:].contiguous(), tokens=tokens)

    def describe(self) -> list[str]:
        s = self.spec
        source = f"ids ({s.dtype})" if s.format == "bin" else f"text, {s.tokenizer} tokens"
        return [f"Windows of {s.seq_len + 1} ids of {s.path} ({source}, {len(self.ids)} ids, vocabulary "
                f"{self.vocab_size}); the last {s.val_frac:g} is held out ('val'); 'repeated_random' repeats "
                f"{s.repeat_len or s.seq_len // 2} random ids of the corpus' vocabulary (Olsson et al.)."]

    # --- what tests need of the task ---------------------------------------------------------

    @classmethod
    def example_spec(cls) -> TokenCorpusSpec:
        """A byte-level spec over a small text written once per process in the temp folder."""
        return TokenCorpusSpec(path=str(_example_corpus()), seq_len=32)

    @classmethod
    def spec_strategy(cls) -> Any:
        from hypothesis import strategies as st

        @st.composite
        def draw_spec(draw: Any) -> TokenCorpusSpec:
            seq_len = draw(st.integers(2, 48))
            return TokenCorpusSpec(path=str(_example_corpus()), seq_len=seq_len,
                                   val_frac=draw(st.sampled_from([0.05, 0.1, 0.5])),
                                   repeat_len=draw(st.one_of(st.none(), st.integers(1, seq_len))))

        return draw_spec()


def _example_corpus() -> Path:
    """A deterministic few-KB UTF-8 text (this module's own docstring, repeated) in the temp folder."""
    text = ((__doc__ or "") * 8).encode("utf-8")
    path = Path(tempfile.gettempdir()) / f"optolab_token_corpus_example_{len(text)}.txt"
    if not (path.is_file() and path.read_bytes() == text):
        tmp = path.with_suffix(f".{id(text)}.tmp")
        tmp.write_bytes(text)
        tmp.replace(path)  # atomic: parallel test workers never read half a file
    return path
