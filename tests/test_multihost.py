"""Two JAX processes on loopback (2 fake CPU devices each, data x fsdp mesh, pre-empted and
resumed half way) train exactly as one process with 8 devices does."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import train_process
from siglip_fair.data.pipeline import normalize_image
from siglip_fair.models import make_model
from siglip_fair.train.distributed import initialize
from siglip_fair.train.progress import read_metrics


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_process_training_matches_one_process(tmp_path):
  reference = train_process.run(str(tmp_path / "single"), {"data": -1})
  port = _free_port()
  script = os.path.join(os.path.dirname(__file__), "train_process.py")
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
  env.pop("XLA_FLAGS", None)
  workdir = tmp_path / "multi"
  procs = [subprocess.Popen([sys.executable, script, str(i), str(port), str(workdir),
                             str(tmp_path / "params.npz")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]

  single = read_metrics(str(tmp_path / "single" / "metrics.jsonl"))
  multi = read_metrics(str(workdir / "metrics.jsonl"))  # written by process 0 only
  assert [r["step"] for r in multi] == list(range(1, train_process.STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in multi], [r["loss"] for r in single],
                             rtol=1e-5)
  with np.load(tmp_path / "params.npz") as f:
    multi_params = dict(f)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree.leaves_with_path(reference)}
  assert multi_params.keys() == flat.keys()
  # Compare the trained functions, not raw leaves: parameters with an identically zero gradient
  # (attention key biases) take Adam steps of ~lr on pure rounding noise, harmlessly.
  treedef = jax.tree.structure(reference)
  multi = jax.tree.unflatten(treedef, [multi_params[k] for k in flat])
  model = make_model(train_process.config({"data": -1}).model)
  source, tok = train_process.ToySource(), train_process.ToyTokenizer()
  images = np.stack([normalize_image(source[i]["image"]) for i in range(600, 632)])
  texts = tok.encode([b"0", b"1", b"2", b"3"])
  embed = lambda p: model.apply({"params": p}, images, texts)[:2]  # noqa: E731
  for got, want in zip(embed(multi), embed(reference)):
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_distributed_arguments_are_checked():
  for args in [("localhost:1234", None, 0), ("localhost:1234", 2, 2), ("localhost", 2, 0)]:
    with pytest.raises(ValueError, match="coordinator|process_id"):
      initialize(*args)
