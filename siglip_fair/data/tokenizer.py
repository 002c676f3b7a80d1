"""SentencePiece tokenizer: local training and fixed-length encoding.

Id convention (the same as the T5/big_vision SentencePiece models, so their
`.model` files can be used as-is): pad = 0, eos = 1, unk = 2, no bos. The text
tower relies on 0 meaning padding.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from siglip_fair.io import atomic_write

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
EOS_MODES = ("none", "yes", "sticky")


def train_sentencepiece(
    texts: Iterable[str | bytes],
    vocab_size: int,
    path: str,
    *,
    model_type: str = "unigram",
) -> str:
  """Trains a lower-casing SentencePiece model on `texts`, saved at `path`.

  Args:
    texts: training sentences (str or utf-8 bytes); consumed once.
    vocab_size: number of pieces including pad/eos/unk, e.g. 256-1000. Acts as
      an upper bound: a tiny corpus may yield fewer pieces.
    path: destination `.model` file (written atomically).
    model_type: "unigram" or "bpe".

  Returns:
    `path`.
  """
  if vocab_size < 4:
    raise ValueError(
        f"vocab_size={vocab_size} must be >= 4 (pad, eos, unk + 1 piece).")
  if model_type not in ("unigram", "bpe"):
    raise ValueError(f"model_type={model_type!r}; use 'unigram' or 'bpe'.")

  def sentences():
    for t in texts:
      yield t.decode("utf-8") if isinstance(t, bytes) else t

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=sentences(),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      # NFKC + case folding: captions are matched case-insensitively.
      normalization_rule_name="nmt_nfkc_cf",
      pad_id=PAD_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      bos_id=-1,
      character_coverage=1.0,
      # Small synthetic corpora cannot always fill `vocab_size` pieces.
      hard_vocab_limit=False,
      num_threads=1,
      minloglevel=2,
  )
  atomic_write(path, model.getvalue())
  return path


class Tokenizer:
  """Fixed-length SentencePiece encoder; the model is loaded once.

  `eos` and `pad_id` follow big_vision's `tokenize(eos=..., pad_value=...)`:
    'none': pieces only, truncated to max_len;
    'yes': pieces + EOS, then truncated (a too-long text loses its EOS);
    'sticky' (default): pieces + EOS, truncated so that EOS stays the last token.
  Rows are filled up with `pad_id`: 0 (default) or the EOS id. big_vision's SigLIP
  checkpoints were trained with eos='sticky', pad_id=eos_id (use them with the text tower's
  padding='none'); the defaults suit padding='mask'.

  Attributes:
    max_len: L, the length of every encoded row.
    vocab_size: number of pieces (embedding table size).
  """

  def __init__(self, model_path: str, max_len: int, *, eos: str = "sticky",
               pad_id: int = PAD_ID):
    if max_len < 1:
      raise ValueError(f"max_len={max_len} must be >= 1 (room for EOS).")
    if eos not in EOS_MODES:
      raise ValueError(f"eos={eos!r}; use one of {EOS_MODES}.")
    if not os.path.isfile(model_path):
      raise ValueError(
          f"SentencePiece model {model_path!r} does not exist; train one with "
          "train_sentencepiece(...) or pass the path of a `.model` file.")
    with open(model_path, "rb") as f:
      proto = f.read()
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as e:
      # sentencepiece's own message is a C++ parse failure; say what the file should be.
      raise ValueError(
          f"{model_path!r} is not a valid SentencePiece model (its {len(proto)} bytes do not "
          "parse as one); point tokenizer.path at a `.model` file written by sentencepiece (e.g. "
          "big_vision's or one from train_sentencepiece), or leave tokenizer.path empty to "
          "train one on the captions.") from None
    if self._sp.pad_id() != PAD_ID or self._sp.eos_id() < 0:
      raise ValueError(
          f"{model_path!r} has pad_id={self._sp.pad_id()}, "
          f"eos_id={self._sp.eos_id()}; the text contract needs pad_id=0 and "
          "an eos id. Retrain with train_sentencepiece(...).")
    self.model_path = model_path
    self.max_len = max_len
    self.eos_id = self._sp.eos_id()
    self.vocab_size = self._sp.get_piece_size()
    if pad_id not in (PAD_ID, self.eos_id):
      raise ValueError(f"pad_id={pad_id}; use {PAD_ID} (padding) or {self.eos_id} (EOS).")
    self.eos = eos
    self.pad_id = pad_id

  def encode(self, texts: Sequence[str | bytes]) -> np.ndarray:
    """Encodes texts to int32 [N, max_len]: pieces, EOS, then padding (see `eos`, `pad_id`).

    With the defaults, longer texts are truncated so that EOS stays the last token.
    """
    if isinstance(texts, (str, bytes)):
      raise ValueError("encode expects a sequence of texts, got a single "
                       "string; wrap it in a list.")
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t)
             for t in texts]
    out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    for row, ids in zip(out, self._sp.encode(texts, out_type=int)):
      if self.eos == "sticky":
        ids = ids[: self.max_len - 1] + [self.eos_id]
      elif self.eos == "yes":
        ids = (ids + [self.eos_id])[: self.max_len]
      else:
        ids = ids[: self.max_len]
      row[: len(ids)] = ids
    return out

  def decode(self, tokens: np.ndarray) -> list[str]:
    """Decodes int [N, L] (or one row [L]) to N strings, stopping at EOS."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
      tokens = tokens[None]
    if tokens.ndim != 2:
      raise ValueError(
          f"decode expects [N, L] tokens, got shape {tokens.shape}.")
    rows = []
    for row in tokens.tolist():
      if self.eos_id in row:
        row = row[: row.index(self.eos_id)]
      rows.append([t for t in row if t != PAD_ID])
    return self._sp.decode(rows)
