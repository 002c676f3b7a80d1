"""Hugging Face SiglipModel / CLIPModel checkpoints (models/hf.py) against transformers itself.

Each case builds a small random model with transformers from a config (never downloaded), every
tensor redrawn so that no mapping hides behind an initialiser's zeros and ones, saves it with
save_pretrained, loads it with ours and compares embeddings and logit scale / bias on the same
pixels (NHWC here, NCHW in torch) and token ids. save_hf then writes ours back; transformers'
from_pretrained must load exactly the original tensors, and our reload of it is bit-exact.
The key sets are written out from transformers' modeling code, independently of models/hf.py.
torch and transformers are test-only dependencies (the `test` extra).
"""
import json

import jax
import ml_collections
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from siglip_fair.models import hf, make_model
from siglip_fair.models.two_tower import check_config

ATOL = 1e-4
# (width, depth, mlp_dim, heads) per tower; sizes, patches, activations and epsilons vary.
CASES = [
    dict(family="siglip", seed=0, image=8, patch=4, vision=(16, 2, 24, 2), text=(12, 2, 20, 3),
         vocab=40, max_len=7, length=7, act="gelu_pytorch_tanh", eps=1e-6),
    dict(family="siglip", seed=1, image=6, patch=2, vision=(24, 1, 32, 3), text=(16, 3, 16, 2),
         vocab=25, max_len=6, length=4, act="gelu_pytorch_tanh", eps=1e-6),
    dict(family="siglip", seed=2, image=12, patch=4, vision=(32, 2, 40, 4),
         text=(32, 1, 24, 4), vocab=50, max_len=9, length=9, act="gelu", eps=1e-5),
    # eos: the last id of the vocabulary (today's CLIP configs), 2 (old configs: CLIPTextModel
    # pools at the highest id) or an id in the middle of the vocabulary.
    dict(family="clip", seed=0, image=8, patch=4, vision=(16, 2, 24, 2), text=(12, 2, 20, 3),
         vocab=40, max_len=7, length=7, act="quick_gelu", eps=1e-5, eos=39, proj=10),
    dict(family="clip", seed=1, image=6, patch=2, vision=(24, 1, 32, 3), text=(16, 3, 16, 2),
         vocab=25, max_len=6, length=5, act="quick_gelu", eps=1e-5, eos=2, proj=8),
    dict(family="clip", seed=2, image=12, patch=4, vision=(32, 2, 40, 4), text=(24, 1, 24, 4),
         vocab=50, max_len=9, length=9, act="gelu", eps=1e-6, eos=17, proj=20),
]
IDS = [f"{c['family']}-{c['seed']}" for c in CASES]


def _tower(sizes, act, eps):
  width, depth, mlp_dim, heads = sizes
  return dict(hidden_size=width, num_hidden_layers=depth, intermediate_size=mlp_dim,
              num_attention_heads=heads, hidden_act=act, layer_norm_eps=eps)


def reference_model(case):
  """A transformers SiglipModel / CLIPModel of `case`, every parameter redrawn from its seed."""
  torch.manual_seed(case["seed"])
  vision = dict(_tower(case["vision"], case["act"], case["eps"]), image_size=case["image"],
                patch_size=case["patch"])
  text = dict(_tower(case["text"], case["act"], case["eps"]), vocab_size=case["vocab"],
              max_position_embeddings=case["max_len"])
  if case["family"] == "siglip":
    model = transformers.SiglipModel(transformers.SiglipConfig(
        text_config=dict(text, projection_size=case["vision"][0]), vision_config=vision))
  else:
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(text, eos_token_id=case["eos"]), vision_config=vision,
        projection_dim=case["proj"]))
  generator = torch.Generator().manual_seed(case["seed"])
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      norm_scale = ("norm" in name or "layrnorm" in name) and name.endswith("weight")
      p.copy_(1 + 0.2 * noise if norm_scale else 0.3 * noise)
  return model.eval()


def inputs(case, batch=4):
  """Pixels [B, H, W, 3] and token ids [B, length] of `case`. CLIP rows hold the EOS id at
  different positions with ordinary tokens after it (only the causal mask keeps them from the
  pooled token), and one row has none (both sides then pool position 0)."""
  rng = np.random.default_rng(case["seed"])
  pixels = rng.normal(size=(batch, case["image"], case["image"], 3)).astype(np.float32)
  tokens = rng.integers(0, case["vocab"], size=(batch, case["length"])).astype(np.int32)
  if case["family"] == "clip" and case["eos"] != 2:
    tokens[tokens == case["eos"]] = case["eos"] - 1
    for row, position in enumerate([case["length"] - 1, 1, 3]):
      tokens[row, position:position + 2] = case["eos"]  # a repeat: the first one counts
  return pixels, tokens


