"""Tokenizer: trained ids, fixed-length encoding, round trip, bad models."""
import os

import numpy as np
import pytest
import sentencepiece as spm

from siglip_fair.data import tokenizer as tok_lib

_WORDS = ["man", "woman", "nurse", "doctor", "librarian", "scientist",
          "book", "laptop", "broom", "stethoscope", "red", "blue"]
_CORPUS = [f"A photo of a {a} {b} with a {c}."
           for a in _WORDS for b in _WORDS[:4] for c in _WORDS[6:]]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  folder = tmp_path_factory.mktemp("spm")
  return tok_lib.train_sentencepiece(iter(_CORPUS), 300,
                                     str(folder / "t.model"))


@pytest.fixture(scope="module")
def raw(model_path):
  """The trained model as sentencepiece itself loads it: the reference."""
  return spm.SentencePieceProcessor(model_file=model_path)


def test_trained_model_ids_and_no_temp_files(model_path, raw):
  assert (raw.pad_id(), raw.eos_id(), raw.unk_id(), raw.bos_id()) == (
      0, 1, 2, -1)
  assert raw.get_piece_size() <= 300
  assert os.listdir(os.path.dirname(model_path)) == ["t.model"]


def test_encode_matches_sentencepiece_plus_eos_and_padding(model_path, raw):
  max_len = 12
  tok = tok_lib.Tokenizer(model_path, max_len)
  texts = ["a nurse", "A photo of a scientist doctor with a stethoscope.", ""]
  got = tok.encode(texts)
  assert got.dtype == np.int32 and got.shape == (3, max_len)
  for row, text in zip(got, texts):
    ids = raw.encode(text)[: max_len - 1] + [1]  # Truncate, EOS stays last.
    np.testing.assert_array_equal(row, ids + [0] * (max_len - len(ids)))
  # The long text really was truncated (else the check above is vacuous).
  assert len(raw.encode(texts[1])) >= max_len
  assert tok.vocab_size == raw.get_piece_size()


def test_lowercase_bytes_and_round_trip(model_path):
  tok = tok_lib.Tokenizer(model_path, 32)
  np.testing.assert_array_equal(tok.encode(["A PHOTO of a Nurse"]),
                                tok.encode([b"a photo of a nurse"]))
  texts = ["a photo of a woman nurse with a laptop.", "red blue book"]
  assert tok.decode(tok.encode(texts)) == texts
  assert tok.decode(tok.encode(texts)[0]) == texts[:1]


def test_decode_stops_at_eos(model_path):
  tok = tok_lib.Tokenizer(model_path, 16)
  a, b = tok.encode(["a man", "a book"])
  joined = np.concatenate([a[: list(a).index(1) + 1], b])[:16]
  assert tok.decode(joined[None]) == ["a man"]


def test_encode_rejects_single_string(model_path):
  with pytest.raises(ValueError, match="sequence of texts"):
    tok_lib.Tokenizer(model_path, 8).encode("a man")


def test_missing_and_corrupt_model_files(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    tok_lib.Tokenizer(str(tmp_path / "nope.model"), 8)
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"\x08\x01this is not a sentencepiece model" * 4)
  with pytest.raises(ValueError, match="not a valid SentencePiece model"):
    tok_lib.Tokenizer(str(bad), 8)


def test_model_with_other_pad_id_is_rejected(tmp_path):
  path = tmp_path / "default_ids.model"
  with open(path, "wb") as f:  # sentencepiece defaults: unk 0, no pad.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS), model_writer=f, vocab_size=60,
        hard_vocab_limit=False, minloglevel=2)
  with pytest.raises(ValueError, match="pad_id=0"):
    tok_lib.Tokenizer(str(path), 8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=3), "vocab_size"),
    (dict(vocab_size=64, model_type="word"), "model_type"),
])
def test_train_rejects_bad_arguments(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    tok_lib.train_sentencepiece(_CORPUS, path=str(tmp_path / "m.model"),
                                **kwargs)


def test_bpe_model_round_trips(tmp_path):
  path = tok_lib.train_sentencepiece(_CORPUS, 120, str(tmp_path / "bpe.model"),
                                     model_type="bpe")
  tok = tok_lib.Tokenizer(path, 24)
  assert tok.decode(tok.encode(["A Librarian with a broom."])) == [
      "a librarian with a broom."]
