"""Greedy MMR diversification with provenance caps and near-duplicate removal."""

import numpy as np
import pytest

from medseek.search.diversify import (DEFAULT_CAPS, DUP_CEILING, Skip, calibrate_dup_threshold,
                                      diversify, pairwise_cosine_quantile)

# four 2-D unit vectors: 1 is close to 0, 3 lies between 0 and 2
EMBS = np.array([[1.0, 0.0], [0.96, 0.28], [0.0, 1.0], [0.6, 0.8]])
REL = np.array([0.9, 0.85, 0.6, 0.7])


def test_lam_changes_the_order():
    assert diversify(REL, EMBS, k=4, lam=1.0).selected.tolist() != diversify(
        REL, EMBS, k=4, lam=0.5).selected.tolist()


def test_mmr_by_hand():
    # step 1: 0.5*rel -> 0 (0.45).  max cos to {0}: [., .96, 0, .6]
    # step 2: 1: .425-.48=-.055, 2: .3-0=.3, 3: .35-.3=.05 -> 2.  max cos: [., .96, ., .8]
    # step 3: 1: -.055, 3: .35-.4=-.05 -> 3.  step 4: 1 (max cos .96): -.055
    d = diversify(REL, EMBS, k=4, lam=0.5)
    assert d.selected.tolist() == [0, 2, 3, 1]
    np.testing.assert_allclose(d.mmr, [0.45, 0.3, -0.05, -0.055], rtol=0, atol=1e-12)
    assert d.skipped == {} and not d.relaxed.any()
    assert diversify(REL, EMBS, k=2, lam=0.5).selected.tolist() == [0, 2]


def test_lam_one_without_caps_is_plain_top_k():
    rng = np.random.default_rng(3)
    scores = np.round(rng.uniform(0, 1, 50), 1)  # many ties: checks the tie-break too
    embs = rng.standard_normal((50, 8))
    embs /= np.linalg.norm(embs, axis=1, keepdims=True)
    d = diversify(scores, embs, k=12, lam=1.0)
    assert d.selected.tolist() == np.argsort(-scores, kind="stable")[:12].tolist()


def test_near_duplicates_are_dropped():
    embs = np.vstack([EMBS, [[0.9999, 0.01414]]])  # cos 0.99996 to candidate 0
    embs /= np.linalg.norm(embs, axis=1, keepdims=True)
    rel = np.append(REL, 0.89)
    assert diversify(rel, embs, k=5, lam=1.0).selected.tolist() == [0, 4, 1, 3, 2]
    d = diversify(rel, embs, k=5, lam=1.0, dup_threshold=0.999)
    assert d.selected.tolist() == [0, 1, 3, 2]  # fewer than k: 4 was the only other
    assert d.skipped == {4: Skip("near_duplicate", 0)}


def provenance_case():
    patient = ["A", "A", "B", "B", "C", None, None, "D"]
    study = ["a1", "a2", "b1", "b1", "c1", "x1", "x1", "d1"]
    document = ["r1", "r1", "r1", "r2", "r2", "r2", None, None]
    rel = np.array([0.9, 0.89, 0.88, 0.87, 0.86, 0.85, 0.84, 0.83])
    embs = np.eye(8)  # orthogonal: only the caps act
    return rel, embs, {"patient": patient, "study": study, "document": document}


def test_caps_hold_and_skips_name_the_cause():
    rel, embs, prov = provenance_case()
    assert diversify(rel, embs, prov, k=8, lam=1.0).selected.tolist() == list(range(8))
    d = diversify(rel, embs, prov, k=8, lam=1.0, caps=DEFAULT_CAPS)
    # 0 (A, r1); 1 capped by patient A; 2 (B, r1: r1 now full); 3 capped by patient B;
    # 4 (C, r2); 5 (no patient, r2: r2 full); 6 capped by study x1; 7 (D, no document)
    assert d.selected.tolist() == [0, 2, 4, 5, 7]
    assert d.skipped == {1: Skip("cap:patient", 0), 3: Skip("cap:patient", 2),
                         6: Skip("cap:study", 5)}
    for key, cap in DEFAULT_CAPS.items():
        values = [prov[key][i] for i in d.selected if prov[key][i] is not None]
        assert max(values.count(v) for v in values) <= cap


def test_relax_caps_fills_the_remaining_slots():
    rel, embs, prov = provenance_case()
    d = diversify(rel, embs, prov, k=7, lam=1.0, caps=DEFAULT_CAPS, relax_caps=True)
    assert d.selected.tolist() == [0, 2, 4, 5, 7, 1, 3]
    assert d.relaxed.tolist() == [False] * 5 + [True, True]
    assert d.skipped == {6: Skip("cap:study", 5)}