def reference_forward(model, pixels, tokens):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens).long(),
                pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
  with torch.no_grad():
    scale = model.logit_scale.exp().numpy().reshape(())
    bias = model.logit_bias.numpy().reshape(()) if hasattr(model, "logit_bias") else 0.0
  return (out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy(),
          scale, bias)


def our_forward(ckpt, pixels, tokens):
  model = make_model(ml_collections.ConfigDict(ckpt.config))
  zimg, ztxt, extras = jax.jit(model.apply)({"params": ckpt.params}, pixels, tokens)
  logits = extras["t"] * zimg @ ztxt.T + extras["b"]
  return zimg, ztxt, logits, extras["t"], extras["b"]


def _attention(prefix, packed=False):
  if packed:  # torch.nn.MultiheadAttention
    return [f"{prefix}.in_proj_weight", f"{prefix}.in_proj_bias", f"{prefix}.out_proj.weight",
            f"{prefix}.out_proj.bias"]
  return [f"{prefix}.{p}_proj.{w}" for p in ("q", "k", "v", "out") for w in ("weight", "bias")]


def _linear(prefix, bias=True):
  return [f"{prefix}.weight"] + ([f"{prefix}.bias"] if bias else [])


def released_keys(family, vision_depth, text_depth):
  """The tensors of a SiglipModel / CLIPModel file, as transformers' modeling code defines
  them: SigLIP has logit_bias, an attention-pooling head and a text head with bias, no image
  projection; CLIP has a class embedding, pre_layrnorm, bias-free patch embedding and
  projections, and no logit_bias."""
  def layers(tower, depth):
    return [k for i in range(depth) for k in
            _linear(f"{tower}.encoder.layers.{i}.layer_norm1")
            + _linear(f"{tower}.encoder.layers.{i}.layer_norm2")
            + _attention(f"{tower}.encoder.layers.{i}.self_attn")
            + _linear(f"{tower}.encoder.layers.{i}.mlp.fc1")
            + _linear(f"{tower}.encoder.layers.{i}.mlp.fc2")]
  v, t = "vision_model", "text_model"
  keys = (layers(v, vision_depth) + layers(t, text_depth)
          + [f"{v}.embeddings.patch_embedding.weight", f"{v}.embeddings.position_embedding.weight",
             f"{t}.embeddings.token_embedding.weight", f"{t}.embeddings.position_embedding.weight",
             "logit_scale"]
          + _linear(f"{v}.post_layernorm") + _linear(f"{t}.final_layer_norm"))
  if family == "siglip":
    keys += ([f"{v}.embeddings.patch_embedding.bias", f"{v}.head.probe", "logit_bias"]
             + _attention(f"{v}.head.attention", packed=True) + _linear(f"{v}.head.layernorm")
             + _linear(f"{v}.head.mlp.fc1") + _linear(f"{v}.head.mlp.fc2") + _linear(f"{t}.head"))
  else:
    keys += ([f"{v}.embeddings.class_embedding"] + _linear(f"{v}.pre_layrnorm")
             + _linear("visual_projection", bias=False) + _linear("text_projection", bias=False))
  return set(keys)


