"""``Diagnose`` with hypotheses: contrastive evidence sets and a decision that may abstain.

A ``DiagnoseRequest`` naming two or more hypotheses gets, besides the plain vote,
``DiagnoseResponse.contrastive`` (:mod:`medseek.search.contrastive`): the candidates of each
hypothesis are searched by the Search path (a hypothesis with labels: ``labels_any`` its
labels; the complement: the plain top ``COMPLEMENT_POOL``), their embeddings read from the
store, one evidence set per hypothesis selected, and the query compared with the sets.

The margin threshold comes from the request (``margin_threshold``), else from the store's
meta table, where an offline calibration on a validation split put it for this collection
and this set of hypotheses (:func:`save_calibration`), else :data:`DEFAULT_THRESHOLD`.
"""

from __future__ import annotations

import json
import math

import numpy as np

from medseek.search.contrastive import (Hypothesis, check_hypotheses, decide,
                                        hypothesis_membership, hypothesis_signature,
                                        select_evidence)

from . import ingest as ing
from .encoding import run_in
from .v1 import retrieval_pb2 as pb

__all__ = ["DEFAULT_BETA", "DEFAULT_THRESHOLD", "contrastive_diagnosis", "demo_calibrated_step",
           "demo_step", "hypotheses_from_request", "load_calibration", "save_calibration"]

#: items per evidence set, and candidates per hypothesis that compete for it
SET_SIZE, POOL = 5, 40
#: candidates searched for the complement hypothesis (it has no label to filter on)
COMPLEMENT_POOL = 120
#: rival-similarity weight when no calibration names one
DEFAULT_BETA = 0.5
#: margin needed to answer when neither the request nor a calibration gives one: any
#: positive margin (ties and cycles still abstain)
DEFAULT_THRESHOLD = 0.0
_KEY = "contrastive_calibration:{collection}:{signature}"


def hypotheses_from_request(request) -> tuple[Hypothesis, ...]:
    """The request's hypotheses, checked (``InvalidField`` on "hypotheses")."""
    hs = tuple(Hypothesis(h.name, tuple(h.labels)) for h in request.hypotheses)
    try:
        return check_hypotheses(hs)
    except (TypeError, ValueError) as exc:
        raise ing.InvalidField("hypotheses", str(exc).removeprefix("hypotheses: ")) from None


def save_calibration(store, collection: str, hypotheses, threshold: float,
                     target_risk: float, beta: float = DEFAULT_BETA, **extra) -> str:
    """Store a calibrated margin threshold for ``collection`` and these hypotheses in the
    store's meta table (``extra``: provenance of the calibration, e.g. coverage on val).
    Returns the meta key."""
    if not math.isfinite(float(threshold)) or threshold < 0:
        raise ValueError(f"threshold must be finite and >= 0, got {threshold}")
    key = _KEY.format(collection=collection, signature=hypothesis_signature(hypotheses))
    store.set_meta(key, json.dumps({"threshold": float(threshold), "beta": float(beta),
                                    "target_risk": float(target_risk), **extra}))
    return key


def load_calibration(store, collection: str, hypotheses) -> dict | None:
    """The calibration :func:`save_calibration` stored, None when there is none."""
    key = _KEY.format(collection=collection, signature=hypothesis_signature(hypotheses))
    raw = store.get_meta(key)
    return None if raw is None else json.loads(raw)


def _candidate_requests(request, hyps) -> list[pb.SearchRequest]:
    """Search requests whose hits are the candidates: one per labelled hypothesis (its
    labels as ``labels_any``), one plain for the complement."""
    base = pb.SearchRequest(collection=request.collection, diversify=False,
                            request_id=request.request_id)
    kind = request.WhichOneof("query")
    if kind is not None:
        setattr(base, kind, getattr(request, kind))
    for name in ("filters", "region"):
        if request.HasField(name):
            getattr(base, name).CopyFrom(getattr(request, name))
    out = []
    for h in hyps:
        req = pb.SearchRequest()
        req.CopyFrom(base)
        if h.labels:
            req.k = POOL
            del req.filters.labels_any[:]
            req.filters.labels_any.extend(h.labels)
        else:
            req.k = COMPLEMENT_POOL
        out.append(req)
    return out


