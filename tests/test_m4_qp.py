"""M4 against the exact QP (cvxpy + Clarabel) on random instances."""
import jax
import numpy as np
import pytest

from siglip_fair.balance import m4, qp

pytest.importorskip("cvxpy")

# (seed, n, m, c, p, overrides): overlapping groups unless disjoint; p = 0: no proxies.
CASES = [
    (0, 3000, 2, 12, 0, {}),
    (1, 3000, 3, 12, 6, dict(use_proxies=True)),
    (2, 3000, 3, 12, 6, dict(use_proxies=True, use_utility=True)),
    (3, 3000, 3, 12, 0, dict(use_utility=True, tolerance="relative", eps_assoc=0.3)),
    (4, 3000, 3, 12, 0, dict(disjoint=True)),
    (5, 20000, 3, 20, 4, dict(use_proxies=True)),
]


@pytest.mark.parametrize("seed, n, m, c, p, overrides", CASES)
def test_matches_exact_qp(seed, n, m, c, p, overrides):
  overrides = dict(overrides)
  disjoint = overrides.pop("disjoint", False)
  rng = np.random.default_rng(seed)
  ann, pi = qp.random_instance(seed, n, m, c, p, disjoint=disjoint, target_jitter=0.05,
                               utility=overrides.get("use_utility", False))
  cfg = m4.default_config()
  cfg.pi = pi.tolist()
  cfg.eps_rep = float(rng.uniform(0.01, 0.05))
  cfg.eps_assoc = float(rng.uniform(0.01, 0.05))
  cfg.update(overrides)
  ref = qp.solve_qp(ann, cfg)
  assert ref["status"] == "optimal", "test instance must be feasible"
  result = m4.balance(ann, cfg, jax.random.key(seed))
  q = result.q.astype(np.float64)

  moments = m4.constraint_moments(q, ann, ref["pi"])
  if not cfg.use_proxies:
    moments["proxy"] = moments["proxy"][:, :0]
  violation = np.max(np.abs(qp.flatten(moments)) - qp.flatten(ref["eps"]))
  assert violation <= 1e-3
  u = ann["u"] if cfg.use_utility else np.zeros(n)
  objective = qp.objective(q, u, cfg.eta)
  assert objective == pytest.approx(ref["objective"], rel=1e-2)
  # The primal is strongly convex, so q itself is unique: a much stronger check.
  assert np.sqrt(np.mean((q - ref["q"]) ** 2)) < 1e-3
  assert q.mean() == pytest.approx(cfg.eta, abs=1e-4)
  assert result.card["verdict"] == "feasible"
  # Constraints the QP leaves slack (|moment| < ε) have zero price in M4 as well.
  slack = np.abs(qp.flatten(m4.constraint_moments(ref["q"], ann, ref["pi"]) | (
      {} if cfg.use_proxies else {"proxy": np.zeros((m, 0))}))) < qp.flatten(ref["eps"]) - 1e-4
  price = np.array([c_["price"] for c_ in result.card["constraints"]])
  assert np.all(np.abs(price[slack]) < 1e-3 * max(1.0, np.abs(price).max()))


def test_soft_membership_matches_exact_qp_on_the_same_probabilities():
  # [0, 1] memberships (soft_membership=True) are constrained as expected moments: the
  # same problem the exact QP solves on the fractional values.
  ann, pi = qp.random_instance(11, 3000, 2, 6, 0, target_jitter=0.05)
  rng = np.random.default_rng(11)
  ann["s"] = np.where(ann["s"] > 0, rng.uniform(0.6, 1.0, ann["s"].shape),
                      rng.uniform(0.0, 0.3, ann["s"].shape)).astype(np.float32)
  ann["s"] *= ann["known"][:, None]
  cfg = m4.default_config()
  cfg.pi, cfg.eps_rep, cfg.eps_assoc, cfg.soft_membership = pi.tolist(), 0.01, 0.01, True
  ref = qp.solve_qp(ann, cfg)
  assert ref["status"] == "optimal"
  result = m4.balance(ann, cfg, jax.random.key(0))
  assert np.abs(result.q - ref["q"]).max() < 1e-3
  assert qp.objective(result.q, ann["u"] * 0, cfg.eta) == pytest.approx(ref["objective"],
                                                                          rel=1e-4)
  cfg.soft_membership = False
  with pytest.raises(ValueError, match="exactly 0 or 1"):
    m4.balance(ann, cfg, jax.random.key(0))


