"""Tokenizers: local SentencePiece training and fixed-length encoding of SentencePiece models
and Hugging Face `tokenizer.json` files, under the rules released models were trained with.

Id convention of the SentencePiece models (the same as the T5/big_vision ones, so their
`.model` files can be used as-is): pad = 0, eos = 1, unk = 2, no bos. The text tower relies on
0 meaning padding unless its padding='none'.

Every tokenizer here turns texts into rows of exactly max_len ids by the same rules
(`_Encoder.encode`): optional lower-casing and canonicalisation of the text, its pieces, an
optional BOS first, EOS by `eos` ('none' | 'yes' | 'sticky', big_vision's modes), then padding
with `pad_id`. `make_tokenizer(config.tokenizer)` builds one from config (data/preprocess.py
holds the released models' presets).
"""
from __future__ import annotations

import io
import os
import string
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from siglip_fair.data.preprocess import EOS_MODES, TOKENIZER_KINDS, canonicalize
from siglip_fair.io import atomic_write

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

# A-Z -> a-z only: big_vision's `lower` op is tf.strings.lower with its default encoding '',
# which lower-cases ASCII letters and leaves every other character (É, Д, ...) as it is.
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def lower_mode(value) -> bool | str:
  """tokenizer.lower as the encoder applies it: False, True (Python's str.lower: every
  script, as transformers' SiglipTokenizer) or 'ascii' (A-Z only, big_vision's `lower`)."""
  if isinstance(value, str):
    if value.strip().lower() != "ascii":
      raise ValueError(f"tokenizer.lower={value!r}; use true, false or 'ascii' (A-Z only, as "
                       "big_vision's SigLIP 2 preprocessing).")
    return "ascii"
  return bool(value)