def _threshold(service, request, collection: str, hyps) -> tuple[float, str, float, float]:
    """(threshold, source, target_risk, beta) for this request."""
    if request.HasField("margin_threshold"):
        t = float(request.margin_threshold)
        if not (math.isfinite(t) and t >= 0):
            raise ing.InvalidField("margin_threshold", f"must be finite and >= 0, got {t}")
        return t, "request", 0.0, DEFAULT_BETA
    cal = load_calibration(service.store, collection, hyps)
    if cal is None:
        return DEFAULT_THRESHOLD, "default", 0.0, DEFAULT_BETA
    return (float(cal["threshold"]), "calibrated", float(cal.get("target_risk", 0.0)),
            float(cal.get("beta", DEFAULT_BETA)))


async def contrastive_diagnosis(service, request, collection: str) -> pb.ContrastiveDiagnosis:
    """The contrastive answer to ``request`` (a ``DiagnoseRequest`` with hypotheses) by
    ``service`` (the ``QueryService``), over ``collection``."""
    from medseek.serve.query_service import query_from_request

    hyps = hypotheses_from_request(request)
    if request.HasField("filters") and request.filters.labels_any:
        raise ing.InvalidField("filters.labels_any", "cannot be combined with hypotheses "
                               "(each hypothesis' labels select its candidates)")
    threshold, source, target_risk, beta = await run_in(
        service.index_pool, _threshold, service, request, collection, hyps)
    hits: dict[str, object] = {}
    for req in _candidate_requests(request, hyps):
        for h in (await service.search(query_from_request(req))).hits:
            hits.setdefault(h.id, h)
    ids = list(hits)
    stored = await run_in(service.index_pool, lambda: service.store.get(ids, with_embeddings=True))
    ids = [i for i in ids if i in stored and stored[i].embedding is not None]  # deleted meanwhile
    names = [h.name for h in hyps]
    result = pb.ContrastiveDiagnosis(threshold=threshold, threshold_source=source,
                                     target_risk=target_risk)
    if ids:
        emb = np.stack([stored[i].embedding for i in ids]).astype(np.float64)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        scores = np.array([hits[i].score for i in ids], dtype=np.float64)
        items = [hits[i].item for i in ids]
        prov = {"patient": [it.patient_pseudonym or None for it in items],
                "study": [it.study_pseudonym or None for it in items],
                "document": [it.source_document or None for it in items]}
        member = hypothesis_membership([tuple(it.labels) for it in items], hyps)
        caps = {k: v for k, v in service.config.search.caps.items() if k in prov}
        sets = select_evidence(scores, emb, member, names, prov, m=SET_SIZE, pool=POOL,
                               beta=beta, lam=service.config.search.lam, caps=caps)
    else:
        sets = select_evidence(np.zeros(0), np.zeros((0, 1)), np.zeros((0, len(names)), bool),
                               names)
    d = decide(sets, threshold)
    result.decision, result.abstained, result.reason = d.decision or "", d.abstained, d.reason
    result.leader, result.margin = d.leader or "", d.margin
    for st in sets:
        result.evidence_sets.add(hypothesis=st.hypothesis, ids=[ids[i] for i in st.indices],
                                 similarities=st.similarity.tolist(),
                                 selection_scores=st.selection.tolist(), available=st.available)
    for (a, b), v in d.margins.items():
        result.margins.add(hypothesis=a, over=b, margin=v)
    return result


#: the demo's diagnostic question (the wrist site): distal radius fracture or not
WRIST_QUESTION = (Hypothesis("fracture", ("distal radius fracture",)), Hypothesis("none", ()))


