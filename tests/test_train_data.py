"""Training on an imported corpus: synthetic-world pairs written as a webdataset shard, imported,
annotated from their captions, balanced and trained on."""
import io
import json
import tarfile

import numpy as np
import PIL.Image
import pytest

from configs import siglip
from siglip_fair import study
from siglip_fair.data import imports, world


def _shard(path, n=300):
  cfg = world.default_config()
  cfg.sizes.train = n
  arrays = world.generate_split(cfg, "train")
  with tarfile.open(path, "w") as tar:
    for i in range(n):
      png = io.BytesIO()
      PIL.Image.fromarray(arrays["image"][i]).save(png, format="PNG")
      text = "\n".join(c.decode() for c in arrays["captions"][i]).encode()
      for name, data in ((f"{i:06d}.png", png.getvalue()), (f"{i:06d}.txt", text)):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return arrays


def test_train_balance_and_evaluate_on_an_imported_corpus(tmp_path):
  arrays = _shard(tmp_path / "00000.tar")
  path = imports.import_pairs("webdataset", [str(tmp_path / "00000.tar")], str(tmp_path / "tfds"),
                              name="world_pairs", image_size=32, num_workers=1)
  config = siglip.get_config("steps=4,batch=16,depth=1")
  config.train_data = path
  config.world.sizes.update(dict(train=100, objects=50, people=50, retrieval=50))
  config.annotate.source = "text"
  config.progress = False
  for name in ("zeroshot", "rb", "ab", "gender_acc"):
    config.evals[name].bootstrap.num_samples = 10
  data = study.prepare_data(config, str(tmp_path / "run"), report=True)
  assert len(data.sources["train"]) == 300
  captions = data.train_fields["captions"]
  by_key = {}
  source = data.sources["train"]
  for i in range(len(source)):
    key = source[i]["key"]
    by_key[int((key.decode() if isinstance(key, bytes) else key).split("/")[1])] = captions[i]
  for i in (0, 17, 299):
    assert list(by_key[i]) == list(arrays["captions"][i])
  report = json.load(open(tmp_path / "run" / "annotation_report.json"))
  assert 0.3 < report["known/text"] <= 1.0
  result = study.balance(config, str(tmp_path / "run"), data)
  assert result["keep"].shape == (300,)
  final = study.train_and_evaluate(config, str(tmp_path / "run"), data=data)
  assert final["step"] == 4 and np.isfinite(final["zeroshot/top1"])
  config.annotate.source = "ground_truth"
  with pytest.raises(ValueError, match="annotate.source='text'"):
    study.annotations(config, data)
  config.world.image_size = 64
  with pytest.raises(ValueError, match="32x32 images"):
    study.prepare_data(config, str(tmp_path / "other"))
