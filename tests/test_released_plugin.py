"""Released checkpoints wherever a two-tower model is taken (issue 18, item 5): zero-shot image
annotation for M4, CLIP-debias group inference and fine-tuning, with small random checkpoints
written here (a transformers CLIPModel folder with its processor and tokenizer, a big_vision
SigLIP .npz). Annotation and debias similarities are compared with transformers' own CLIPModel
on the same raw images through its own processor and tokenizer; fine-tuning starts from exactly
the checkpoint's weights."""
import grain
import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from configs import debias as debias_config
from configs import siglip as siglip_config
from siglip_fair.annotate import zeroshot
from siglip_fair.debias import infer
from siglip_fair.evaluate import metrics
from siglip_fair.models import make_model, released
from siglip_fair.models.posemb import resize_posemb
from siglip_fair.train import checkpoint
from siglip_fair.train.loop import train
from siglip_fair.train.optim import make_optimizer
from siglip_fair.train.state import make_init_fn

from test_preprocess import _clip_folder, big_vision_npz, clip_bpe

ATOL = 1e-4


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  """(folder, reference CLIPModel, its image processor, its tokenizer): image 12 px, patch 4."""
  folder = tmp_path_factory.mktemp("released") / "clip"
  return (str(folder), *_clip_folder(folder))


def raw_images(n=10, seed=0):
  """uint8 images [n, 20, 28, 3]: not the model's size, nor square."""
  return np.random.default_rng(seed).integers(0, 256, (n, 20, 28, 3), dtype=np.uint8)


def reference_images(clip, images):
  """transformers' unit image embeddings [N, D] through its own image processor."""
  _, model, processor, _ = clip
  with torch.no_grad():
    pixels = processor(list(images), return_tensors="pt")["pixel_values"]
    z = model.get_image_features(pixel_values=pixels)
  return metrics.l2_normalize(getattr(z, "pooler_output", z).numpy().astype(np.float64))


def reference_texts(clip, texts):
  """transformers' unit text embeddings [N, D] through its own tokenizer (12 tokens)."""
  _, model, _, tokenizer = clip
  with torch.no_grad():
    ids = tokenizer(list(texts), padding="max_length", max_length=12, truncation=True,
                    return_tensors="pt")["input_ids"]
    z = model.get_text_features(input_ids=ids)
  return metrics.l2_normalize(getattr(z, "pooler_output", z).numpy().astype(np.float64))


def test_zero_shot_annotation_with_a_released_checkpoint(clip):
  cfg = zeroshot.default_config()
  cfg.update(checkpoint=clip[0], batch_size=4, fields=("s", "y", "w"))
  annotator, params = zeroshot.load_annotator(cfg, model_config=None, tokenizer=None)
  records = [{"image": image} for image in raw_images()]
  ours = annotator.image_embeddings(params, records)
  prompts = annotator.prompt_embeddings(params)

  # transformers on the same raw images and prompts, ensembled as the annotator does.
  sets = zeroshot.prompt_word_sets(cfg)
  texts = {f: zeroshot.prompts.prompt_sets(sets[f], cfg.templates) for f in cfg.fields}
  zimg, scale = reference_images(clip, raw_images()), float(clip[1].logit_scale.detach().exp())
  want = {f: metrics.prompt_ensemble(reference_texts(clip, t), spans)
          for f, (t, spans) in texts.items()}
  assert float(np.abs(metrics.l2_normalize(ours) - zimg).max()) <= ATOL
  for f in cfg.fields:
    assert float(np.abs(prompts[f] - want[f]).max()) <= ATOL, f
  got = annotator.annotate(params, records)
  expected = zeroshot.infer_attributes(zimg, want, scale, cfg)
  for key in ("s", "known", "y", "w"):
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_m4_annotation_path_with_a_released_checkpoint(clip, tmp_path):
  """study.annotations (what `balance` annotates with) on a tiny world: the image side is the
  released model's zero-shot annotation of the world's 16 px images (resized to its 12)."""
  from siglip_fair import study  # pylint: disable=g-import-not-at-top
  config = siglip_config.get_config("res=16")
  config.world.sizes.update(dict(train=24, objects=10, people=10, retrieval=10))
  config.data_dir = str(tmp_path / "data")
  config.annotate.update(dict(source="image", image="zeroshot"))
  config.annotate.zeroshot.update(dict(checkpoint=clip[0], batch_size=8))
  data = study.prepare_data(config, str(tmp_path))
  ann = study.annotations(config, data)
  images = np.stack([data.sources["train"][i]["image"] for i in range(24)])
  assert images.shape == (24, 16, 16, 3)
  groups = zeroshot.prompt_word_sets(config.annotate.zeroshot)["s"]
  texts, spans = zeroshot.prompts.prompt_sets(groups, config.annotate.zeroshot.templates)
  want = zeroshot.infer_attributes(
      reference_images(clip, images), {"s": metrics.prompt_ensemble(reference_texts(clip, texts),
                                                                     spans)},
      float(clip[1].logit_scale.detach().exp()), config.annotate.zeroshot)
  for key in ("s", "known"):
    np.testing.assert_array_equal(ann[key], want[key], err_msg=key)
  assert 0 < ann["s"][:, 0].sum() < 24  # both groups occur: the comparison has content