def train_sentencepiece(
    texts: Iterable[str | bytes],
    vocab_size: int,
    path: str,
    *,
    model_type: str = "unigram",
    normalization: str = "nmt_nfkc_cf",
) -> str:
  """Trains a lower-casing SentencePiece model on `texts`, saved at `path`.

  Args:
    texts: training sentences (str or utf-8 bytes); consumed once.
    vocab_size: number of pieces including pad/eos/unk, e.g. 256-1000. Acts as
      an upper bound: a tiny corpus may yield fewer pieces.
    path: destination `.model` file (written atomically).
    model_type: "unigram" or "bpe".
    normalization: sentencepiece's normalization rule; the default 'nmt_nfkc_cf' also
      case-folds (captions are matched case-insensitively), 'nmt_nfkc' keeps case (as
      released models' tokenizers do).

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
      # NFKC + case folding by default: captions are matched case-insensitively.
      normalization_rule_name=normalization,
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


class _Encoder:
  """Fixed-length encoding rules shared by the tokenizers (subclasses give `_pieces`).

  Each text is lower-cased (`lower`: True for every script, 'ascii' for A-Z only) and
  canonicalised (`canonicalize`: ASCII punctuation removed, whitespace collapsed;
  transformers' SiglipTokenizer) when asked, split into pieces,
  preceded by `bos_id` when given, then ended by `eos` as in big_vision's
  `tokenize(eos=..., pad_value=...)`:
    'none': pieces only, truncated to max_len;
    'yes': pieces + EOS, then truncated (a too-long text loses its EOS);
    'sticky' (default): pieces + EOS, truncated so that EOS stays the last token
      (transformers' truncation=True with its special tokens gives the same rows).
  Rows are filled up with `pad_id`.

  Attributes:
    max_len: L, the length of every encoded row.
    vocab_size: number of pieces (embedding table size).
    eos_id, pad_id, bos_id (None: no BOS).
  """
  max_len: int
  vocab_size: int
  eos_id: int
  pad_id: int
  bos_id: int | None = None
  eos: str = "sticky"
  lower: bool | str = False
  canonicalize: bool = False

  def _set_rules(self, max_len, eos, lower, canonicalize, bos_id):
    if max_len < 1:
      raise ValueError(f"max_len={max_len} must be >= 1 (room for EOS).")
    if eos not in EOS_MODES:
      raise ValueError(f"eos={eos!r}; use one of {EOS_MODES}.")
    self.max_len, self.eos = int(max_len), eos
    self.lower, self.canonicalize = lower_mode(lower), bool(canonicalize)
    self.bos_id = None if bos_id is None else int(bos_id)

  def _pieces(self, texts: list[str]) -> list[list[int]]:
    raise NotImplementedError

  def _clean(self, text: str) -> str:
    if self.lower == "ascii":
      text = text.translate(_ASCII_LOWER)
    elif self.lower:
      text = text.lower()
    return canonicalize(text) if self.canonicalize else text

  def encode(self, texts: Sequence[str | bytes]) -> np.ndarray:
    """Encodes texts to int32 [N, max_len]: [BOS], pieces, EOS, then padding (see the class
    docstring); with the defaults, longer texts are truncated so that EOS stays last."""
    if isinstance(texts, (str, bytes)):
      raise ValueError("encode expects a sequence of texts, got a single "
                       "string; wrap it in a list.")
    texts = [self._clean(t.decode("utf-8") if isinstance(t, bytes) else str(t)) for t in texts]
    out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    bos = [] if self.bos_id is None else [self.bos_id]
    for row, ids in zip(out, self._pieces(texts)):
      ids = bos + list(ids)
      if self.eos == "sticky":
        ids = ids[: self.max_len - 1] + [self.eos_id]
      elif self.eos == "yes":
        ids = (ids + [self.eos_id])[: self.max_len]
      else:
        ids = ids[: self.max_len]
      row[: len(ids)] = ids
    return out

  def _content(self, tokens: np.ndarray) -> list[list[int]]:
    """Rows of [N, L] (or one [L]) ids without BOS, cut at the first EOS, without PAD_ID."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
      tokens = tokens[None]
    if tokens.ndim != 2:
      raise ValueError(
          f"decode expects [N, L] tokens, got shape {tokens.shape}.")
    rows = []
    for row in tokens.tolist():
      if self.bos_id is not None and row[:1] == [self.bos_id]:
        row = row[1:]
      if self.eos_id in row:
        row = row[: row.index(self.eos_id)]
      rows.append([t for t in row if t != PAD_ID or self.pad_id != PAD_ID])
    return rows


class Tokenizer(_Encoder):
  """Fixed-length SentencePiece encoder; the model is loaded once (rules: `_Encoder`).

  big_vision's SigLIP checkpoints were trained with eos='sticky', pad_id=eos_id (use them with
  the text tower's padding='none'); SigLIP 2 with lower='ascii', pad_id=0; transformers'
  SiglipTokenizer also canonicalises. The defaults suit padding='mask'. `pad_id` is 0 (the
  model's pad piece) or its EOS id.
  """

  def __init__(self, model_path: str, max_len: int, *, eos: str = "sticky",
               pad_id: int = PAD_ID, lower: bool = False, canonicalize: bool = False,
               bos_id: int | None = None):
    self._set_rules(max_len, eos, lower, canonicalize, bos_id)
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
    self.eos_id = self._sp.eos_id()
    self.vocab_size = self._sp.get_piece_size()
    if pad_id not in (PAD_ID, self.eos_id):
      raise ValueError(f"pad_id={pad_id}; use {PAD_ID} (padding) or {self.eos_id} (EOS).")
    self.pad_id = pad_id
    if self.bos_id is not None and not 0 <= self.bos_id < self.vocab_size:
      raise ValueError(f"bos_id={self.bos_id} is not an id of {model_path!r} "
                       f"({self.vocab_size} pieces).")

  def token_id(self, piece: str) -> int:
    """The id of a piece (e.g. '</s>'); raises when the model does not have it."""
    i = self._sp.piece_to_id(piece)
    if self._sp.id_to_piece(i) != piece:
      raise ValueError(f"{self.model_path!r} has no piece {piece!r} (it maps to the unknown "
                       f"piece {self._sp.id_to_piece(i)!r}); check tokenizer.bos / eos_token / "
                       "pad_token.")
    return i

  def _pieces(self, texts):
    return self._sp.encode(texts, out_type=int)

  def decode(self, tokens: np.ndarray) -> list[str]:
    """Decodes int [N, L] (or one row [L]) to N strings, stopping at EOS."""
    return self._sp.decode(self._content(tokens))


class HFTokenizer(_Encoder):
  """Fixed-length encoder for a Hugging Face `tokenizer.json` (read with the `tokenizers`
  package, no transformers or torch): its normaliser, pre-tokeniser and model give the pieces
  (its own special tokens are not added); BOS, EOS and padding follow `_Encoder`'s rules with
  the ids of the named tokens. OpenAI CLIP: bos='<|startoftext|>', eos_token='<|endoftext|>',
  pad_token '<|endoftext|>' (transformers) or '' (id 0, OpenAI's clip.tokenize).
  """

  def __init__(self, path: str, max_len: int, *, eos: str = "sticky", eos_token: str,
               pad_token: str = "", bos: str = "", lower: bool = False,
               canonicalize: bool = False):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self.model_path = os.fspath(path)
    if not os.path.isfile(self.model_path):
      raise ValueError(f"Hugging Face tokenizer file {self.model_path!r} does not exist; pass "
                       "a checkpoint's tokenizer.json.")
    try:
      self._tok = tokenizers.Tokenizer.from_file(self.model_path)
    except Exception as e:  # pylint: disable=broad-except  (the Rust side raises Exception)
      raise ValueError(f"{self.model_path!r} is not a Hugging Face tokenizer.json ({e}).") \
          from None
    # A tokenizer.json saved after use may carry padding / truncation settings; those rules
    # are ours (`_Encoder.encode`), so the pieces must come unpadded and uncut.
    self._tok.no_padding()
    self._tok.no_truncation()
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    if not eos_token:
      raise ValueError("a tokenizer.json needs tokenizer.eos_token (e.g. '<|endoftext|>'): it "
                       "has no end-of-sequence id of its own.")
    self._set_rules(max_len, eos, lower, canonicalize,
                    self.token_id(bos) if bos else None)
    self.eos_id = self.token_id(eos_token)
    self.pad_id = self.token_id(pad_token) if pad_token else PAD_ID

  def token_id(self, token: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise ValueError(f"{self.model_path!r} has no token {token!r}; check tokenizer.bos / "
                       "eos_token / pad_token.")
    return int(i)

  def _pieces(self, texts):
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, tokens: np.ndarray) -> list[str]:
    """Decodes int [N, L] (or one row [L]) to N strings, stopping at EOS."""
    texts = self._tok.decode_batch(self._content(tokens), skip_special_tokens=True)
    # CLIP's BPE marks word ends with '</w>', which its byte-level decoder leaves in place.
    suffix = getattr(self._tok.model, "end_of_word_suffix", None)
    return [t.replace(suffix, " ").strip() for t in texts] if suffix else texts


def make_tokenizer(cfg, max_len: int | None = None) -> _Encoder:
  """The tokenizer a `config.tokenizer` block describes: kind ('sentencepiece' | 'hf'), path,
  max_len (or `max_len` when given: the text tower's length), lower, canonicalize, bos,
  eos, eos_token ('' = the SentencePiece model's EOS) and pad_token ('' = id 0).
  Fields a config lacks take the defaults of the project's own tokenizer."""
  get = cfg.get
  kind = get("kind", "sentencepiece") or "sentencepiece"
  if kind not in TOKENIZER_KINDS:
    raise ValueError(f"tokenizer.kind={kind!r}; use one of {TOKENIZER_KINDS}.")
  length = int(max_len or get("max_len", 0) or 0)
  rules = dict(eos=get("eos", "sticky") or "sticky", lower=lower_mode(get("lower", False)),
               canonicalize=bool(get("canonicalize", False)))
  if kind == "hf":
    return HFTokenizer(get("path", ""), length, eos_token=get("eos_token", ""),
                       pad_token=get("pad_token", "") or "", bos=get("bos", "") or "", **rules)
  probe = Tokenizer(get("path", ""), max(length, 1))
  named = {k: probe.token_id(get(k)) for k in ("bos", "eos_token", "pad_token") if get(k, "")}
  if "eos_token" in named and named["eos_token"] != probe.eos_id:
    raise ValueError(f"tokenizer.eos_token={get('eos_token')!r} is id {named['eos_token']}, but "
                     f"{probe.model_path!r} ends texts with id {probe.eos_id}; leave eos_token "
                     "empty for SentencePiece models.")
  return Tokenizer(probe.model_path, length, pad_id=named.get("pad_token", PAD_ID),
                   bos_id=named.get("bos"), **rules)