def demo_step(client, out_dir, log=print, *, image: bytes | None = None,
              image_labels=(), hypotheses=WRIST_QUESTION, collection: str = "image") -> dict:
    """A demo step: a contrastive ``Diagnose`` with ``hypotheses`` of ``image`` (e.g. a
    held-out radiograph, whose true ``image_labels`` are only logged), or without one of a
    stored image carrying the first hypothesis' label (found by a text search filtered on
    it; diagnosed leave-one-out). Logs the decision, margins and evidence sets, writes
    ``out_dir/contrastive_diagnosis.json`` and returns it as a dict."""
    from pathlib import Path

    from google.protobuf.json_format import MessageToDict

    req = pb.DiagnoseRequest(collection=collection, hypotheses=[
        pb.Hypothesis(name=h.name, labels=list(h.labels)) for h in hypotheses])
    if image is not None:
        req.image, query, labels = image, "the query image", list(image_labels)
    else:
        first = hypotheses[0]
        found = client.search(pb.SearchRequest(
            text=first.labels[0] if first.labels else first.name, collection=collection, k=1,
            filters=pb.Filters(labels_any=list(first.labels))))
        if not found.hits:
            raise RuntimeError(f"demo_step: no stored {collection} carries {list(first.labels)}")
        req.item_id = query = found.hits[0].id
        labels = list(found.hits[0].item.labels)
    resp = client.diagnose(req)
    c = resp.contrastive
    answer = c.decision if not c.abstained else f"abstained ({c.reason})"
    log(f"contrastive diagnosis of {query} (labels {labels}): {answer}; margin "
        f"{c.margin:.4f}, threshold {c.threshold:.4f} ({c.threshold_source})")
    for st in c.evidence_sets:
        pairs = ", ".join(f"{i} {s:.3f}" for i, s in zip(st.ids, st.similarities))
        log(f"  evidence for {st.hypothesis!r} ({st.available} candidates): {pairs}")
    out = {"query": query, "query_labels": labels,
           "contrastive": MessageToDict(c, preserving_proto_field_name=True),
           "plain_vote": {p.label: p.probability for p in resp.probabilities}}
    path = Path(out_dir) / "contrastive_diagnosis.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    out["path"] = str(path)
    return out


def parse_hypothesis(text: str) -> pb.Hypothesis:
    """``NAME=LABEL[,LABEL...]`` (``NAME`` or ``NAME=`` alone: the complement), as the CLI's
    ``--hypothesis`` spells a hypothesis."""
    name, _, labels = text.partition("=")
    if not name.strip():
        raise ValueError(f"--hypothesis must be NAME=LABEL[,LABEL...], got {text!r}")
    return pb.Hypothesis(name=name.strip(),
                         labels=[lab.strip() for lab in labels.split(",") if lab.strip()])


def format_contrastive(c) -> str:
    """The decision (or why it abstained), the margins, and each evidence set."""
    head = (f"decision: {c.decision}" if not c.abstained
            else f"abstained: {c.reason} (leader {c.leader or '-'})")
    lines = [head, f"margin {c.margin:.4f}, threshold {c.threshold:.4f} ({c.threshold_source}"
             + (f", target risk {c.target_risk:g})" if c.threshold_source == "calibrated" else ")")]
    lines += [f"  margin({m.hypothesis} over {m.over}) = {m.margin:.4f}" for m in c.margins]
    for st in c.evidence_sets:
        lines.append(f"evidence for {st.hypothesis} ({st.available} candidates):")
        lines += [f"  {i}  similarity {s:.4f}  selection {sel:.4f}"
                  for i, s, sel in zip(st.ids, st.similarities, st.selection_scores)]
    return "\n".join(lines)