def test_debias_infers_with_a_released_checkpoint(clip, tmp_path):
  config = debias_config.get_config("task=digits")
  config.clip.update(dict(kind="released", path=clip[0], batch_size=4))
  handle = infer.load_two_tower(config.clip, str(tmp_path))
  assert handle.image_size == 12
  attributes = {"red": ["red", "a red object"], "blue": ["blue"], "cat": ["cat"]}
  templates = ["a photo of {}", "{}"]
  ours = infer.similarities(handle, raw_images(), attributes, templates, 4)
  texts, spans = infer.prompts.prompt_sets(attributes, templates)
  want = reference_images(clip, raw_images()) @ metrics.prompt_ensemble(
      reference_texts(clip, texts), spans).T
  diff = float(np.abs(ours - want).max())
  print(f"debias similarities vs transformers: max |diff| {diff:.1e}")
  assert diff <= ATOL
  config.clip.image_size = 16  # another resolution: the position grid must be resampled
  with pytest.raises(ValueError, match="3x3 patch grid.*16 px images need 4x4"):
    infer.load_two_tower(config.clip, str(tmp_path))
  config.clip.resize_posemb = True
  assert infer.load_two_tower(config.clip, str(tmp_path)).params["img"]["pos_embedding"].shape \
      == (1, 17, 16)
  config.clip.path = str(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="clip.path"):
    infer.load_two_tower(config.clip, str(tmp_path))


def test_debias_big_vision_kind_defaults_to_the_checkpoint_resolution(tmp_path):
  npz, params = big_vision_npz(tmp_path / "s.npz", max_len=8)
  from siglip_fair.data.tokenizer import train_sentencepiece  # pylint: disable=g-import-not-at-top
  spm = train_sentencepiece(iter(["a photo of a cat", "a red dog"] * 50), 30,
                            str(tmp_path / "t.model"))
  config = debias_config.get_config("task=digits")
  config.clip.update(dict(kind="big_vision", npz=str(npz), tokenizer=spm))
  assert infer.load_two_tower(config.clip, str(tmp_path)).image_size == 16
  config.clip.image_size = 24
  with pytest.raises(ValueError, match="clip.npz=.*need a 6x6 grid.*resize_posemb"):
    infer.load_two_tower(config.clip, str(tmp_path))
  config.clip.resize_posemb = True
  handle = infer.load_two_tower(config.clip, str(tmp_path))
  np.testing.assert_allclose(handle.params["img"]["pos_embedding"],
                             resize_posemb(params["img"]["pos_embedding"], (6, 6)))


