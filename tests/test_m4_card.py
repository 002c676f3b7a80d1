"""The M4 data card against brute-force counting."""
import json

import numpy as np
import pytest

from siglip_fair.balance import card as cardlib
from siglip_fair.balance import m4, qp


def _setup(seed=0, n=500, m=2, c=3, p=2):
  rng = np.random.default_rng(seed)
  ann, pi = qp.random_instance(seed, n, m, c, p)
  ann["known"] = (rng.random((n, m)) < 0.8).astype(np.float32)  # per-group known
  ann["s"] *= ann["known"]
  q = rng.random(n)
  keep = rng.random(n) < q
  shape = dict(rep=(m,), assoc=(m, c), proxy=(m, p))
  duals = dict(v={k: np.abs(rng.normal(size=(2,) + s_)) for k, s_ in shape.items()}, mu=0.3)
  eps = {k: np.full(s_, 0.01) for k, s_ in shape.items()}
  cfg = m4.default_config()
  cfg.use_proxies = True
  info = dict(stochastic_steps=10, refine_steps=5, curvature=2.0)
  names = dict(groups=["man", "woman"], labels=["nurse", "doctor", "chef"],
               proxies=["stethoscope", "pan"])
  card = cardlib.data_card(ann, q, keep, pi=pi, eps=eps, duals=duals, config=cfg, info=info,
                           names=names)
  return ann, pi, q, keep, duals, eps, cfg, card


def test_group_prevalence_and_kept_fractions_by_counting():
  ann, pi, q, keep, *_, card = _setup()
  for k, g in enumerate(card["groups"]):
    known = ann["known"][:, k] == 1
    member = known & (ann["s"][:, k] == 1)
    assert g["target"] == pytest.approx(pi[k])
    assert g["before"] == pytest.approx(member.sum() / known.sum())
    assert g["after"] == pytest.approx(q[member].sum() / q[known].sum())
    assert g["kept_expected"] == pytest.approx(q[member].mean())
    assert g["kept_realised"] == pytest.approx(keep[member].mean())
  assert card["kish_ess"] == pytest.approx(q.sum() ** 2 / (q ** 2).sum())
  assert card["kept"]["expected"] == pytest.approx(q.mean())
  assert card["kept"]["realised"] == pytest.approx(keep.mean())


def test_association_and_moments_by_counting():
  ann, pi, q, _, duals, eps, _, card = _setup()
  rows = {a["name"]: a for a in card["association"]}
  cons = {c["name"]: c for c in card["constraints"]}
  for k, group in enumerate(["man", "woman"]):
    known = ann["known"][:, k] == 1
    s = ann["s"][:, k] == 1
    for block, col, labels in (("assoc", "y", ["nurse", "doctor", "chef"]),
                               ("proxy", "w", ["stethoscope", "pan"])):
      for r, label in enumerate(labels):
        has = ann[col][:, r] == 1
        row = rows[f"{block}[{group}, {label}]"]
        for weight, key in ((np.ones_like(q), "before"), (q, "after")):
          cond = weight[known & has & s].sum() / weight[known & has].sum()
          assert row[key] == pytest.approx(cond - weight[known & s].sum() / weight[known].sum())
        moment = np.mean(q * (s - np.float64(pi[k])) * known * has)
        assert row["moment_after"] == pytest.approx(moment, rel=1e-6)
        con = cons[f"{block}[{group}, {label}]"]
        assert con["residual"] == pytest.approx(abs(moment) - 0.01)
        assert con["price"] == pytest.approx(duals["v"][block][0, k, r]
                                             - duals["v"][block][1, k, r])
  worst = max(card["constraints"], key=lambda c: c["residual"])
  assert card["largest_violation"]["name"] == worst["name"]
  assert card["binding"] == [c["name"] for c in sorted(card["constraints"],
                                                       key=lambda c: -c["residual"])
                             if c["residual"] > 1e-3] + ["budget"]  # E[q] ≠ η here
  assert card["verdict"] == "infeasible"


def test_card_is_strict_json_and_markdown_names_things():
  *_, card = _setup()
  json.dumps(card, allow_nan=False)
  text = cardlib.card_markdown(card)
  assert "infeasible" in text and "woman" in text and card["largest_violation"]["name"] in text


def test_undefined_association_is_none_not_nan():
  ann, pi, q, keep, duals, eps, cfg, _ = _setup()
  ann["y"][:, 0] = 0  # label 0 never occurs
  card = cardlib.data_card(ann, q, keep, pi=pi, eps=eps, duals=duals, config=cfg,
                           info=dict(stochastic_steps=1, refine_steps=0, curvature=1.0))
  row = next(a for a in card["association"] if a["name"] == "assoc[g0, y0]")
  assert row["before"] is None and row["after"] is None
  json.dumps(card, allow_nan=False)


def test_wrong_number_of_names_is_a_clear_error():
  ann, pi, q, keep, duals, eps, cfg, _ = _setup()
  with pytest.raises(ValueError, match="names\\['labels'\\]"):
    cardlib.data_card(ann, q, keep, pi=pi, eps=eps, duals=duals, config=cfg,
                      info=dict(stochastic_steps=1, refine_steps=0, curvature=1.0),
                      names=dict(labels=["a"]))


def test_kkt_residual_is_each_constraints_optimality_condition():
  cap, eps = 10.0, np.full(6, 0.01)
  lam = np.array([0.0, 0.0, 3.0, -2.0, 10.0, -10.0])
  moments = np.array([0.004, -0.03, 0.0105, -0.0097, 0.05, 0.008])
  r = cardlib.kkt_residual(lam, moments, budget_gap=2e-6, eps=eps, cap=cap, mu=0.0)
  # slack (λ = 0): excess over ε; active: |sign·m − ε|; capped: shortfall of sign·m below ε.
  np.testing.assert_allclose(r, [0.0, 0.02, 5e-4, 3e-4, 0.0, 0.018, 2e-6], atol=1e-12)
  # The budget counts beyond float32's resolution of µ only.
  assert cardlib.kkt_residual(lam, moments, 2e-6, eps, cap, mu=100.0)[-1] == 0.0


def test_binding_are_capped_violated_or_beyond_tol_with_relax_to():
  ann, pi, q, keep, duals, eps, cfg, _ = _setup()
  cfg.V = 1.5  # some of the random duals (|N(0, 1)|) exceed it: make those capped
  duals = dict(duals, v={k: np.minimum(v, 1.5) for k, v in duals["v"].items()})
  card = cardlib.data_card(ann, q, keep, pi=pi, eps=eps, duals=duals, config=cfg,
                           info=dict(stochastic_steps=1, refine_steps=0, curvature=1.0))
  want = [c["name"] for c in sorted(card["constraints"], key=lambda c: -c["residual"])
          if (c["at_cap"] and c["residual"] > 0) or c["residual"] > cfg.tol]
  assert card["binding"][:len(want)] == want and len(want) > 0
  for r in card["relax"]:
    assert r["relax_to"] == pytest.approx(abs(r["moment"])) and r["violation"] > 0
  assert {r["name"] for r in card["relax"]} == set(want)
