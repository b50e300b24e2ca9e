"""Report-to-report retrieval on the real Indiana University chest X-ray reports.

Every report with a non-empty findings + impression text queries all the other such
reports (itself excluded: its score is set to -inf). Three rankers are compared:

- BM25 (``rank_bm25.BM25Okapi``) over a simple tokeniser: lower case, alphanumeric
  runs, the anonymisation token ``xxxx`` and a few function words dropped;
- the pretrained MiniLM-L6 text tower (:mod:`medseek.models.text_tower`), cosine of
  L2-normalised embeddings;
- the evidence concept vectors of :func:`medseek.text.evidence.concept_vector` over
  the whole finding lexicon plus a ``normal`` axis set when no finding is asserted,
  cosine. Many reports share one concept vector; ties are broken by report order.
  The lexicon was tuned to agree with these same MeSH labels, so this row is an upper
  reference for label-aware retrieval, not a fair competitor of the two above;
- the mean of the MiniLM and concept cosines;
- the same two with the laterality-aware concept vectors of
  :func:`medseek.text.concepts.lateral_report_concepts` (the 47 axes plus one left and
  one right axis per finding); the mean row is what ``medseek serve`` ranks its report
  collection by (``medseek.serve.report_ranker``: ``hybrid_embedding`` with text weight
  0.5, whose inner product is this mean).

Relevance is graded: the Jaccard overlap of the two reports' sets of MeSH headings
(first path component of each human ``mesh_major`` term, lower case), where
``normal`` counts as a label and ``No Indexing`` is dropped. So two normal reports
have relevance 1, a normal and an abnormal one 0, and "cardiomegaly + effusion" vs
"cardiomegaly" 0.5. nDCG@10 is computed per query with
:func:`medseek.eval.metrics.ndcg_at_k` and summarised with a 95% percentile bootstrap
over queries (:func:`medseek.eval.bootstrap.bootstrap_ci`), for all queries and for the
abnormal ones (queries whose labels are not just ``normal``).

First MeSH headings carry no side, so that nDCG cannot see laterality. A second table
does: nDCG@10 with a side-aware relevance (:func:`side_aware_relevance`: the Jaccard
overlap of the reports' normalised MeSH findings plus one ``finding/side`` label per side
the human terms state, e.g. ``Pleural Effusion/right``), and the laterality agreement of
the top 10 hits (:func:`medseek.text.evaluate.laterality_agreement`): over the queries
that assert a finding on exactly one side, the fraction of hits that assert it on the
same side, and the fraction on the opposite side only. Sides are read two ways: extracted
from the text (:func:`medseek.text.concepts.finding_sides`, the extractor the ranker also
uses) and from the human MeSH terms (:func:`medseek.data.mesh.finding_sides`,
independent of it). ``--side-weights`` adds hybrid rows with the side axes scaled down.

The report texts are read at run time from the installed ``torchxrayvision`` package
(CC BY-NC-ND); nothing derived from them is written except the MiniLM embedding cache
under ``runs/`` (git-ignored, local only).

Usage::

    python benchmarks/text_benchmarks.py [--k 10] [--n-boot 1000] [--cache runs/text_bench]
                                         [--side-weights 0.35 0.7]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import time
from pathlib import Path

import numpy as np

STOPWORDS = frozenset(
    "a an and are as at be been by for from has have in is it of on or the there this "
    "to was were with xxxx".split()
)


def tokenize(text: str) -> list[str]:
    """BM25 tokens: lower-case alphanumeric runs without stop words."""
    return [t for t in re.findall(r"[a-z0-9]+", text.lower()) if t not in STOPWORDS]


def bm25_scores(texts: list[str], check: int = 5) -> np.ndarray:
    """All-pairs BM25 scores, ``(N, N)`` float64, row = query.

    ``BM25Okapi`` is fitted by rank-bm25 (idf with its epsilon floor, k1, b, average
    length); its per-query ``get_scores`` loops in Python over every document, which
    would take many minutes for 3,927 x 3,927 pairs, so the same formula is evaluated
    as one sparse product ``Q @ W`` (query term counts x per-document term weights).
    The first ``check`` rows are asserted equal to ``get_scores``.
    """
    from rank_bm25 import BM25Okapi
    from scipy import sparse

    docs = [tokenize(t) for t in texts]
    bm25 = BM25Okapi(docs)
    vocab = {w: i for i, w in enumerate(bm25.idf)}
    idf = np.array([bm25.idf[w] for w in vocab])
    doc_len = np.asarray(bm25.doc_len, dtype=np.float64)
    rows, cols, tf = [], [], []
    for d, freqs in enumerate(bm25.doc_freqs):
        for w, f in freqs.items():
            rows.append(d)
            cols.append(vocab[w])
            tf.append(f)
    tf = np.asarray(tf, dtype=np.float64)
    norm = bm25.k1 * (1 - bm25.b + bm25.b * doc_len[rows] / bm25.avgdl)
    weight = idf[cols] * tf * (bm25.k1 + 1) / (tf + norm)
    w_mat = sparse.csr_matrix((weight, (rows, cols)), shape=(len(docs), len(vocab)))
    # a query term counts once per occurrence, as in get_scores
    q_mat = sparse.csr_matrix((tf, (rows, cols)), shape=(len(docs), len(vocab)))
    scores = np.asarray((q_mat @ w_mat.T).todense())
    for q in range(min(check, len(docs))):
        np.testing.assert_allclose(scores[q], bm25.get_scores(docs[q]), rtol=1e-9, atol=1e-9)
    return scores


def minilm_embeddings(texts: list[str], cache: Path, batch_size: int) -> np.ndarray:
    from medseek.models.text_tower import TextEncoder, locate_minilm

    weights = locate_minilm() / "model.safetensors"
    key = hashlib.sha256()
    key.update(str(weights.stat().st_size).encode())
    for t in texts:
        key.update(t.encode())
        key.update(b"\0")
    path = cache / f"minilm_{key.hexdigest()[:16]}.npy"
    if path.is_file():
        return np.load(path)
    emb = TextEncoder().encode(texts, batch_size=batch_size)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, emb)
    return emb


def cosine(emb: np.ndarray) -> np.ndarray:
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return (unit @ unit.T).astype(np.float64)


def side_aware_relevance(mesh_sides: list[dict]) -> np.ndarray:
    """Graded relevance that sees laterality: the Jaccard overlap of two reports' label
    sets, each the report's normalised MeSH findings (``medseek.data.mesh``) plus one
    ``finding/side`` label per side its terms state (bilateral: both)."""
    from medseek.eval.metrics import label_overlap_relevance

    labels = [set(s) | {f"{f}/{side}" for f, sides in s.items() for side in sides}
              for s in mesh_sides]
    vocab = {lab: j for j, lab in enumerate(sorted(set().union(*labels)))}
    m = np.zeros((len(labels), len(vocab)), dtype=bool)
    for i, labs in enumerate(labels):
        m[i, [vocab[lab] for lab in labs]] = True
    return label_overlap_relevance(m, m, mode="jaccard")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=Path("runs/text_bench"))
    parser.add_argument("--side-weights", type=float, nargs="*", default=[0.35, 0.7],
                        help="also rank with the side axes scaled by these (served: 1)")
    args = parser.parse_args(argv)

    from medseek.data.iu import load_iu_reports, mesh_heading_matrix
    from medseek.data.mesh import finding_sides as mesh_finding_sides
    from medseek.eval.bootstrap import bootstrap_ci
    from medseek.eval.metrics import label_overlap_relevance, ndcg_at_k
    from medseek.serve.report_ranker import HYBRID_TEXT_WEIGHT
    from medseek.text.concepts import (concept_names, finding_sides, hybrid_embedding,
                                       lateral_report_concepts, report_concepts)
    from medseek.text.evaluate import laterality_agreement
    from medseek.text.evidence import extract_evidence

    t_all = time.perf_counter()
    reports = [r for r in load_iu_reports() if r.text.strip()]
    texts = [r.text for r in reports]
    _, heads = mesh_heading_matrix(reports)
    relevance = label_overlap_relevance(heads, heads, mode="jaccard")
    abnormal = np.array([r.mesh_headings != frozenset({"normal"}) for r in reports])
    print(f"{len(reports)} reports with text; {int(abnormal.sum())} abnormal queries")
    # laterality: sides as extracted from the text, and as the human MeSH terms state them
    text_sides = [finding_sides(extract_evidence(t)) for t in texts]
    mesh_sides = [mesh_finding_sides(r.mesh_major) for r in reports]
    sided_relevance = side_aware_relevance(mesh_sides)
    n_sided = [sum(any(len(v) == 1 for v in s.values()) for s in sides)
               for sides in (text_sides, mesh_sides)]

    rows, side_rows = [], []
    cached: dict[str, np.ndarray] = {}

    def keep(name: str, scores: np.ndarray) -> np.ndarray:
        cached[name] = scores
        return scores

    def hybrid_scores(side_weight: float) -> np.ndarray:
        """What ``medseek serve`` ranks the report collection by (side_weight 1):
        ``hybrid_embedding`` of MiniLM and the laterality-aware concepts."""
        concepts = lateral_report_concepts(texts)
        concepts[:, len(concept_names()):] *= side_weight
        h = hybrid_embedding(minilm_embeddings(texts, args.cache, args.batch_size), concepts,
                             HYBRID_TEXT_WEIGHT)
        return (h @ h.T).astype(np.float64)

    rankers = {
        "BM25 (rank-bm25)": lambda: bm25_scores(texts),
        "MiniLM-L6 tower, cosine": lambda: keep("minilm", cosine(
            minilm_embeddings(texts, args.cache, args.batch_size))),
        "evidence concepts, cosine": lambda: keep("concepts", cosine(report_concepts(texts))),
        # how the service combines them: embedding similarity, concept agreement as a tie-breaker
        # and a pull towards reports asserting the same findings
        "MiniLM + concepts (mean of cosines)": lambda: 0.5 * (cached["minilm"] + cached["concepts"]),
        "evidence concepts + laterality, cosine": lambda: cosine(lateral_report_concepts(texts)),
        **{f"MiniLM + concepts + laterality, side axes x {w:g}": (lambda w=w: hybrid_scores(w))
           for w in args.side_weights},
        "MiniLM + concepts + laterality (served)": lambda: hybrid_scores(1.0),
    }
    for name, make_scores in rankers.items():
        t0 = time.perf_counter()
        scores = np.asarray(make_scores(), dtype=np.float64)
        np.fill_diagonal(scores, -np.inf)  # a report never retrieves itself
        seconds = time.perf_counter() - t0
        per_query = ndcg_at_k(scores, relevance, args.k)
        everyone = bootstrap_ci(per_query, n_boot=args.n_boot, seed=0)
        sick = bootstrap_ci(per_query[abnormal], n_boot=args.n_boot, seed=0)
        rows.append((name, everyone, sick, seconds))
        print(f"{name}: nDCG@{args.k} {everyone[0]:.4f} [{everyone[1]:.4f}, {everyone[2]:.4f}] "
              f"abnormal {sick[0]:.4f} ({seconds:.1f} s)")
        cols = [ndcg_at_k(scores, sided_relevance, args.k)]
        for sides in (text_sides, mesh_sides):
            cols += laterality_agreement(scores, sides, sides, args.k)
        side_rows.append((name, [bootstrap_ci(c, n_boot=args.n_boot, seed=0) for c in cols]))
        print("    side-aware nDCG {:.4f}; same/opposite side: extracted {:.3f}/{:.3f}, "
              "MeSH {:.3f}/{:.3f}".format(*(ci[0] for ci in side_rows[-1][1])))

    def cell(ci) -> str:
        return f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"

    table = [
        f"| ranker | nDCG@{args.k}, all queries [95% CI] | nDCG@{args.k}, abnormal queries "
        "[95% CI] | scoring time (s) |",
        "|---|---|---|---:|",
    ]
    for name, everyone, sick, seconds in rows:
        table.append(f"| {name} | {cell(everyone)} | {cell(sick)} | {seconds:.1f} |")
    table += [
        "",
        f"| ranker | nDCG@{args.k}, side-aware MeSH relevance | top-{args.k} same side, "
        f"extracted ({n_sided[0]} queries) | opposite side, extracted | same side, MeSH "
        f"({n_sided[1]} queries) | opposite side, MeSH |",
        "|---|---|---|---|---|---|",
    ]
    for name, cis in side_rows:
        table.append(f"| {name} | " + " | ".join(cell(ci) for ci in cis) + " |")
    text = "\n".join(table)
    print(text)
    print(f"total {time.perf_counter() - t_all:.1f} s, {len(reports)} queries x "
          f"{len(reports) - 1} candidates, {args.n_boot} bootstrap resamples")
    return text


if __name__ == "__main__":
    main()