def _assert_close(ours, theirs, what):
  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(ours, theirs)]
  print(f"{what}: max |diff| image {diffs[0]:.1e}, text {diffs[1]:.1e}, logits {diffs[2]:.1e}, "
        f"scale {diffs[3]:.1e}, bias {diffs[4]:.1e}")
  for name, diff, tol in zip(("image", "text", "logits", "scale", "bias"), diffs,
                             (ATOL, ATOL, 10 * ATOL, ATOL, ATOL)):
    assert diff <= tol, (what, name, diff)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_checkpoint_loads_and_exports(tmp_path, case):
  family = case["family"]
  reference = reference_model(case)
  reference.save_pretrained(tmp_path / "reference")
  keys = released_keys(family, case["vision"][1], case["text"][1])
  assert set(hf.load_safetensors(tmp_path / "reference")) == keys

  ckpt = hf.load_hf(tmp_path / "reference")
  assert (ckpt.family, ckpt.image_size) == (family, case["image"])
  # Exact settings: 'gelu' vs 'gelu_erf' or epsilon 1e-5 vs 1e-6 move embeddings by < 1e-4.
  act = {"gelu_pytorch_tanh": "gelu", "gelu": "gelu_erf", "quick_gelu": "quick_gelu"}[case["act"]]
  for tower in ("image", "text"):
    assert (ckpt.config[tower]["act"], ckpt.config[tower]["norm_eps"]) == (act, case["eps"])
  pixels, tokens = inputs(case)
  want = reference_forward(reference, pixels, tokens)
  _assert_close(our_forward(ckpt, pixels, tokens), want, f"{family} seed {case['seed']} load")
  if family == "clip":
    assert ckpt.config["text"]["eos_id"] == (None if case["eos"] == 2 else case["eos"])
    assert "b" not in ckpt.params and "bias" not in ckpt.params["img_head"]
    assert "bias" not in ckpt.params["img"]["embedding"]
  else:
    assert "b" in ckpt.params and "img_head" not in ckpt.params

  # Ours back to transformers: exactly the original tensors, under exactly the same keys.
  hf.save_hf(tmp_path / "ours", ckpt.params, ckpt.config, family)
  assert set(hf.load_safetensors(tmp_path / "ours")) == keys
  reloaded, info = type(reference).from_pretrained(tmp_path / "ours", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  original, exported = reference.state_dict(), reloaded.eval().state_dict()
  assert set(original) == set(exported)
  for key, value in original.items():
    assert torch.equal(value, exported[key]), key
  for tower in ("text_config", "vision_config"):
    for field in ("hidden_act", "layer_norm_eps", "eos_token_id", "image_size", "patch_size",
                  "max_position_embeddings", "projection_size"):
      assert (getattr(getattr(reloaded.config, tower), field, None)
              == getattr(getattr(reference.config, tower), field, None)), (tower, field)
  assert getattr(reloaded.config, "projection_dim", None) == case.get("proj")
  _assert_close(our_forward(ckpt, pixels, tokens), reference_forward(reloaded, pixels, tokens),
                f"{family} seed {case['seed']} export")

  # Our reload of our export: the very same arrays and config.
  again = hf.load_hf(tmp_path / "ours")
  assert again.config == ckpt.config and again.image_size == ckpt.image_size
  assert jax.tree.structure(again.params) == jax.tree.structure(ckpt.params)
  for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(ckpt.params)):
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def test_scanned_sharded_and_bfloat16(tmp_path):
  case = CASES[0]
  reference = reference_model(case)
  reference.save_pretrained(tmp_path / "f32")
  layered = hf.load_hf(tmp_path / "f32")
  scanned = hf.load_hf(tmp_path / "f32", scan=True)
  assert scanned.config["image"]["scan"] and scanned.config["text"]["scan"]
  block = scanned.params["txt"]["Encoder_0"]["encoderblock"]["LayerNorm_0"]["scale"]
  assert block.shape == (case["text"][1], case["text"][0])  # stacked [depth, width]
  pixels, tokens = inputs(case)
  for a, b in zip(our_forward(scanned, pixels, tokens), our_forward(layered, pixels, tokens)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # Either layout exports the same file.
  layered_tensors, _ = hf.to_hf(layered.params, layered.config, "siglip")
  scanned_tensors, _ = hf.to_hf(scanned.params, scanned.config, "siglip")
  assert set(layered_tensors) == set(scanned_tensors)
  for key, value in layered_tensors.items():
    np.testing.assert_array_equal(scanned_tensors[key], value, err_msg=key)

  # Sharded files (model.safetensors.index.json) read as one.
  reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
  jax.tree.map(np.testing.assert_array_equal, hf.load_hf(tmp_path / "sharded").params,
               layered.params)

  # numpy has no bfloat16: such files are read exactly, widened to float32.
  reference.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  half = hf.load_hf(tmp_path / "bf16")
  rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32),
                         layered.params)
  for a, b in zip(jax.tree.leaves(half.params), jax.tree.leaves(rounded)):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