def _batches(image_size, max_len, vocab, batch=8):
  def example(i):
    rng = np.random.default_rng(i)
    return {"image": rng.uniform(-1, 1, (image_size, image_size, 3)).astype(np.float32),
            "text": rng.integers(0, vocab, max_len).astype(np.int32)}
  return iter(grain.MapDataset.range(10**6).map(example).batch(batch).to_iter_dataset())


def test_fine_tuning_starts_from_the_released_weights(clip, tmp_path):
  folder = clip[0]
  config = siglip_config.get_config(f"init={folder},res=12")
  assert config.model.init_from == folder and not config.model.init_resize_posemb
  assert (config.loss, config.tokenizer.kind, config.tokenizer.max_len) == ("softmax", "hf", 12)
  assert config.model.image.pixel_mean and config.model.text.causal
  spec = released.resolve(folder)
  want = released.load_params(spec)

  # train's own initialisation (state.make_init_fn) gives exactly the checkpoint's weights ...
  tx, _ = make_optimizer(config.optim, 10, 1)
  init = make_init_fn(make_model(config.model), tx, np.zeros((1, 12, 12, 3), np.float32),
                      np.zeros((1, 12), np.int32))
  state = jax.device_get(jax.jit(init)(jax.random.key_data(jax.random.key(3))))
  jax.tree.map(np.testing.assert_array_equal, state.params, want)

  # ... so does the loop's (sharded over the 8 test devices), and it trains on from them.
  vocab = len(clip_bpe()[0])
  run = ml_collections.ConfigDict(dict(
      seed=0, batch_size=8, total=2, warmup="0", log_every=1, ckpt_every=2, eval_every="never",
      keep_ckpts=1, loss=config.loss, progress=False, mesh={"data": -1}, model=config.model,
      optim=dict(config.optim.to_dict(), lr=1e-3)))
  workdir = str(tmp_path / "run")
  start = train(run, workdir, train_iter=_batches(12, 12, vocab), stop_after=0)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(start.params), want)
  train(run, workdir, train_iter=_batches(12, 12, vocab))
  tuned = checkpoint.load_params(workdir)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), tuned, want))
  assert 0 < max(moved) < 0.05  # two Adam steps of lr 1e-3 from the released weights

  # At another resolution the position grid is resampled (CLIP's class row kept) when asked.
  config16 = siglip_config.get_config(f"init={folder},res=16")
  assert config16.model.init_resize_posemb
  init16 = jax.jit(make_model(config16.model).init)
  params = init16(jax.random.key(0), np.zeros((1, 16, 16, 3)), np.zeros((1, 12), np.int32))
  params = params["params"]
  posemb = want["img"]["pos_embedding"]
  np.testing.assert_array_equal(params["img"]["pos_embedding"][:, :1], posemb[:, :1])
  np.testing.assert_allclose(params["img"]["pos_embedding"][:, 1:],
                             resize_posemb(posemb[:, 1:], (4, 4)), rtol=1e-6)
  # The checks run when init is traced (eval_shape: nothing is computed).
  config16.model.init_resize_posemb = False
  with pytest.raises(ValueError, match=r"3x3 patch grid.*16 px images need 4x4.*resize_posemb"):
    jax.eval_shape(make_model(config16.model).init, jax.random.key(0),
                   np.zeros((1, 16, 16, 3)), np.zeros((1, 12), np.int32))
  config.model.image.width = 24  # a config.model that is not the checkpoint's
  config.model.image.num_heads = 2
  with pytest.raises(ValueError, match=r"init_from=.*does not fit config.model.*shapes differ "
                     r".*img/Transformer/encoder_norm/bias: checkpoint \(16,\), model \(24,\)"):
    jax.eval_shape(make_model(config.model).init, jax.random.key(0),
                   np.zeros((1, 12, 12, 3)), np.zeros((1, 12), np.int32))


def test_transformers_reference_is_what_the_checkpoint_holds(clip):
  """The reference model is the one in the folder (a guard for the tests above)."""
  folder, model, *_ = clip
  again = transformers.CLIPModel.from_pretrained(folder).eval()
  for key, value in model.state_dict().items():
    assert torch.equal(value, again.state_dict()[key]), key
