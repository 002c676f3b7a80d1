"""The bad-input catalogue (tests/test_bad_inputs*.py): every case, what is fed in, a fragment
of the message that names the problem and one that says the fix; and the checks every case
shares. With BAD_INPUTS_LOG=<file> set, every case appends {"case", "fed", "message"} to that
file (the table of the issue's closing note).
"""
import json
import os
from typing import NamedTuple

import pytest

from siglip_fair import cli


class Case(NamedTuple):
  id: str
  fed: str      # the bad input, as a user would give it
  problem: str  # fragment of the message naming the problem
  fix: str      # fragment of the message saying the fix


CASES = [
    Case("unknown_config_key", "train --config.optim.learning_rate=1",
         "optim has no field 'learning_rate'", "its fields are"),
    Case("wrong_type", "train --config.batch_size=big",
         "--config.batch_size expects int", "like its current value 128"),
    Case("zero_batch_size", "train --config.batch_size=0",
         "config.batch_size=0 must be a positive integer", "e.g. --config.batch_size=256"),
    Case("zero_total_steps", "train --config.total=0",
         "config.total='0' gives 0 steps", "set --config.total to steps"),
    Case("zero_mesh_axis", "train --config.mesh.data=0",
         "{'data': 0, 'fsdp': 1}: sizes must be positive", "e.g. --config.mesh.data=-1"),
    Case("negative_world_size", "train --config.world.sizes.train=-5",
         "world.sizes.train=-5 must be a number of examples >= 0",
         "e.g. --config.world.sizes.train=20000"),
    Case("negative_embed_dim", "train --config.model.embed_dim=-8",
         "config.model.embed_dim=-8 must be a positive integer", "--config.model.embed_dim=64"),
    Case("missing_manual_dir", "faces.build('fairface', manual_dir=<absent folder>)",
         "fairface_download is missing or empty", "fairface_label_train.csv"),
    Case("unprepared_eval_dataset",
         "train --config.eval_data.ff.dataset=fairface --config.eval_data.ff.split=validation "
         "--config.eval_data.ff.data_dir=<empty folder>",
         "fairface is not prepared under", "siglip_fair.data.faces.build('fairface'"),
    Case("empty_split", "train --config.world.sizes.objects=0",
         "world.sizes.objects=0", "--config.world.sizes.objects=100"),
    Case("corrupted_arrayrecord_shard", "train with bytes overwritten inside the train shard",
         "synthetic_world-train.array_record-00000-of-00001 cannot be read",
         "regenerates the world"),
    Case("undecodable_image", "import of a webdataset shard with a broken JPEG",
         "1 (undecodable image)", "import_report.json"),
    Case("non_utf8_caption", "import of a webdataset shard with a Latin-1 caption",
         "1 (caption not UTF-8)", "import_report.json"),
    Case("empty_caption", "import of a webdataset shard with a blank caption",
         "1 (empty caption)", "import_report.json"),
    Case("all_entries_broken", "import of a folder whose only image is broken",
         "no usable pairs", "must decode and have a non-empty UTF-8 caption"),
    Case("missing_manifest_image", "import of a JSONL manifest naming an absent image",
         "1 (missing image file)", "import_report.json"),
    Case("annotations_wrong_shape", "balance --config.annotations_dir=<shard with y of shape [N]>",
         "'y' has shape (128,) but must be [N, c]", "rewrite the shard"),
    Case("annotations_nan", "balance --config.annotations_dir=<shard with a NaN in y>",
         "'y' has 1 row(s) with NaN or inf values (first: row 3", "fix or drop those rows"),
    Case("annotations_utility_column", "balance.balance(ann with u of shape [N, 1], ...)",
         "'u' has shape (256, 1) but must be [N]", "flatten it to [N]"),
    Case("annotations_groups_1d", "balance.balance(ann with s of shape [N] (group indices))",
         "'s' has shape (256,) but must be [N, m]", "give it as [N, 1] (s[:, None])"),
    Case("annotations_labels_1d", "balance.balance(ann with y of shape [N] (label indices))",
         "'y' has shape (256,) but must be [N, c]", "one-hot encode indices"),
    Case("annotations_no_groups", "balance.balance(ann with s of shape [N, 0])",
         "'s' has shape (256, 0) but must be [N, m] with m >= 1",
         "M4 needs at least one group column"),
    Case("annotations_fractional_groups", "balance.balance(ann with s = 0.5 for some rows)",
         "'s'] must be exactly 0 or 1", "set balance.soft_membership=True"),
    Case("annotations_extra_rows",
         "balance.balance_stream([ann, ann with 5 more rows of y than of s], ...)",
         "annotation shard 1: 'y' has shape (133, 10) but must be [N, c]",
         "never cut or padded"),
    Case("annotations_nan_unused_field",
         "balance.balance(ann with a NaN in u, use_utility=False)",
         "'u'] has 1 non-finite values", "refused in every field, used by the config or not"),
    Case("annotations_shards_disagree",
         "balance --config.annotations_dir=<shards with 10 and 8 label columns>",
         "'y' has 8 columns (labels) but the first shard has 10",
         "every shard needs the same labels"),
    Case("pickled_annotation_shard", "balance --config.annotations_dir=<npz with an object array>",
         "holds pickled Python objects", "not trusted"),
    Case("pickled_big_vision_npz", "big_vision.load_npz(<npz with an object array>)",
         "holds pickled Python objects", "not trusted"),
    Case("targets_out_of_range", "balance --config.balance.pi=(1.5,-0.5)",
         "balance.pi=(1.5, -0.5) must list one target prevalence in [0, 1]", "(0.5, 0.5)"),
    Case("targets_not_summing_to_one", "balance --config.balance.pi=(0.7,0.6)",
         "sums to 1.300", "give targets that sum to 1"),
    Case("budget_out_of_range", "balance --config.balance.eta=1.5",
         "balance.eta=1.5 is the budget", "--config.balance.eta=0.65"),
    Case("infeasible_constraints", "balance --config.balance.eta=1.0 (keep everything)",
         "verdict: infeasible): binding rep[", "--config.balance.allow_infeasible=true"),
    Case("checkpoint_shape_mismatch", "resume a workdir trained with embed_dim=32 at embed_dim=16",
         "has params/img_head/kernel of shape (32, 32) but the config builds (32, 16)",
         "use a fresh --workdir, or the config it was trained with"),
    Case("truncated_checkpoint", "resume with a data file of checkpoints/2/state cut in half",
         "checkpoint step 2 in", "to resume from step 1, the previous checkpoint"),
    Case("tokenizer_not_sentencepiece", "train --config.tokenizer.path=<a text file>",
         "is not a valid SentencePiece model", "point tokenizer.path at a `.model` file"),
    Case("batch_not_divisible_by_devices", "train --config.batch_size=12 (8 devices)",
         "config.batch_size=12 is not divisible by the 8 devices", "(e.g. 8 or 16)"),
    Case("missing_config_file", "train --config nope.py",
         "config file 'nope.py' does not exist", "e.g. configs/siglip.py"),
    Case("config_without_get_config", "train --config <file without get_config>",
         "defines no get_config(arg)", "def get_config(arg=None)"),
    Case("malformed_duration", "train --config.total=10xx",
         "cannot read duration '10xx'", "use steps (300), examples ('5000ex')"),
    Case("unknown_loss", "train --config.loss=hinge",
         "config.loss='hinge' is not a loss", "('sigmoid', 'softmax')"),
    Case("unknown_nonfinite_policy", "train --config.nonfinite=ignore",
         "config.nonfinite='ignore'", "use one of ('stop', 'skip')"),
    Case("unknown_model_variant", "train --config.model.image.variant=XL/16",
         "model variant 'XL/16' is not known", "(e.g. 'B/16', 'mu/4')"),
    Case("unknown_evaluator_type", "train --config.evals.zeroshot.type=zeroshoot",
         "config.evals.zeroshot.type='zeroshoot' is not an evaluator type",
         "did you mean 'zeroshot'?"),
    Case("unknown_eval_split", "train --config <file setting evals.rb.split='valid'>",
         "needs split 'valid', which does not exist", "set its `split` to one of"),
    Case("mesh_not_device_count", "train --config.mesh.data=3 (8 devices)",
         "8 devices are not divisible by 3", "product is the device count (8)"),
    Case("missing_annotations_dir", "balance --config.annotations_dir=<absent folder>",
         "does not exist", "annotations_dir must be a folder of .npz or .parquet"),
    Case("big_vision_npz_missing_keys", "infer.load_two_tower(clip.npz=<npz with 2 arrays>)",
         "not a big_vision two-tower checkpoint: missing keys", "models.big_vision.save_npz"),
    Case("malformed_data_schedule", "train --config.data_version=baseline->balanced",
         "takes no '@WHEN'; every later one needs one", "'baseline->balanced@10%'"),
    Case("unknown_loss_impl", "train --config.loss_impl=ringg",
         "config.loss_impl='ringg' is not a loss implementation", "did you mean 'ring'?"),
    Case("unknown_model_dtype", "train --config.model.dtype=fp8",
         "model.dtype='fp8'", "use one of ['bfloat16', 'float32']"),
    Case("unknown_model_head", "train --config.model.head=deep",
         "config.model.head='deep'", "use one of ('linear', 'mlp', 'none')"),
    Case("unknown_image_pool", "train --config.model.image.pool=max",
         "config.model.image.pool='max'", "use one of ('gap', 'map', 'tok')"),
    Case("image_size_not_divisible_by_patch", "train --config.world.image_size=30 (patch 8)",
         "world.image_size=30 is not a multiple of the patch size 8",
         "--config.world.image_size=24"),
    Case("tokenizer_vocab_too_small", "train --config.tokenizer.vocab_size=5",
         "tokenizer.vocab_size=5 is too small", "use --config.tokenizer.vocab_size="),
    Case("config_syntax_error", "train --config <file with a syntax error on line 3>",
         "line 3: syntax error", "fix the file"),
    Case("workdir_is_a_file", "train --workdir <a file>",
         "is a file, not a folder", "pass a folder path"),
    Case("workdir_read_only", "train --workdir <a folder that cannot be written>",
         "cannot write in", "pass another --workdir"),
    Case("workdir_in_use", "train --workdir <a folder another train command is writing>",
         "is in use by pid", "wait for it to finish, or use another --workdir"),
    Case("unknown_debias_task", "debias --config.task.name=mnist",
         "task.name='mnist' is not a debias task", "configs/debias.py:task=digits"),
    Case("eval_changes_training_field", "eval --workdir RUN --config.total=5",
         "eval cannot change --config.total", "eval may set only"),
    Case("eval_without_checkpoint", "eval --workdir <folder with earlier results, no checkpoint>",
         "no complete checkpoint in", "train a model there first"),
]
CASE = {c.id: c for c in CASES}
SEEN: dict[str, str] = {}

