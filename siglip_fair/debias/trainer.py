"""Trains one target classifier with one method of the CLIP-debias harness (SPEC §6.3).

Every method shares the network, optimizer, step budget, batch size, seed and the model
selection rule; they differ only in which examples a batch holds (`sampling`) or, for GroupDRO,
in how the batch loss weights the groups. One jitted step per method (compiled once): the
batch has a fixed shape and the group weights are an input.

Model selection never reads sensitive labels unless the config says so: by default the
checkpoint with the best worst *pseudo*-group validation accuracy is kept.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from siglip_fair.config import durations
from siglip_fair.debias import nets, sampling
from siglip_fair.evaluate.fairness import group_accuracies

METHODS = ("erm", "cluster_uniform", "clip_debias", "group_dro", "jtt", "oracle_balanced",
           "oracle_group_dro")
# Methods whose groups are the true (label, sensitive) pairs instead of the pseudo groups.
ORACLE = ("oracle_balanced", "oracle_group_dro")
SELECTIONS = ("worst_pseudo_group", "accuracy", "last", "worst_true_group")


@dataclasses.dataclass
class Split:
  """One split of a target task. groups: pseudo groups (label x cluster) [n]; true_groups:
  (label x sensitive) [n] or None when the task has no sensitive labels."""
  images: np.ndarray  # uint8 [n, H, W, 3]
  labels: np.ndarray  # int64 [n]
  groups: np.ndarray  # int64 [n] in [0, num_groups)
  true_groups: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass
class Result:
  variables: dict
  selected_step: int
  history: list[dict]
  seconds: float


def _to_float(images):
  return images.astype(jnp.float32) / 127.5 - 1.0


def _optimizer_key(cfg) -> tuple:
  return (cfg.optimizer, float(cfg.learning_rate), float(cfg.weight_decay), float(cfg.momentum))


@functools.lru_cache(maxsize=None)
def _optimizer(name: str, learning_rate: float, weight_decay: float,
               momentum: float) -> optax.GradientTransformation:
  if name == "adam":
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=momentum))
  raise ValueError(f"target.optimizer={name!r}; use 'adam' or 'sgd'.")


def make_optimizer(cfg) -> optax.GradientTransformation:
  """One optax transformation per distinct setting, so the jitted steps built on it are reused
  by every method and seed (`_cached_step`)."""
  return _optimizer(*_optimizer_key(cfg))


def _per_example_loss(net, variables, images, labels, train):
  logits, stats = nets.apply(net, variables, _to_float(images), train=train)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return losses, stats


def make_train_step(net, tx, num_groups: int, dro_step_size: float | None) -> Callable:
  """(variables, opt_state, q, images, labels, groups) -> (variables, opt_state, q, loss).

  Without `dro_step_size` the loss is the batch mean and q passes through. With it, GroupDRO
  (Sagawa et al. 2020): q_g <- q_g exp(η L_g) from this batch's group losses L_g (0 for a
  group absent from the batch), renormalised, and the loss is sum_g q_g L_g.
  """

  def step(variables, opt_state, q, images, labels, groups):
    def loss_fn(params):
      losses, stats = _per_example_loss(net, {**variables, "params": params}, images, labels,
                                        True)
      if dro_step_size is None:
        return losses.mean(), (stats, q)
      one_hot = jax.nn.one_hot(groups, num_groups, dtype=losses.dtype)
      counts = one_hot.sum(0)
      group_loss = (one_hot * losses[:, None]).sum(0) / jnp.maximum(counts, 1.0)
      new_q = q * jnp.exp(dro_step_size * jax.lax.stop_gradient(group_loss))
      new_q = new_q / new_q.sum()
      return (new_q * group_loss).sum(), (stats, new_q)

    (loss, (stats, new_q)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    new_vars = {**variables, "params": optax.apply_updates(variables["params"], updates)}
    if stats is not None:
      new_vars["batch_stats"] = stats
    return new_vars, opt_state, new_q, loss

  return jax.jit(step, donate_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=(0,))
def _eval_batch(net, variables, images, labels):
  losses, _ = _per_example_loss(net, variables, images, labels, False)
  logits, _ = nets.apply(net, variables, _to_float(images), train=False)
  return losses, jnp.argmax(logits, -1)


def evaluate(net, variables, images: np.ndarray, labels: np.ndarray,
             batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(losses float32 [n], predictions int64 [n]) in fixed-shape batches (the last is padded)."""
  n = len(labels)
  losses, preds = [], []
  for lo in range(0, n, batch_size):
    idx = np.arange(lo, lo + batch_size) % n
    l, p = jax.device_get(_eval_batch(net, variables, images[idx], labels[idx]))
    take = min(batch_size, n - lo)
    losses.append(l[:take])
    preds.append(p[:take])
  return np.concatenate(losses), np.concatenate(preds).astype(np.int64)


def _worst(correct, groups) -> float:
  if groups is None:
    return float("nan")
  return float(group_accuracies(correct, groups, int(groups.max()) + 1)[1])


def _score(record: dict, selection: str) -> float:
  key = {"worst_pseudo_group": "val_worst_pseudo", "accuracy": "val_accuracy",
         "worst_true_group": "val_worst_true", "last": "step"}[selection]
  return record[key]


@functools.lru_cache(maxsize=64)
def _cached_step(net, tx, num_groups: int, dro_step_size: float | None) -> Callable:
  # Every (method, seed) of a comparison shares the network and optimizer: compile once.
  return make_train_step(net, tx, num_groups, dro_step_size)


