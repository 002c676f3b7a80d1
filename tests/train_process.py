"""One process of a 2-process training run on loopback (started by test_multihost.py), and the
toy data set both that run and the 1-process reference use.

    python tests/train_process.py PROCESS_ID PORT WORKDIR OUT.npz
"""
import os
import sys

if __name__ == "__main__":
  # As conftest.py: level 0 roughly halves compile time, which dominates this test.
  os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                             "--xla_backend_optimization_level=0")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

COLORS = 0.9 * np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], np.float32)
STEPS, STOP = 12, 5


class ToySource:
  """Coloured squares; the caption is the colour's digit."""

  def __len__(self):
    return 512

  def __getitem__(self, i):
    rng = np.random.default_rng(i)
    label = int(rng.integers(4))
    image = rng.integers(0, 60, (16, 16, 3)).astype(np.uint8)
    image[4:12, 4:12] = (127.5 * (COLORS[label] + 1)).astype(np.uint8)
    return {"image": image, "captions": np.array([str(label).encode()])}


class ToyTokenizer:
  def encode(self, texts):
    return np.array([[int(t) + 1, 0] for t in texts], np.int32)


def config(mesh):
  return ml_collections.ConfigDict(dict(
      seed=0, batch_size=16, total=STEPS, warmup=2, log_every=1, ckpt_every=100,
      eval_every=100, keep_ckpts=2, loss="sigmoid", progress=False, mesh=mesh,
      model=dict(image=dict(variant="mu/4", pool="gap"),
                 text=dict(variant="mu", vocab_size=5, max_len=2, pool="last"),
                 embed_dim=16, t_init=10.0, b_init=-10.0),
      optim=dict(name="adamw", lr=3e-3, wd=1e-4, b2=0.95, clip_norm=1.0)))


def run(workdir, mesh, stop_after=None):
  """Trains the toy model in `workdir` (this process's share of every batch); returns params."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from siglip_fair.data import pipeline  # pylint: disable=g-import-not-at-top
  from siglip_fair.train.loop import train  # pylint: disable=g-import-not-at-top
  cfg = config(mesh)
  ds = pipeline.train_dataset(ToySource(), tokenizer=ToyTokenizer(), global_batch_size=16,
                              seed=3, process_index=jax.process_index(),
                              process_count=jax.process_count())
  state = train(cfg, workdir, train_iter=iter(ds), stop_after=stop_after)
  # FSDP leaves are split across the processes; gather them whole on every process.
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(state.params, tiled=True))


def main():
  pid, port, workdir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
  from siglip_fair.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(f"localhost:{port}", 2, pid, timeout_s=120)
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == 2 and len(jax.devices()) == 4
  mesh = {"data": 2, "fsdp": 2}
  run(workdir, mesh, stop_after=STOP)  # "pre-empted" here, then resumed from the checkpoint
  params = run(workdir, mesh)
  if pid == 0:
    leaves = jax.tree.leaves_with_path(params)
    np.savez(out, **{jax.tree_util.keystr(k): v for k, v in leaves})
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