def _clear(case_id: str, message: str) -> None:
  """(a): the message names the problem and says the fix."""
  case = CASE[case_id]
  assert case.problem in message and case.fix in message, message
  assert "Traceback" not in message, message
  SEEN[case_id] = message.strip()


def write_log(cases=None) -> None:
  """Appends the messages seen so far (of `cases`: all by default) to $BAD_INPUTS_LOG."""
  path = os.environ.get("BAD_INPUTS_LOG")
  if path:
    with open(path, "a") as f:
      for case in CASES:
        if case.id in SEEN and (cases is None or case.id in cases):
          f.write(json.dumps({"case": case.id, "fed": case.fed,
                              "message": SEEN.pop(case.id)}) + "\n")


def _snapshot(*roots) -> dict:
  """Every file and folder below roots: relative path -> (bytes, mtime_ns) (folders: None)."""
  out = {}
  for root in roots:
    for folder, dirs, files in os.walk(root):
      for d in dirs:
        out[os.path.join(folder, d)] = None
      for f in files:
        if f == ".lock":  # a command's workdir lock (siglip_fair/workdir.py), not an output
          continue
        path = os.path.join(folder, f)
        with open(path, "rb") as fh:
          out[path] = (fh.read(), os.stat(path).st_mtime_ns)
  return out


