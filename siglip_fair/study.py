"""One run of the study, stage by stage: data -> annotate -> balance -> train -> evaluate.

`train_and_evaluate(config, workdir)` is the library entry point that the CLI, the demo, tests
and Colab share (Flax-examples style). Each stage is also callable on its own and writes its
outputs atomically into the workdir, so a rerun reuses what is already there.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from siglip_fair import annotate
from siglip_fair.config.durations import resolve_steps
from siglip_fair.data import builder, pipeline, versions, world
from siglip_fair.data.tokenizer import Tokenizer, make_tokenizer, train_sentencepiece
from siglip_fair.io import atomic_savez, atomic_write

EVAL_SPLITS = ("objects", "people", "retrieval")
# `classes` of a zero-shot evaluator that names the synthetic world's object classes, whatever
# its knobs make them (world.object_class_names).
WORLD_CLASSES = "world"


@dataclasses.dataclass
class Data:
  """The built dataset: one random-access source per split, and the tokenizer."""
  sources: dict[str, Any]
  tokenizer: Tokenizer
  data_dir: str
  train_fields: dict[str, np.ndarray]  # captions and ground truth of the train split (no images)


def data_dir(config, workdir: str) -> str:
  return config.get("data_dir") or os.path.join(workdir, "data")


def balance_dir(config, workdir: str) -> str:
  return config.get("balance_dir") or os.path.join(workdir, "balance")


def prepare_data(config, workdir: str, *, report: bool = False) -> Data:
  """Builds the world (TFDS ArrayRecord) and the tokenizer if missing; returns the sources.

  With `config.train_data` (an imported corpus, see `data/imports.py`) that corpus is the
  training split and the world provides only the evaluation splits.
  """
  ddir = data_dir(config, workdir)
  imported = imported_train_split(config) if config.get("train_data") else None
  builder.build(config.world, ddir)
  sources = {split: builder.data_source(config.world, ddir, split) for split in world.SPLITS}
  if imported:
    sources["train"], train_fields = imported
    from siglip_fair import fingerprint
    # Named by content, so a corpus re-imported with other pairs gets its own tokenizer.
    corpus = "import_" + fingerprint.digest(train_data_identity(config), 12)
  else:
    if config.get("cache_train", True):
      # The synthetic world fits in memory; decoding each record once keeps the CPU for training.
      sources["train"] = pipeline.InMemorySource(sources["train"])
    train_fields = read_fields(sources["train"], ("captions", "kind", "s", "y", "w"))
    corpus = builder.builder_config(config.world).name
  tok = config.tokenizer
  path = tok.get("path") or os.path.join(ddir, f"spm_{corpus}_v{tok.vocab_size}.model")
  if not os.path.exists(path):
    if tok.get("path"):
      raise FileNotFoundError(f"tokenizer.path={path!r} does not exist.")
    captions = train_fields["captions"].reshape(-1)
    train_sentencepiece((c.decode("utf-8") for c in captions), tok.vocab_size, path)
  # The encoding rules of config.tokenizer (a released model's preset: data/preprocess.py).
  tokenizer = make_tokenizer({**tok.to_dict(), "path": path})
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but "
                     f"model.text.vocab_size={config.model.text.vocab_size}; raise the latter.")
  data = Data(sources=sources, tokenizer=tokenizer, data_dir=ddir, train_fields=train_fields)
  if report:
    pr = annotation_report(config, data)
    os.makedirs(workdir, exist_ok=True)
    atomic_write(os.path.join(workdir, "annotation_report.json"), json.dumps(pr, indent=1))
    print(f"data: {ddir}  tokenizer: {path}")
    print("text annotation vs ground truth: " + ", ".join(
        f"{k}={v:.3f}" for k, v in pr.items() if k.endswith("micro/precision")
        or k.endswith("micro/recall") or k.startswith("known/")))
  return data


def imported_train_split(config) -> tuple[Any, dict[str, np.ndarray]]:
  """(source, {'captions'}) of an imported corpus (`config.train_data`, a folder written by
  `data.imports`) used as the training split; the world still provides the eval splits."""
  from siglip_fair.data import imports
  size = imports.image_size(config.train_data) if os.path.isdir(
      os.path.expanduser(config.train_data)) else None
  source = imports.data_source(config.train_data)
  if size != config.world.image_size:
    raise ValueError(f"train_data {config.train_data!r} holds {size}x{size} images but the "
                     f"model is set up for world.image_size={config.world.image_size}; import "
                     "at that size or change the resolution.")
  return source, {"captions": imports.read_captions(config.train_data)}


def read_fields(source, fields) -> dict[str, np.ndarray]:
  """Stacks `fields` of every record of a source."""
  if isinstance(source, pipeline.InMemorySource):
    return {f: source.arrays[f] for f in fields}
  return pipeline.InMemorySource(source, fields).arrays


def annotations(config, data: Data) -> dict[str, np.ndarray]:
  """Annotations (s, known, y, w, u) of the training split under `config.annotate`."""
  if "kind" not in data.train_fields and (
      config.annotate.source == "ground_truth" or (
          config.annotate.source in ("combined", "image") and config.annotate.image != "zeroshot")):
    raise ValueError(
        f"annotate.source={config.annotate.source!r} needs the synthetic world's ground truth, "
        "which an imported corpus (train_data) does not have; use annotate.source='text', or "
        "'combined' / 'image' with annotate.image='zeroshot'.")
  return annotate.annotate_split(data.train_fields, config.annotate, image_annotations(config, data))


def image_annotations(config, data: Data) -> dict[str, np.ndarray] | None:
  """Image-side annotations of the training split: zero-shot inference with the two-tower
  checkpoint in `annotate.zeroshot.checkpoint` (a run's workdir or a released .npz / Hugging Face
  folder) when `annotate.image == 'zeroshot'`; None (the world's ground truth) otherwise.
  Recomputed on each call: one pass over the images."""
  cfg = config.annotate
  if cfg.image not in annotate.IMAGE_SIDES:
    raise ValueError(f"annotate.image={cfg.image!r}; expected one of {annotate.IMAGE_SIDES}.")
  if cfg.image != "zeroshot" or cfg.source not in ("combined", "image"):
    return None
  from siglip_fair.annotate import zeroshot
  # A run's workdir, or a released checkpoint with its own tokenizer and preprocessing.
  annotator, params = zeroshot.load_annotator(cfg.zeroshot, config.model, data.tokenizer)
  return annotator.annotate(params, data.sources["train"])


def annotation_report(config, data: Data) -> dict[str, float]:
  """Precision / recall of the text lexicons (and of zero-shot image annotations, when used)
  against the world's ground truth."""
  arrays = data.train_fields
  if "kind" not in arrays:  # an imported corpus: no ground truth to compare with
    ann = annotate.annotate_split(arrays, _text_only(config.annotate))
    return {"known/text": float(ann["known"].mean())}
  text_cfg = config.annotate.copy_and_resolve_references()
  text_cfg.source = "text"
  pred = annotate.annotate_split(arrays, text_cfg)
  truth = annotate.from_ground_truth(arrays)
  names = dict(s=world.GROUPS, y=world.OCCUPATIONS, w=world.PROXIES)
  report = annotate.precision_recall(pred, truth, names)
  image = image_annotations(config, data)
  if image is not None:
    from siglip_fair.annotate import zeroshot
    report.update({f"zeroshot/{k}": v for k, v in zeroshot.agreement(image, truth, names).items()})
  return report


def _text_only(cfg):
  cfg = cfg.copy_and_resolve_references()
  cfg.source = "text"
  return cfg


def names() -> dict:
  return dict(groups=list(world.GROUPS), labels=list(world.OCCUPATIONS),
              proxies=list(world.PROXIES))


def train_data_identity(config) -> dict:
  """What identifies the training split's content: the world's knob hash (its TFDS builder
  config) or an imported corpus's own fingerprint. Stage fingerprints build on it."""
  if config.get("train_data"):
    from siglip_fair import fingerprint
    folder = os.path.abspath(os.path.expanduser(config.train_data))
    # data/imports.py records what an import was made from beside it.
    stored = fingerprint.read(folder, "import_fingerprint.json")
    return {"import": folder, "content": (fingerprint.digest(stored) if stored
                                          else fingerprint.file_identity(folder))}
  return {"world": builder.builder_config(config.world).name, "builder": builder._VERSION}  # pylint: disable=protected-access


def balance(config, workdir: str, data: Data | None = None, *,
            strict: bool = False) -> dict[str, Any]:
  """Annotates the training split (or reads `annotations_dir`, a folder of annotation shards in
  training-split order) and runs M4, into the balance directory: annotations.npz, card.json,
  card.md, card.png, m4.npz (q, keep, repeats when `balance.repeats`) and fingerprint.json.

  Content-addressed (`balance/stage.py`): outputs made from exactly these inputs are reused;
  any other outputs there are recomputed and replaced, with one line saying what changed.
  `strict`: an infeasible card is an error that writes nothing, unless
  `balance.allow_infeasible` (the command line's behaviour).

  Under `jax.distributed` call it on every process with the same arguments: M4 streams
  `annotations_dir`, process p reading shards p, p + P, ... (without it every process annotates
  the training split in memory and streams the p-th of P contiguous blocks of rows); process 0
  decides whether to reuse, prints, and writes the same files as a one-process run (the others write
  only their rows' part files, merged and removed by process 0). Every process returns the same
  loaded result, read back after process 0 wrote it (full q / keep on each host).
  """
  from siglip_fair.balance import stage
  lead = jax.process_index() == 0
  out = balance_dir(config, workdir)
  want = stage.wanted(config, train_data_identity(config))
  reusable, diffs = stage.status(out, want) if lead else (False, [])
  reusable = stage.agree(reusable)  # process 0's view, so all processes do the same
  if reusable:
    if lead:
      print(f"balance: reusing {out} (made from the same data and config)")
    return load_balance(out)
  if diffs:
    print(f"balance: {out} was made from other inputs ({'; '.join(diffs)}); recomputing")
  from siglip_fair.train.loop import sigterm_raises
  # Nothing to save part-way: SIGTERM stops at once; the staging folder is removed and the
  # balance directory keeps whatever complete outputs it had.
  with sigterm_raises("balance: SIGTERM; stopped (every file is written whole or not at all), "
                      "rerun the same command to balance again"):
    data = data or prepare_data_in_turn(config, workdir)
    stage.staged(out, want, lambda folder: _run_m4(config, data, folder, strict))
  loaded = load_balance(out)
  if lead:
    print(f"balance: kept {loaded['keep'].mean():.3f} of {loaded['keep'].size} examples "
          f"(verdict: {loaded['card']['verdict']}); card in {out}")
  return loaded


def prepare_data_in_turn(config, workdir: str) -> Data:
  """`prepare_data` for a multi-process job, called on every process: process 0 first, since
  it may build the world and train the tokenizer into the shared data_dir, which the others
  then reuse instead of racing to build the same files. One process: `prepare_data`."""
  if jax.process_count() == 1:
    return prepare_data(config, workdir)
  from jax.experimental import multihost_utils
  data = prepare_data(config, workdir) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("siglip_fair: data prepared")
  return data or prepare_data(config, workdir)


def _run_m4(config, data: Data, out: str, strict: bool):
  """M4 into `out`. With several processes every process runs it on its shards; process 0
  writes the files, with every process's rows gathered by `stage.gather_rows`."""
  from siglip_fair import balance as m4
  from siglip_fair.balance import stage
  from siglip_fair.balance.shards import ArrayShard
  from siglip_fair.report import plots
  source = config.get("annotations_dir") or ""
  if source:  # streamed from the shards, never loaded whole
    ann, shards = None, m4.as_shards(source)
    total = sum(len(s) for s in shards)
    if total != len(data.sources["train"]):
      raise ValueError(f"annotations_dir={source!r} holds {total} rows but the training split "
                       f"has {len(data.sources['train'])}; shards must cover it in order.")
  else:
    ann = shards = annotations(config, data)
    total = len(ann["s"])
    if jax.process_count() > 1:  # process p streams block p (`balance_stream` reads shard p)
      bounds = np.linspace(0, total, jax.process_count() + 1).round().astype(int)
      shards = [ArrayShard({k: v[a:b] for k, v in ann.items()})
                for a, b in zip(bounds[:-1], bounds[1:])]
  result = m4.balance_stream(shards, config.balance, jax.random.key(config.balance.seed),
                             names=names(), progress=config.get("progress", False))
  # The card is global, so every process raises here alike, before any part file is written.
  if strict and result.card["verdict"] != "feasible" and not config.balance.get(
      "allow_infeasible", False):
    raise infeasible_error(result.card, config)
  arrays = dict(q=result.q, keep=result.keep)
  if result.repeats is not None:
    arrays["repeats"] = result.repeats
  if result.rows is not None:  # this process's rows only
    arrays = stage.gather_rows(out, arrays, result.rows, total)
    if arrays is None:  # not process 0: its rows are in process 0's hands
      return result
  if ann is not None:
    annotate.save_annotations(os.path.join(out, "annotations.npz"), ann)
  atomic_write(os.path.join(out, "card.json"), json.dumps(result.card, indent=1))
  atomic_write(os.path.join(out, "card.md"), m4.card_markdown(result.card))
  plots.plot_data_card(result.card, os.path.join(out, "card.png"))
  atomic_savez(os.path.join(out, "m4.npz"), **arrays)
  return result


def infeasible_error(card: dict, config) -> ValueError:
  binding = card["binding"]
  shown = ", ".join(binding[:5]) + (f" and {len(binding) - 5} more" if len(binding) > 5 else "")
  worst = card["largest_violation"]
  return ValueError(
      f"M4 cannot meet the balance targets (verdict: infeasible): binding {shown}; largest "
      f"violation {worst['name']} (|moment| {abs(worst['moment']):.4f} > eps "
      f"{worst['eps']:.4f}). Nothing was written. Loosen balance.eps_rep / balance.eps_assoc "
      f"(or balance.tolerance='relative'), lower the budget balance.eta={config.balance.eta}, "
      "or pass --config.balance.allow_infeasible=true to write the outputs with this verdict.")


def load_balance(out: str) -> dict[str, Any]:
  with np.load(os.path.join(out, "m4.npz"), allow_pickle=False) as f:
    result = {k: f[k] for k in f.files}
  with open(os.path.join(out, "card.json")) as f:
    result["card"] = json.load(f)
  ann_path = os.path.join(out, "annotations.npz")  # absent when balanced from annotations_dir
  result["annotations"] = (annotate.load_annotations(ann_path) if os.path.exists(ann_path)
                           else None)
  return result


def train_iterator(config, data: Data, keep: np.ndarray | None):
  ds = pipeline.train_dataset(
      data.sources["train"], tokenizer=data.tokenizer, global_batch_size=config.batch_size,
      seed=config.seed, keep=keep, process_index=jax.process_index(),
      process_count=jax.process_count(),
      read_options=pipeline.grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
  return iter(ds)


def eval_sources(config, data: Data) -> dict[str, Any]:
  """The synthetic eval splits plus every real dataset of `config.eval_data`:
  {split name: dict(dataset=DATASETS key, split=TFDS split, data_dir='', image_size=0)}, with
  image_size 0 meaning the training resolution. Evaluators name these splits in `split`."""
  from siglip_fair.data import datasets
  sources = {s: data.sources[s] for s in EVAL_SPLITS}
  for name, spec in dict(config.get("eval_data") or {}).items():
    if name in sources:
      raise ValueError(f"config.eval_data.{name}: the name is taken by a built-in eval split; "
                       "choose another.")
    unknown = set(spec) - {"dataset", "split", "data_dir", "image_size"}
    if unknown or "dataset" not in spec or "split" not in spec:
      raise ValueError(f"config.eval_data.{name} needs dataset and split (optional data_dir, "
                       f"image_size); got {sorted(spec)}.")
    sources[name] = datasets.load_source(
        spec["dataset"], spec["split"], data_dir=spec.get("data_dir") or None,
        image_size=spec.get("image_size") or config.world.image_size)
  return sources


def make_evaluators(config, data: Data, model, *, bootstrap: bool):
  from siglip_fair.evaluate import evaluators as ev
  from siglip_fair.models.two_tower import embed_fns, temperature
  from siglip_fair.train.sharding import make_mesh
  embed_images, embed_texts = embed_fns(model, make_mesh(config.get("mesh")))
  context = ev.EvalContext(embed_images=embed_images, embed_texts=embed_texts,
                           temperature=temperature,
                           tokenizer=data.tokenizer,
                           sources=eval_sources(config, data),
                           batch_size=config.eval_batch_size)
  evals = config.evals.copy_and_resolve_references()
  for sub in evals.values():
    if sub.get("classes") == WORLD_CLASSES:  # the world's own object classes (its knobs say)
      del sub["classes"]
      sub.classes = list(world.object_class_names(config.world))
  if not bootstrap:
    for sub in evals.values():
      if "bootstrap" in sub:
        sub.bootstrap.num_samples = 0
  return ev.build_evaluators(evals, context)


def version_config(config, workdir: str, version: str):
  """The config that builds data `version`: 'balanced_proxies' adds the proxy constraints to
  `config.balance` and keeps its M4 outputs in '<balance_dir>_proxies'."""
  if version != "balanced_proxies":
    return config
  config = config.copy_and_resolve_references()
  config.balance.use_proxies = True
  config.balance_dir = balance_dir(config, workdir).rstrip(os.sep) + "_proxies"
  return config


def version_keep(config, workdir: str, data: Data, version: str) -> np.ndarray | None:
  """Keep mask (or repeat counts with `balance.repeats`) of data `version`; None = all."""
  return version_data(config, workdir, data, version)[0]


def version_data(config, workdir: str, data: Data,
                 version: str) -> tuple[np.ndarray | None, str | None]:
  """(keep mask or repeat counts, fingerprint digest of the balance outputs) of `version`;
  (None, None) for the baseline."""
  if version == "baseline":
    return None, None
  from siglip_fair import fingerprint
  config = version_config(config, workdir, version)
  result = balance(config, workdir, data)
  out = balance_dir(config, workdir)
  keep = result["repeats"] if config.balance.get("repeats", False) else result["keep"]
  # Repeat counts (E[r] = q / η) give a balanced set the size of the baseline's. `balance`
  # recomputed the outputs unless their fingerprint matched this data and config exactly.
  return keep, fingerprint.digest(fingerprint.read(out))


def train_and_evaluate(config, workdir: str, *, data: Data | None = None,
                       stop_after: int | None = None) -> dict[str, float]:
  """Trains one model on `config.data_version` data (one version or a schedule, see
  `data/versions.py`) and evaluates it; returns final metrics.

  Writes to `workdir`: fingerprint.json and config.json (the run's record, once, see
  `run_record.py`), checkpoints/, metrics.jsonl (training curves with RB/AB over training) and
  eval.json (final metrics with bootstrap intervals). A finished run returns its eval.json.
  """
  from siglip_fair import run_record
  from siglip_fair.evaluate import evaluators as ev
  from siglip_fair.models.two_tower import make_model
  from siglip_fair.train import loop
  os.makedirs(workdir, exist_ok=True)
  data = data or prepare_data_in_turn(config, workdir)
  num_examples = len(data.sources["train"])
  # Durations in epochs count baseline-sized epochs for every version: runs on balanced data
  # see as many examples as the baseline run (the smaller set is repeated more often).
  steps = resolve_steps(config, num_examples)
  schedule = versions.schedule_steps(config.data_version, batch_size=config.batch_size,
                                     total_steps=steps.total_steps, num_examples=num_examples)
  iterators, masks = {}, {}
  for version in dict(schedule):
    keep, masks[version] = version_data(config, workdir, data, version)
    iterators[version] = train_iterator(config, data, keep)
  train_iter = (iterators[schedule[0][0]] if len(schedule) == 1
                else versions.ScheduledIterator(iterators, schedule))
  model = make_model(config.model)
  curve_evals = make_evaluators(config, data, model, bootstrap=False)
  want = run_record.wanted(config, train_data_identity(config), masks)
  lead = jax.process_index() == 0
  state = loop.train(
      config, workdir, train_iter=train_iter,
      evaluate_fn=lambda params, step: ev.run_all(curve_evals, params),
      num_examples=num_examples, stop_after=stop_after,
      on_start=lambda start, total: run_record.start(workdir, config, want, start, lead=lead))
  step = int(jax.device_get(state.step))
  done = os.path.join(workdir, "eval.json")
  if step == steps.total_steps and os.path.exists(done):
    with open(done, encoding="utf-8") as f:  # finished earlier: its record stands
      return json.load(f)
  final = ev.run_all(make_evaluators(config, data, model, bootstrap=True),
                     loop.eval_params(state))
  final["step"] = step
  if lead:
    # eval.json marks the run finished (launchers skip it), so it is written last.
    atomic_write(os.path.join(workdir, "eval_rows.json"),
                 json.dumps(ev.as_rows(final), indent=1))
    atomic_write(done, json.dumps(final, indent=1))
  return final
