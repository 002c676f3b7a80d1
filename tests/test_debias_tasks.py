"""The coloured-digits task: a spurious colour shortcut in training only."""
import numpy as np
import pytest
from sklearn.datasets import load_digits

from siglip_fair.debias import tasks


def test_coloured_digits_plants_the_shortcut_in_training_only():
  train = tasks.coloured_digits("train", correlation=0.9, seed=1)
  test = tasks.coloured_digits("test", correlation=0.9, seed=1)
  assert len(train["label"]) + len(test["label"]) == 1797
  assert train["image"].shape[1:] == (16, 16, 3) and train["image"].dtype == np.uint8
  agree_train = np.mean(train["colour"] == train["label"])
  agree_test = np.mean(test["colour"] == test["label"])
  assert abs(agree_train - 0.9) < 0.03 and abs(agree_test - 0.5) < 0.06
  # Images are the sklearn digits, upscaled and inked in their colour.
  digits = load_digits()
  first = train["image"][0].astype(np.float64) / 255
  idx = [i for i in range(1797) if digits.target[i] == train["digit"][0]]
  ink = first.max(-1)
  channel = tasks.COLOURS[train["colour"][0]]
  np.testing.assert_allclose(first, ink[..., None] / channel.max() * channel, atol=2 / 255)
  assert any(np.allclose(np.kron(digits.images[i] / 16, np.ones((2, 2))) * channel.max(), ink,
                         atol=2 / 255) for i in idx)
  np.testing.assert_array_equal(train["label"], train["digit"] >= 5)
  again = tasks.coloured_digits("train", correlation=0.9, seed=1)
  np.testing.assert_array_equal(again["colour"], train["colour"])
  with pytest.raises(ValueError, match="split="):
    tasks.coloured_digits("val")
  with pytest.raises(ValueError, match="correlation"):
    tasks.coloured_digits("train", correlation=1.5)