def _earlier(path) -> str:
  """A workdir that already holds an earlier run's results."""
  os.makedirs(path, exist_ok=True)
  for name, text in (("config.json", '{"earlier": true}\n'), ("eval.json", '{"top1": 0.5}\n'),
                     ("metrics.jsonl", '{"step": 1, "loss": 2.0}\n'),
                     ("annotation_report.json", "{}\n")):
    with open(os.path.join(path, name), "w") as f:
      f.write(text)
  return str(path)


# ---------------------------------------------- the tiny world and its command-line runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny synthetic world, built once per module (see `world`).
TINY = ["--config.world.sizes.train=256", "--config.world.sizes.objects=40",
        "--config.world.sizes.people=40", "--config.world.sizes.retrieval=40",
        "--config.progress=false"]
N_TRAIN = 256


def _cli(capsys, command, *args, data_dir=None, workdir=None, code=1):
  """Runs `siglip-fair command` on the tiny world; (b) and (c): exits `code`, prints one
  error line, and leaves `workdir` (an earlier run's) unchanged. Returns stderr."""
  before = _snapshot(workdir)
  extra = [f"--config.data_dir={data_dir}"] if data_dir else []
  got = cli.main([command, "--workdir", workdir, *TINY, *extra, *args])
  err = capsys.readouterr().err
  assert got == code, err
  assert sum(line.startswith("siglip-fair") for line in err.splitlines()) == 1, err
  assert _snapshot(workdir) == before
  return err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The tiny world's data folder (built, with its tokenizer)."""
  data_dir = str(tmp_path_factory.mktemp("world"))
  prep = str(tmp_path_factory.mktemp("prep"))
  # The world of every subcommand's default config (configs/demo.py).
  assert cli.main(["data", "--config", os.path.join(REPO, "configs", "demo.py"),
                   "--workdir", prep, *TINY, f"--config.data_dir={data_dir}"]) == 0
  # Its folder name (s<seed>_<hash>) also names its tokenizer: the tag picks this world's files.
  (_TAG[data_dir],) = os.listdir(os.path.join(data_dir, "synthetic_world"))
  return data_dir


_TAG = {}  # data_dir -> the tag of the world the fixture built there


@pytest.fixture
def run(tmp_path, world, capsys):
  """run(command, *overrides, code=...) on the tiny world in a workdir with earlier results."""
  workdir = _earlier(tmp_path / "run")
  return lambda command, *args, code=1: _cli(capsys, command, *args, data_dir=world,
                                             workdir=workdir, code=code)