def _init(net, tx, key, image_shape):
  variables = nets.init_variables(net, key, image_shape)
  return variables, tx.init(variables["params"])


def _sampling_groups(method: str, train: Split) -> tuple[np.ndarray, int]:
  groups = train.true_groups if method in ORACLE else train.groups
  if groups is None:
    raise ValueError(f"method {method!r} needs the task's sensitive labels (true groups), "
                     "which this task does not have; drop it from debias.methods.")
  return groups, int(groups.max()) + 1


def train_target(cfg, method: str, train: Split, val: Split, seed: int, *,
                 num_classes: int, log: Callable[[str], None] | None = None) -> Result:
  """Trains the target model with `method` for cfg.steps steps; returns the selected weights.

  Args:
    cfg: the `target` config (see configs/debias.py): net, optimizer, batch_size, steps,
      eval_every, selection and the method knobs tau, refresh_every, probe_per_group,
      dro_step_size, jtt_first_steps, jtt_upweight.
    method: one of METHODS.
    train, val: the splits; val's groups drive model selection.
    seed: initialisation and batch order.
  """
  if method not in METHODS:
    raise ValueError(f"unknown debias method {method!r}; expected one of {METHODS}.")
  if cfg.selection not in SELECTIONS:
    raise ValueError(f"target.selection={cfg.selection!r}; expected one of {SELECTIONS}.")
  start = time.perf_counter()
  net = nets.make_net(cfg.net, num_classes, **dict(cfg.net_kwargs))
  tx = make_optimizer(cfg)
  groups, num_groups = _sampling_groups(method, train)
  seeds = np.random.SeedSequence([seed, METHODS.index(method)])
  init_key, stage1_key = jax.random.split(jax.random.key(seed))
  image_shape = train.images.shape[1:]
  bs = int(cfg.batch_size)

  probs = np.full(len(train), 1.0 / len(train))
  if method in ("cluster_uniform", "oracle_balanced"):
    probs = sampling.example_probabilities(
        groups, sampling.loss_aware_probabilities(
            np.where(sampling.group_counts(groups, num_groups) > 0, 0.0, np.nan), np.inf))
  elif method == "jtt":
    first = _run(cfg, net, tx, "erm", train, val, stage1_key, np.random.SeedSequence(
        [seed, 99]), probs, groups, num_groups, int(cfg.jtt_first_steps), select=False)
    _, preds = evaluate(net, first.variables, train.images, train.labels, bs)
    probs = sampling.jtt_probabilities(preds != train.labels, cfg.jtt_upweight)
  result = _run(cfg, net, tx, method, train, val, init_key, seeds, probs, groups, num_groups,
                int(cfg.steps), select=True, log=log)
  result.seconds = time.perf_counter() - start
  return result


def _probe(groups, num_groups, per_group, rng) -> np.ndarray:
  """A fixed subset of the training set, up to per_group examples of each group, on which the
  group losses are measured (the whole set when per_group <= 0)."""
  if per_group <= 0:
    return np.arange(len(groups))
  idx = [rng.permutation(np.flatnonzero(groups == k))[:per_group] for k in range(num_groups)]
  return np.sort(np.concatenate(idx))


def _run(cfg, net, tx, method, train, val, key, seeds, probs, groups, num_groups, steps, *,
         select, log=None) -> Result:
  bs = int(cfg.batch_size)
  variables, opt_state = _init(net, tx, key, train.images.shape[1:])
  dro = method in ("group_dro", "oracle_group_dro")
  step_fn = _cached_step(net, tx, num_groups, float(cfg.dro_step_size) if dro else None)
  sample_seed, probe_seed = seeds.spawn(2)
  sampler = sampling.Sampler(probs, sample_seed)
  probe = (_probe(groups, num_groups, int(cfg.probe_per_group), np.random.default_rng(probe_seed))
           if method == "clip_debias" else None)
  q = jnp.full((num_groups,), 1.0 / num_groups, jnp.float32)
  history, best, best_score, best_step = [], None, -np.inf, 0
  every = max(durations.to_steps(cfg.eval_every, batch_size=bs, total_steps=steps,
                                 num_examples=len(train), name="target.eval_every"), 1)
  for step in range(steps):
    if probe is not None and step % int(cfg.refresh_every) == 0:
      losses, _ = evaluate(net, variables, train.images[probe], train.labels[probe], bs)
      group_loss = sampling.group_mean_losses(losses, groups[probe], num_groups)
      sampler.set_probabilities(sampling.example_probabilities(
          groups, sampling.loss_aware_probabilities(group_loss, float(cfg.tau))))
    idx = sampler.draw(bs)
    variables, opt_state, q, loss = step_fn(variables, opt_state, q, train.images[idx],
                                            train.labels[idx], groups[idx])
    done = step + 1
    if select and (done % every == 0 or done == steps):
      _, preds = evaluate(net, variables, val.images, val.labels, bs)
      correct = preds == val.labels
      record = {"step": done, "loss": float(loss), "val_accuracy": float(correct.mean()),
                "val_worst_pseudo": _worst(correct, val.groups),
                "val_worst_true": _worst(correct, val.true_groups)}
      history.append(record)
      score = _score(record, cfg.selection)
      if score > best_score:
        best_score, best_step = score, done
        best = jax.device_get(variables)
      if log:
        log(f"  {method} step {done}/{steps} loss {record['loss']:.3f} "
            f"val acc {record['val_accuracy']:.3f} worst pseudo {record['val_worst_pseudo']:.3f}")
  if best is None:
    best, best_step = jax.device_get(variables), steps
  return Result(variables=best, selected_step=best_step, history=history, seconds=0.0)