def _infeasible(seed=0, n=2000):
  """Targets 0.2 off the data's prevalence at η = 0.95 and ε = 0.005: infeasible."""
  ann, pi = qp.random_instance(seed, n, 2, 8, 0, target_jitter=0.2)
  cfg = m4.default_config()
  cfg.pi, cfg.eta, cfg.eps_rep, cfg.eps_assoc = pi.tolist(), 0.95, 0.005, 0.005
  return ann, cfg


def test_infeasible_targets_give_the_exact_binding_set_and_a_relaxation_certificate():
  ann, cfg = _infeasible()
  assert qp.solve_qp(ann, cfg)["status"] == "infeasible"
  soft = qp.solve_qp(ann, cfg, soft=True)  # what the capped duals solve
  result = m4.balance(ann, cfg, jax.random.key(0))
  card = result.card
  names = [c["name"] for c in card["constraints"]]
  violated = {names[j] for j in np.flatnonzero(soft["violation"] > 1e-5)}
  assert len(violated) >= 5 and not np.any((soft["violation"] > 1e-7)
                                           & (soft["violation"] <= 1e-5))
  assert set(card["binding"]) == violated and card["verdict"] == "infeasible"
  assert card["convergence"]["converged"] and card["convergence"]["kkt_all_rows"] < 1e-5
  # q is the exact soft optimum's, and every price (dual) is the exact one: at the cap V for
  # the binding constraints, in between for those met with equality, 0 for slack ones.
  assert np.abs(result.q - soft["q"]).max() < 1e-4
  prices = np.array([c["price"] for c in card["constraints"]])
  np.testing.assert_allclose(prices, soft["lam"], rtol=1e-3, atol=1e-2)
  for r in card["relax"]:
    j = names.index(r["name"])
    assert abs(r["price"]) == cfg.V and r["violation"] == pytest.approx(soft["violation"][j],
                                                                        abs=1e-6)
    assert r["relax_to"] == pytest.approx(r["eps"] + r["violation"], abs=1e-9)
  # The certificate: with each binding ε relaxed to its relax_to (and a hair, 1e-5, for the
  # budget M4 meets to float32) the exact hard problem is feasible; its optimum is then
  # M4's q, which the soft optimum above already checks.
  eps = qp.flatten(soft["eps"]).astype(np.float64)
  for r in card["relax"]:
    eps[names.index(r["name"])] = r["relax_to"] + 1e-5
  assert qp.solve_qp(ann, cfg, eps=eps)["status"] == "optimal"
  for r in card["relax"][:1]:  # and each relaxation is needed: less of it is infeasible
    tight = eps.copy()
    tight[names.index(r["name"])] = r["eps"] + 0.5 * r["violation"]
    assert qp.solve_qp(ann, cfg, eps=tight)["status"] != "optimal"
  # ... and the smallest total relaxation there is (the L1 minimum, an LP), up to the
  # objective's range over V.
  total, _ = qp.min_total_violation(ann, cfg)
  assert sum(r["violation"] for r in card["relax"]) == pytest.approx(total, abs=1e-4)


def test_a_budget_too_small_to_converge_is_reported():
  ann, cfg = _infeasible(n=1000)
  cfg.optim.refine_steps, cfg.optim.steps = 50, 100
  card = m4.balance(ann, cfg, jax.random.key(0)).card
  assert not card["convergence"]["converged"] and card["convergence"]["steps"] == 50
  assert card["convergence"]["kkt"] > cfg.optim.kkt_tol