def test_config_json_defaults_are_transformers_defaults():
  # Released config.json files list little beyond what differs from these.
  clip = hf.model_config({"model_type": "clip"})  # OpenAI CLIP ViT-B/32
  assert clip["image"]["variant"] == "B/32" and clip["text"]["variant"] == "M"
  assert (clip["text"]["vocab_size"], clip["text"]["max_len"], clip["embed_dim"]) == (
      49408, 77, 512)
  assert clip["text"]["eos_id"] == 49407 and clip["text"]["causal"]
  assert (clip["image"]["act"], clip["image"]["norm_eps"]) == ("quick_gelu", 1e-5)
  np.testing.assert_allclose(clip["t_init"], 1 / 0.07, rtol=1e-4)
  assert clip["b_init"] is None and clip["head_bias"] is False
  siglip = hf.model_config({"model_type": "siglip"})  # SigLIP B/16 at 224 px
  assert siglip["image"]["variant"] == "B/16" and siglip["text"]["variant"] == "B"
  assert (siglip["text"]["vocab_size"], siglip["text"]["max_len"], siglip["embed_dim"]) == (
      32000, 64, 768)
  assert (siglip["image"]["pool"], siglip["image"]["head"], siglip["text"]["padding"]) == (
      "map", "none", "none")
  # Old CLIP files: text_config_dict overrides text_config, and eos_token_id 2 means "pool at
  # the highest id".
  legacy = hf.model_config({"model_type": "clip", "text_config": {"eos_token_id": 49407},
                            "text_config_dict": {"eos_token_id": 2}})
  assert legacy["text"]["eos_id"] is None


def test_clear_errors(tmp_path):
  case = CASES[0]
  reference = reference_model(case)
  reference.save_pretrained(tmp_path / "ok")
  config = hf.read_config(tmp_path / "ok")
  tensors = hf.load_safetensors(tmp_path / "ok")

  (tmp_path / "bert").mkdir()
  (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="model_type='bert'.*'siglip'.*'clip'"):
    hf.load_hf(tmp_path / "bert")
  with pytest.raises(ValueError, match="model_type='siglip2'"):
    hf.model_config({"model_type": "siglip2"})
  with pytest.raises(ValueError, match="no model.safetensors"):
    hf.load_safetensors(tmp_path / "bert")

  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "config.json").write_text(json.dumps(config))
  save_file({"encoder.layer.0.weight": np.zeros(2, np.float32)},
            str(tmp_path / "other" / "model.safetensors"))
  with pytest.raises(ValueError, match=r"unknown checkpoint layout.*'encoder\.layer\.0\.weight'"):
    hf.load_hf(tmp_path / "other")

  missing = {k: v for k, v in tensors.items() if k != "logit_bias"}
  with pytest.raises(ValueError, match=r"missing keys \['logit_bias'\].*unknown keys \[\]"):
    hf.from_hf(missing, config)
  extra = dict(tensors, **{"visual_projection.weight": np.zeros((16, 16), np.float32)})
  with pytest.raises(ValueError, match=r"unknown keys \['visual_projection.weight'\]"):
    hf.from_hf(extra, config)
  heads = json.loads(json.dumps(config))
  heads["vision_config"]["num_attention_heads"] = 3  # 16 wide: not a whole number per head
  with pytest.raises(ValueError, match=r"q_proj.weight has shape \(16, 16\), which does not "):
    hf.from_hf(tensors, heads)
  longer = json.loads(json.dumps(config))
  longer["text_config"]["max_position_embeddings"] += 1
  with pytest.raises(ValueError, match=r"txt/pos_embedding: params \(1, 7, 12\), model \(1, 8"):
    hf.from_hf(tensors, longer)

  ckpt = hf.load_hf(tmp_path / "ok")
  with pytest.raises(ValueError, match="not Hugging Face's CLIPModel.*image.pool='map' "
                     r"\(needs 'tok'\).*b_init='a number' \(needs None\)"):
    hf.save_hf(tmp_path / "as_clip", ckpt.params, ckpt.config, "clip")
  masked = json.loads(json.dumps(ckpt.config))
  masked["text"]["padding"] = "mask"
  with pytest.raises(ValueError, match=r"text.padding='mask' \(needs 'none'\)"):
    hf.save_hf(tmp_path / "masked", ckpt.params, masked, "siglip")
  with pytest.raises(ValueError, match="family='bert'"):
    hf.save_hf(tmp_path / "bert_out", ckpt.params, ckpt.config, "bert")


def test_tower_options_are_checked():
  base = hf.model_config({"model_type": "clip", "vision_config": {"image_size": 64}})
  config = ml_collections.ConfigDict(base)
  config.image.pool = "gap"
  with pytest.raises(ValueError, match="cls_posemb=True needs image.pool='tok'"):
    check_config(config, 64)
  config = ml_collections.ConfigDict(base)
  config.text.act = "relu"
  with pytest.raises(ValueError, match=r"model.text.act='relu'; use one of \('gelu', "):
    make_model(config)
  check_config(ml_collections.ConfigDict(base), 64)
