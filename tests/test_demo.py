"""The real entry point, `siglip-fair demo`, end to end on a tiny world (open_clip style), with
the network switched off: nothing is downloaded or contacted at run time."""
import json
import os
import socket

import pytest

from siglip_fair import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INTERNET = (-1, socket.AF_INET, socket.AF_INET6)  # -1: socket.socket's default, AF_INET


@pytest.fixture
def no_network(monkeypatch):
  """socket.socket refuses internet sockets and socket.create_connection fails; yields the
  refused attempts. Local AF_UNIX pairs stay allowed: asyncio makes one per event loop for its
  self-pipe (socket.socketpair), and orbax runs every checkpoint save on a new loop. JAX (CPU)
  and grain open no socket."""
  refused = []

  class NoInternet(socket.socket):
    # pylint: disable-next=redefined-builtin
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
      if family in _INTERNET:
        refused.append(("socket", family))
        raise OSError(f"network disabled in this test (socket family {family})")
      super().__init__(family, type, proto, fileno)

  def create_connection(address, *args, **kwargs):
    refused.append(("create_connection", address))
    raise OSError(f"network disabled in this test (connection to {address})")

  monkeypatch.setattr(socket, "socket", NoInternet)
  monkeypatch.setattr(socket, "create_connection", create_connection)
  yield refused


def test_no_network_fixture_refuses_internet_sockets(no_network):
  with pytest.raises(OSError, match="network disabled"):
    socket.create_connection(("example.com", 80))
  with pytest.raises(OSError, match="network disabled"):
    socket.socket()
  a, b = socket.socketpair()  # local: allowed
  a.close()
  b.close()
  assert len(no_network) == 2
  no_network.clear()


TINY_DEMO = ["--config.total=30", "--config.batch_size=32", "--config.model.image.depth=1",
             "--config.model.text.depth=1", "--config.eval_batch_size=100",
             "--config.progress=false",
             *[f"--config.world.sizes.{k}={v}" for k, v in
               dict(train=1500, objects=100, people=100, retrieval=100).items()],
             *[f"--config.evals.{e}.bootstrap.num_samples=50"
               for e in ("zeroshot", "rb", "ab", "gender_acc")]]


def _readme_demo_command() -> list[str]:
  """The README's quick-start demo command (after its set-up steps), as written."""
  from doc_commands import readme_commands  # pylint: disable=g-import-not-at-top
  (demo,) = [c for c in readme_commands() if c.subcommand == "demo" and not c.inline][:1]
  assert demo.program == "siglip_fair" and demo.argv[:3] == ("python", "-m", "siglip_fair")
  return list(demo.argv[3:])


def test_demo_writes_side_by_side_summary(tmp_path, capsys, no_network, monkeypatch):
  # The README's command verbatim (its relative workdir under a fresh folder), on tiny inputs.
  monkeypatch.chdir(tmp_path)
  args = _readme_demo_command() + TINY_DEMO
  workdir = tmp_path / args[args.index("--workdir") + 1]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "| bias/rb" in out and "baseline" in out and "balanced" in out

  with open(workdir / "summary.json") as f:
    rows = json.load(f)
  by_model = {row["model"]: row for row in rows}
  assert set(by_model) == {"baseline", "balanced"}
  for row in rows:
    for metric in ("bias/rb", "bias/ab_mean", "zeroshot/top1"):
      assert row[f"{metric}_lo"] <= row[metric] <= row[f"{metric}_hi"], (row["model"], metric)
  # M4 removes the planted data-level biases that the baseline keeps.
  assert by_model["baseline"]["kept_fraction"] == 1.0
  assert abs(by_model["balanced"]["kept_fraction"] - 0.5) < 0.05  # balance.eta
  assert abs(by_model["balanced"]["data/rb"]) < 0.3 * abs(by_model["baseline"]["data/rb"])
  assert by_model["balanced"]["data/ab_mean"] < 0.3 * by_model["baseline"]["data/ab_mean"]
  for name in ("summary.md", "curves.png", "bias.png", "balance/card.md", "balance/card.json",
               "baseline/metrics.jsonl", "balanced/eval.json"):
    assert (workdir / name).exists(), name

  # A rerun resumes every stage instead of redoing it.
  mtime = os.path.getmtime(workdir / "balance" / "m4.npz")
  assert cli.main(args) == 0
  assert os.path.getmtime(workdir / "balance" / "m4.npz") == mtime
  assert not no_network, no_network  # nothing even tried to reach the network


def test_demo_world_is_the_one_docs_noise_tuned():
  """configs/demo.py (and so the study) builds run V of docs/NOISE.md: a knob lost in an edit
  (as owner_captions once was) changes what RB measures without any run failing."""
  from siglip_fair import config as cfglib  # pylint: disable=g-import-not-at-top
  c = cfglib.get_config(os.path.join(REPO, "configs", "demo.py"))
  study = cfglib.get_config(os.path.join(REPO, "configs", "study.py"))
  want = dict(woman_prevalence=0.5, association=0.5, object_owner_rate=0.5,
              owner_woman_prevalence=0.1, owner_captions="owner", object_scenes="composed",
              captions="descriptive", object_scale=1.3)
  for cfg in (c, study):
    assert {k: cfg.world[k] for k in want} == want
    assert cfg.optim.lr == 1e-3 and cfg.optim.schedule == "cosine" and cfg.balance.eta == 0.5
    assert cfg.tokenizer.max_len == cfg.model.text.max_len == 48
  with open(os.path.join(REPO, "docs", "NOISE.md")) as f:
    assert "| V | 0.5 | 0.1 | 0.5 | 1e-3, cosine |" in f.read()
