"""Contrastive evidence sets, the pairwise-margin decision with abstention, the risk-coverage
calibration, and ``Diagnose`` with hypotheses through the real gRPC server (real SQLite and
FAISS, the in-process torch encoder)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from medseek.eval.selective import aurc, calibrate_threshold, risk_coverage, selective_accuracy
from medseek.search.contrastive import (EvidenceSet, Hypothesis, check_hypotheses, decide,
                                        hypothesis_membership, hypothesis_signature,
                                        pairwise_margins, select_evidence)

FRACTURE_VS_NONE = (Hypothesis("fracture", ("fracture",)), Hypothesis("none", ()))


def _unit_at(degrees, dim: int = 6, seed: int = 0) -> np.ndarray:
    """Unit vectors at these angles in the plane of the first two axes, with a small
    orthogonal jitter so that no two coincide."""
    rng = np.random.default_rng(seed)
    t = np.radians(np.asarray(degrees, dtype=np.float64))
    v = np.zeros((t.size, dim))
    v[:, 0], v[:, 1] = np.cos(t), np.sin(t)
    v[:, 2:] = rng.normal(0, 0.01, size=(t.size, dim - 2))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# -- hypotheses -------------------------------------------------------------------------
def test_membership_supports_labels_and_the_complement():
    labels = [("fracture",), (), ("effusion",), ("fracture", "effusion"), ("normal",)]
    hyps = (Hypothesis("fracture", ("fracture",)), Hypothesis("effusion", ("effusion",)),
            Hypothesis("rest", ()))
    got = hypothesis_membership(labels, hyps)
    np.testing.assert_array_equal(got, [[1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert hypothesis_signature(hyps) == hypothesis_signature(hyps[::-1])


@pytest.mark.parametrize("hyps, words", [
    ((Hypothesis("a", ("x",)),), "at least 2"),
    ((Hypothesis("a", ("x",)), Hypothesis("a", ("y",))), "distinct"),
    ((Hypothesis("a", ()), Hypothesis("b", ())), "at most one may have no labels"),
    ((Hypothesis("a", ("x",)), Hypothesis("b", ("x",))), "'x' is claimed by both"),
    ((Hypothesis(" ", ("x",)), Hypothesis("b", ())), "name must be a non-empty str"),
])
def test_bad_hypotheses_are_refused_with_the_reason(hyps, words):
    with pytest.raises(ValueError, match="hypotheses") as err:
        check_hypotheses(hyps)
    assert words in str(err.value)


# -- evidence sets and the decision ------------------------------------------------------
def _confusable_case():
    """The query (0 deg) is a fracture. Fracture evidence sits at 15-35 deg; prototypical
    'none' cases at -60 deg; and five 'none'-labelled look-alikes sit at 2-6 deg, closer to
    the query than any fracture: the similarity-only sets answer 'none'."""
    frac = [15, 20, 25, 30, 35, 40]
    look_alike = [2, 3, 4, 5, 6]
    proto = [-55, -58, -60, -62, -65, -70]
    embs = _unit_at(frac + look_alike + proto)
    labels = [("fracture",)] * len(frac) + [()] * (len(look_alike) + len(proto))
    query = _unit_at([0], seed=1)[0]
    scores = embs @ query
    patients = [f"p{i}" for i in range(len(labels))]
    return scores, embs, labels, {"patient": patients}


def test_contrastive_sets_answer_a_confusable_case_that_similarity_gets_wrong():
    scores, embs, labels, prov = _confusable_case()
    member = hypothesis_membership(labels, FRACTURE_VS_NONE)
    names = ["fracture", "none"]
    plain = select_evidence(scores, embs, member, names, prov, m=5, beta=0.0, lam=1.0)
    wrong = decide(plain)
    assert wrong.decision == "none"
    assert set(plain[1].indices) == set(range(6, 11))  # the look-alikes
    contrast = select_evidence(scores, embs, member, names, prov, m=5, beta=1.0, lam=1.0)
    right = decide(contrast)
    assert right.decision == "fracture" and right.margin > 0.2
    # the 'none' set moved to the prototypes: they separate the hypotheses
    assert set(contrast[1].indices) <= set(range(11, 17))
    np.testing.assert_allclose(contrast[1].similarity, scores[contrast[1].indices])
    assert (contrast[1].selection < contrast[1].similarity).all()


def test_margins_are_rankwise_and_antisymmetric():
    a = EvidenceSet("a", np.array([0, 1, 2]), np.array([0.7, 0.9, 0.8]), np.zeros(3), 3)
    b = EvidenceSet("b", np.array([3, 4]), np.array([0.6, 0.85]), np.zeros(2), 2)
    m = pairwise_margins([a, b])
    # best two of a (0.9, 0.8) against b's (0.85, 0.6)
    assert m[("a", "b")] == pytest.approx(((0.9 - 0.85) + (0.8 - 0.6)) / 2)
    assert m[("b", "a")] == pytest.approx(-m[("a", "b")])
    assert pairwise_margins([a, b], top_m=1)[("a", "b")] == pytest.approx(0.05)


def test_it_abstains_on_a_tie_below_the_threshold_and_without_evidence():
    # mirror images of each other about the query: every rank-wise difference is 0
    angles = [10, 20, 30]
    embs = _unit_at(angles + [-a for a in angles])
    embs[3:, 2:] = embs[:3, 2:]  # same jitter: exact mirror
    embs /= np.linalg.norm(embs, axis=1, keepdims=True)
    query = np.zeros(6)
    query[0] = 1.0
    labels = [("fracture",)] * 3 + [()] * 3
    member = hypothesis_membership(labels, FRACTURE_VS_NONE)
    sets = select_evidence(embs @ query, embs, member, ["fracture", "none"], m=3, beta=0.5)
    tie = decide(sets, threshold=0.0)
    assert tie.abstained and tie.decision is None and abs(tie.margin) < 1e-8
    assert "no hypothesis beats every other" in tie.reason
    # nudge one fracture case closer: a small positive margin, answered only below it
    sets[0] = EvidenceSet("fracture", sets[0].indices, sets[0].similarity + 0.01,
                          sets[0].selection, sets[0].available)
    assert decide(sets, threshold=0.0).decision == "fracture"
    low = decide(sets, threshold=0.05)
    assert low.abstained and low.leader == "fracture" and "below the threshold 0.0500" in low.reason
    empty = EvidenceSet("none", np.zeros(0, np.int64), np.zeros(0), np.zeros(0), 0)
    none = decide([sets[0], empty])
    assert none.abstained and "no evidence for 'none'" in none.reason and math.isnan(none.margin)


def test_provenance_caps_hold_in_every_set():
    rng = np.random.default_rng(3)
    embs = rng.normal(size=(30, 8))
    embs /= np.linalg.norm(embs, axis=1, keepdims=True)
    query = embs[:10].mean(axis=0)
    query /= np.linalg.norm(query)
    labels = [("fracture",)] * 15 + [()] * 15
    patients = [f"p{i % 4}" for i in range(30)]  # four patients, many images each
    studies = [f"s{i % 6}" for i in range(30)]
    member = hypothesis_membership(labels, FRACTURE_VS_NONE)
    args = (embs @ query, embs, member, ["fracture", "none"],
            {"patient": patients, "study": studies})
    free = select_evidence(*args, m=5, caps=None)
    assert any(len({patients[i] for i in s.indices}) < len(s.indices) for s in free)
    capped = select_evidence(*args, m=5, caps={"patient": 1, "study": 1})
    for s in capped:
        assert len(s.indices) >= 2
        assert len({patients[i] for i in s.indices}) == len(s.indices)
        assert len({studies[i] for i in s.indices}) == len(s.indices)
        assert all(member[i].tolist() == member[s.indices[0]].tolist() for i in s.indices)


def test_ambiguous_candidates_are_never_evidence_and_bad_input_is_named():
    embs = _unit_at([0, 10, 20, 30])
    hyps = (Hypothesis("a", ("x",)), Hypothesis("b", ("y",)))
    member = hypothesis_membership([("x", "y"), ("x",), ("y",), ("y",)], hyps)
    sets = select_evidence(embs @ embs[0], embs, member, ["a", "b"], m=3)
    assert 0 not in set(sets[0].indices) | set(sets[1].indices)
    assert sets[0].available == 1 and sets[1].available == 2
    with pytest.raises(ValueError, match="membership must be bool of shape"):
        select_evidence(embs @ embs[0], embs, member[:2], ["a", "b"])
    with pytest.raises(ValueError, match="pool must be >= 5"):
        select_evidence(embs @ embs[0], embs, member, ["a", "b"], m=5, pool=3)
    with pytest.raises(ValueError, match="L2-normalised"):
        select_evidence(embs @ embs[0], embs * 2, member, ["a", "b"])


# -- selective prediction ----------------------------------------------------------------
def test_risk_coverage_and_aurc_on_a_hand_example():
    conf = np.array([0.9, 0.8, 0.8, 0.5, np.nan])
    ok = np.array([True, True, False, True, True])
    t, cov, risk = risk_coverage(conf, ok)
    np.testing.assert_allclose(t, [0.9, 0.8, 0.5])  # the 0.8 tie is answered together
    np.testing.assert_allclose(cov, [0.2, 0.6, 0.8])
    np.testing.assert_allclose(risk, [0.0, 1 / 3, 1 / 4])
    # per case: 0, 1/3, 1/3 (tie group), 1/4, then the unanswerable case counted wrong: 2/5
    assert aurc(conf, ok) == pytest.approx((0 + 1 / 3 + 1 / 3 + 1 / 4 + 2 / 5) / 5)
    assert selective_accuracy(conf, ok, 0.4) == pytest.approx(1.0)
    assert selective_accuracy(conf, ok, 1.0) == pytest.approx(3 / 5)


@pytest.mark.parametrize("target", [0.05, 0.1, 0.2])
def test_calibration_hits_the_target_risk_with_the_largest_coverage(target):
    rng = np.random.default_rng(7)
    conf = rng.uniform(0, 1, 2000)
    ok = rng.uniform(0, 1, 2000) < 0.55 + 0.45 * conf  # errors concentrate at low confidence
    cal = calibrate_threshold(conf, ok, target, min_answered=20)
    answered = conf >= cal.threshold
    assert answered.sum() == cal.answered >= 20
    assert np.mean(~ok[answered]) == pytest.approx(cal.risk) and cal.risk <= target
    assert cal.coverage == pytest.approx(answered.mean())
    # maximal: any lower threshold on the curve breaks the target
    t, cov, risk = risk_coverage(conf, ok)
    assert (risk[t < cal.threshold] > target).all()
    # fresh cases from the same process: the risk lands near the target
    conf2 = rng.uniform(0, 1, 20000)
    ok2 = rng.uniform(0, 1, 20000) < 0.55 + 0.45 * conf2
    assert np.mean(~ok2[conf2 >= cal.threshold]) == pytest.approx(target, abs=0.03)


def test_calibration_abstains_everywhere_when_no_threshold_meets_the_target():
    cal = calibrate_threshold([0.9, 0.8, 0.7], np.array([False, True, False]), 0.1)
    assert cal.threshold == math.inf and cal.coverage == 0.0 and cal.answered == 0
    with pytest.raises(ValueError, match="target_risk"):
        calibrate_threshold([0.5], np.array([True]), 1.5)
    with pytest.raises(TypeError, match="correct must be bool"):
        risk_coverage([0.5], [1])


# -- Diagnose with hypotheses over gRPC ---------------------------------------------------
grpc = pytest.importorskip("grpc")  # the [server] extra
pytest.importorskip("grpc_health")
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.config import BatchConfig, ServeConfig  # noqa: E402
from medseek.serve.contrastive_service import demo_step, save_calibration  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402


def _png(base: np.ndarray, seed: int) -> bytes:
    """``base`` with a few pixels nudged (a different image: the store dedups by pixels)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = base.copy()
    ys, xs = rng.integers(0, arr.shape[0], 6), rng.integers(0, arr.shape[1], 6)
    arr[ys, xs] = np.clip(arr[ys, xs].astype(int) + 25, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


_yy, _xx = np.mgrid[0:48, 0:48]
#: X: only fracture look-alikes (an easy case); Y: look-alikes under both answers (hard).
#: X spans 0-255, so its encoder input is the same whether 8-bit films are divided by 255
#: (medseek.io.unit_intensity, what the service does) or stretched to their min and max
PATTERN_X = ((_xx // 6 % 2) * 255).astype(np.uint8)
PATTERN_Y = (((_xx - 24) ** 2 + (_yy - 24) ** 2 < 200) * 200).astype(np.uint8)
PATTERN_N = (((_xx // 8 + _yy // 8) % 2) * 220).astype(np.uint8)
HYPS = [pb.Hypothesis(name="fracture", labels=["fracture"]), pb.Hypothesis(name="none")]
HYPOTHESES = (Hypothesis("fracture", ("fracture",)), Hypothesis("none", ()))


def _items():
    """(item, patient) rows: 6 X look-alikes with a fracture (two of one patient), 5 Y
    look-alikes with a fracture and 5 without, 5 unrelated images without."""
    rows = []
    for n in range(6):
        rows.append((f"x{n}", _png(PATTERN_X, n), ["fracture"], "pa" if n < 2 else f"px{n}"))
    for n in range(5):
        rows.append((f"yf{n}", _png(PATTERN_Y, 10 + n), ["fracture"], f"pyf{n}"))
        rows.append((f"yn{n}", _png(PATTERN_Y, 20 + n), [], f"pyn{n}"))
        rows.append((f"n{n}", _png(PATTERN_N, 30 + n), [], f"pn{n}"))
    return rows


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("contrastive")
    cfg = ServeConfig(store_path=d / "store.db", index_dir=d / "index", port=0, grace_s=2.0,
                      encode_batch=BatchConfig(max_wait_ms=10.0))
    with ServerThread(cfg, LocalTorchEncoder(seed=0)) as s:
        with RetrievalClient(f"127.0.0.1:{s.port}") as c:
            rows = _items()
            items = [pb.IngestItem(id=i, image=png, labels=labels, patient_pseudonym=p,
                                   study_pseudonym=f"st-{i}") for i, png, labels, p in rows]
            assert c.ingest(items).inserted == len(items)
            yield s, c, cfg, {i: p for i, _, _, p in rows}


def test_diagnose_with_hypotheses_answers_an_easy_case_with_sets_and_margins(served):
    _, client, _, patient = served
    resp = client.diagnose(pb.DiagnoseRequest(image=_png(PATTERN_X, 99), k=5, hypotheses=HYPS))
    c = resp.contrastive
    assert [p.label for p in resp.probabilities][:1] == ["fracture"]  # the plain vote, too
    assert not c.abstained and c.decision == "fracture" and c.reason == ""
    assert c.threshold_source == "default" and c.threshold == 0.0
    sets = {s.hypothesis: s for s in c.evidence_sets}
    assert list(sets) == ["fracture", "none"]
    assert set(sets["fracture"].ids) <= {f"x{n}" for n in range(6)}
    assert all(not i.startswith(("x", "yf")) for i in sets["none"].ids)
    # one image per patient: x0 and x1 share patient "pa"
    assert len({patient[i] for i in sets["fracture"].ids}) == len(sets["fracture"].ids) == 5
    # picked in MMR order of the selection score, which the rival similarity only lowers
    assert all(sel <= sim + 1e-6 for st in sets.values()
               for sim, sel in zip(st.similarities, st.selection_scores))
    margins = {(m.hypothesis, m.over): m.margin for m in c.margins}
    assert margins[("fracture", "none")] == pytest.approx(-margins[("none", "fracture")])
    assert c.margin == pytest.approx(margins[("fracture", "none")]) and c.margin > 0
    want = np.mean(np.sort(sets["fracture"].similarities)[::-1][:5]
                   - np.sort(sets["none"].similarities)[::-1][:5])
    assert c.margin == pytest.approx(want, abs=1e-5)


def test_diagnose_abstains_on_a_built_hard_case_and_uses_the_stored_threshold(served):
    server, client, cfg, _ = served
    hard = pb.DiagnoseRequest(image=_png(PATTERN_Y, 98), k=5, hypotheses=HYPS)
    resp = client.diagnose(hard)
    c = resp.contrastive
    # look-alikes under both answers: the sets tie up to pixel noise
    assert abs(c.margin) < 0.01 and {s.hypothesis for s in c.evidence_sets} == {"fracture",
                                                                                "none"}
    request_override = pb.DiagnoseRequest()
    request_override.CopyFrom(hard)
    request_override.margin_threshold = 0.01
    over = client.diagnose(request_override).contrastive
    assert over.abstained and over.decision == "" and over.threshold_source == "request"
    assert over.reason and ("below the threshold 0.0100" in over.reason
                            or "no hypothesis beats every other" in over.reason)
    # a calibration stored for these hypotheses is applied when the request names none
    from medseek.index.store import Store, StoreConfig

    with Store(StoreConfig(cfg.store_path)) as store:
        save_calibration(store, "image", [Hypothesis("none", ()),
                                          Hypothesis("fracture", ("fracture",))],
                         threshold=0.01, target_risk=0.1, beta=0.5)
    stored = client.diagnose(hard).contrastive
    assert stored.abstained and stored.threshold_source == "calibrated"
    assert stored.threshold == pytest.approx(0.01) and stored.target_risk == pytest.approx(0.1)
    easy = client.diagnose(pb.DiagnoseRequest(image=_png(PATTERN_X, 97), hypotheses=HYPS))
    assert easy.contrastive.decision == "fracture" and easy.contrastive.margin >= 0.01


def test_diagnose_without_hypotheses_is_the_plain_vote(served):
    _, client, _, _ = served
    resp = client.diagnose(pb.DiagnoseRequest(image=_png(PATTERN_X, 99), k=5))
    assert not resp.HasField("contrastive") and len(resp.neighbours) == 5


@pytest.mark.parametrize("hyps, extra, words", [
    ([pb.Hypothesis(name="fracture", labels=["fracture"])], {}, "hypotheses: a contrastive"),
    ([pb.Hypothesis(name="a"), pb.Hypothesis(name="b")], {}, "at most one may have no labels"),
    (HYPS, {"margin_threshold": -1.0}, "margin_threshold: must be finite and >= 0"),
    (HYPS, {"filters": pb.Filters(labels_any=["fracture"])}, "filters.labels_any"),
])
def test_bad_hypotheses_get_invalid_argument(served, hyps, extra, words):
    _, client, _, _ = served
    with pytest.raises(grpc.RpcError) as err:
        client.diagnose(pb.DiagnoseRequest(image=_png(PATTERN_X, 1), hypotheses=hyps, **extra))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()


def test_cli_and_demo_step_show_the_decision(served, tmp_path, capsys):
    from medseek.serve.commands import main

    server, client, _, _ = served
    png = tmp_path / "q.png"
    png.write_bytes(_png(PATTERN_X, 96))
    rc = main(["query", "--server", f"127.0.0.1:{server.port}", "--image", str(png),
               "--diagnose", "--hypothesis", "fracture=fracture", "--hypothesis", "none",
               "--margin-threshold", "0.001"])
    out = capsys.readouterr().out
    assert rc == 0 and "decision: fracture" in out and "margin(fracture over none)" in out
    assert "evidence for none" in out and "(request)" in out
    lines = []
    got = demo_step(client, tmp_path / "demo", lines.append, hypotheses=HYPOTHESES)
    assert "fracture" in got["query_labels"] and (tmp_path / "demo" /
                                                  "contrastive_diagnosis.json").is_file()
    assert got["query"] not in {i for s in got["contrastive"]["evidence_sets"]
                                for i in s.get("ids", [])}
    assert any("evidence for 'fracture'" in line for line in lines)
    held_out = demo_step(client, tmp_path / "demo2", lines.append, image=_png(PATTERN_X, 95),
                         image_labels=["fracture"], hypotheses=HYPOTHESES)
    assert held_out["contrastive"]["decision"] == "fracture"