def truth_of(labels, hypotheses) -> str | None:
    """The hypothesis an item's labels make true (the complement when none of the labelled
    hypotheses' labels is there); None when two labelled hypotheses both hold."""
    named = [h.name for h in hypotheses if h.labels and set(h.labels) & set(labels)]
    if len(named) > 1:
        return None
    if named:
        return named[0]
    return next((h.name for h in hypotheses if not h.labels), None)


def demo_calibrated_step(client, out_dir, log=print, *, calibration, queries,
                         hypotheses=WRIST_QUESTION, target_risk: float = 0.1,
                         collection: str = "image") -> dict:
    """The demo's abstention step. The margin threshold is calibrated on ``calibration``:
    ``(item_id, study_pseudonym, labels)`` of stored validation images, each diagnosed
    leave-one-study-out (its study excluded, so its other views cannot vote), for
    ``target_risk`` on the answered ones (:func:`medseek.eval.selective.calibrate_threshold`).
    Then ``queries`` (``(name, image bytes, labels)`` of held-out images) are diagnosed with
    that threshold until one is answered and one abstains (the hard case); both are logged
    with their margins and evidence, and written to ``out_dir/contrastive_abstention.json``.
    """
    from pathlib import Path

    from google.protobuf.json_format import MessageToDict

    from medseek.eval.selective import calibrate_threshold

    def request(**query):
        return pb.DiagnoseRequest(collection=collection, hypotheses=[
            pb.Hypothesis(name=h.name, labels=list(h.labels)) for h in hypotheses], **query)

    margins, correct = [], []
    for item_id, study, labels in calibration:
        truth = truth_of(labels, hypotheses)
        if truth is None:
            continue
        req = request(item_id=item_id, margin_threshold=0.0)
        if study:
            req.filters.exclude_studies.append(study)
        c = client.diagnose(req).contrastive
        if c.abstained and not c.leader:
            continue  # no evidence at all: nothing to calibrate on
        margins.append(c.margin)
        correct.append((c.decision or c.leader) == truth)
    if not margins:
        raise RuntimeError("demo_calibrated_step: no calibration image could be diagnosed")
    cal = calibrate_threshold(np.asarray(margins), np.asarray(correct, bool), target_risk,
                              min_answered=max(1, len(margins) // 4))
    # no threshold met the target on these few cases: answer only the most confident
    threshold = cal.threshold if math.isfinite(cal.threshold) else max(margins)
    log(f"margin threshold {threshold:.4f}: calibrated on {len(margins)} validation images "
        f"(leave-one-study-out) for risk <= {target_risk:g}; there it answers "
        f"{cal.coverage:.0%} with risk {cal.risk:.3f}")
    shown: dict[str, dict] = {}
    for name, image, labels in queries:
        c = client.diagnose(request(image=image, margin_threshold=threshold)).contrastive
        kind = "abstained" if c.abstained else "answered"
        if kind in shown:
            continue
        truth = truth_of(labels, hypotheses)
        if c.abstained:
            log(f"hard case {name} (truth: {truth}): abstained, {c.reason}; leader "
                f"{c.leader!r} by margin {c.margin:.4f} < {threshold:.4f}")
        else:
            log(f"{name} (truth: {truth}): {c.decision} by margin {c.margin:.4f}")
        for st in c.evidence_sets:
            log(f"  evidence for {st.hypothesis!r}: " + ", ".join(
                f"{i} {v:.3f}" for i, v in zip(st.ids, st.similarities)))
        shown[kind] = {"query": name, "truth": truth,
                       "contrastive": MessageToDict(c, preserving_proto_field_name=True)}
        if len(shown) == 2:
            break
    if "abstained" not in shown:
        log("no held-out query fell below the threshold: none abstained")
    out = {"threshold": threshold, "calibration": {
        "n": len(margins), "coverage": cal.coverage, "risk": cal.risk,
        "target_risk": target_risk}, **shown}
    path = Path(out_dir) / "contrastive_abstention.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out