def test_relaxed_picks_are_still_not_near_duplicates():
    rel, embs, prov = provenance_case()
    embs = embs.copy()
    embs[1] = embs[7]  # candidate 1 (capped by patient A) duplicates the later pick 7
    d = diversify(rel, embs, prov, k=8, lam=1.0, caps=DEFAULT_CAPS, dup_threshold=0.99,
                  relax_caps=True)
    assert 1 not in d.selected.tolist()
    assert d.skipped[1] == Skip("near_duplicate", 7)


def test_random_candidates_never_exceed_caps():
    rng = np.random.default_rng(11)
    n = 120
    rel = rng.uniform(0.2, 0.9, n)
    embs = rng.standard_normal((n, 16))
    embs /= np.linalg.norm(embs, axis=1, keepdims=True)
    prov = {"patient": [f"p{v}" for v in rng.integers(0, 12, n)],
            "study": [f"s{v}" for v in rng.integers(0, 30, n)],
            "document": [f"d{v}" for v in rng.integers(0, 5, n)]}
    d = diversify(rel, embs, prov, k=10, lam=0.7, caps=DEFAULT_CAPS, dup_threshold=0.6)
    assert d.selected.size == 10
    for key, cap in DEFAULT_CAPS.items():
        _, counts = np.unique([prov[key][i] for i in d.selected], return_counts=True)
        assert counts.max() <= cap
    sel = embs[d.selected]
    off_diag = (sel @ sel.T)[~np.eye(10, dtype=bool)]
    assert off_diag.max() < 0.6


def test_no_candidates():
    d = diversify(np.zeros(0), np.zeros((0, 2)), {"patient": []}, k=3, caps=DEFAULT_CAPS | {
        "study": None, "document": None})
    assert d.selected.size == 0 and d.skipped == {}


def test_errors_name_the_argument():
    rel, embs, prov = provenance_case()
    with pytest.raises(ValueError, match="caps names 'site'"):
        diversify(rel, embs, prov, caps={"site": 1})
    with pytest.raises(ValueError, match=r"provenance\['patient'\] must have 8 entries"):
        diversify(rel, embs, {"patient": ["A"]}, caps={"patient": 1})
    with pytest.raises(ValueError, match="lam must be in"):
        diversify(rel, embs, lam=-0.1)
    with pytest.raises(ValueError, match=r"caps\['patient'\] must be >= 1, got 0"):
        diversify(rel, embs, prov, caps={"patient": 0})
    with pytest.raises(ValueError, match="embs must have 8 rows"):
        diversify(rel, embs[:3])
    with pytest.raises(ValueError, match="dup_threshold must be in"):
        diversify(rel, embs, dup_threshold=1.5)
    with pytest.raises(ValueError, match="scores must be finite"):
        diversify(np.full(8, np.nan), embs)


def test_pairwise_cosine_quantile_is_over_distinct_pairs():
    rng = np.random.default_rng(8)
    e = rng.standard_normal((40, 6))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    pairs = [float(e[i] @ e[j]) for i in range(40) for j in range(i + 1, 40)]  # no self-pairs
    for q in (0.5, 0.9, 0.999):
        assert pairwise_cosine_quantile(e, q) == pytest.approx(np.quantile(pairs, q), abs=1e-12)
    assert pairwise_cosine_quantile(e[:1], 0.999) is None  # one vector: no pair
    with pytest.raises(ValueError, match="sample"):
        pairwise_cosine_quantile(2 * e, 0.999)
    with pytest.raises(ValueError, match="quantile"):
        pairwise_cosine_quantile(e, 1.5)


@pytest.mark.parametrize("floor, q, want", [
    (0.98, 0.5, 0.98),          # a spread collection: the configured threshold applies
    (0.98, 0.9985, 0.9985),     # a packed one: its 99.9th percentile pair
    (0.98, 1.0, DUP_CEILING),   # never above the ceiling: exact duplicates still go
    (0.99995, 1.0, 0.99995),    # the configured floor is kept even above the ceiling
    (0.98, None, 0.98),         # no estimate
])
def test_calibrated_threshold_is_floor_or_rare_pair(floor, q, want):
    assert calibrate_dup_threshold(floor, q) == pytest.approx(want, abs=1e-15)


def test_calibrated_threshold_keeps_k_in_a_packed_set_and_drops_exact_copies():
    # a narrow cone: every pair above 0.98, so the absolute threshold leaves one pick
    rng = np.random.default_rng(9)
    centre = rng.standard_normal(16)
    e = centre / np.linalg.norm(centre) + 0.02 * rng.standard_normal((60, 16))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    e[5] = e[0]  # an exact copy of the best candidate
    rel = e @ e[0]
    assert diversify(rel, e, k=10, dup_threshold=0.98).selected.size < 3
    t = calibrate_dup_threshold(0.98, pairwise_cosine_quantile(e, 0.999))
    assert 0.98 < t <= DUP_CEILING
    d = diversify(rel, e, k=10, dup_threshold=t)
    assert d.selected.size == 10 and 5 not in d.selected.tolist()
    assert d.skipped[5] == Skip("near_duplicate", 0)
