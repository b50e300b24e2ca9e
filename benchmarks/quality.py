"""Retrieval quality through the service, next to the same numbers computed in process.

For a shipped release (or a reproduced one) and the test split of its corpus:

* in process: the torch model embeds the test items and reports, scored with
  :func:`medseek.train.ablation.evaluate_split`'s protocol (and, for the wrist model,
  :func:`medseek.train.ablation.region_diagnosis`);
* through the service: the release is exported to a Triton repository, ``tritonserver``
  and the gRPC retrieval server start (the demo's :class:`RunningSite`), the items are
  ingested through ``Ingest`` with pseudonymised patients, and the queries go through
  ``Search`` (k = 10, no diversification). The returned ranks are scored with the same
  metric code.

Per release:

* chest-xr: test images ingested; every test image (own patient excluded by the request's
  filter), then every study's report, queries them; explanations are the concepts the
  server returns per hit;
* wrist: test images ingested for image->image as above; the train split is ingested
  with its bone regions into a second collection (the prior cases) and every test image
  asks it for a kNN diagnosis: the global top 10, and for each bone the top 10 after the
  server's region rerank by that bone's box (the trained region pathway). Vote thresholds
  are the in-process ones (0.5, and those fitted on val);
* chest-ct: test volumes ingested; every report, then every abnormal organ sentence,
  queries them (report: its own volume in the top 5; organ sentence: any volume holding
  its findings at that site).

The two columns must agree within their confidence intervals::

    python benchmarks/quality.py --release chest-xr --data CORPUS --out runs/quality

``CORPUS`` is the release's corpus (``medseek train --release NAME`` builds it under
``OUT/corpus``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def service_scores(responses: list, archive_ids: list[str],
                   excluded: np.ndarray | None = None) -> np.ndarray:
    """``(Q, N)`` scores of the returned hits. Items not returned rank below every hit but
    still count in the ideal ranking (a finite floor; ``ndcg_at_k`` leaves ``-inf`` items
    out of the ideal), except those the query excluded (``excluded`` (Q, N) bool: its own
    patient, ``-inf`` as in the in-process protocol)."""
    col = {i: j for j, i in enumerate(archive_ids)}
    s = np.full((len(responses), len(archive_ids)), -1e30)
    for q, resp in enumerate(responses):
        for h in resp.hits:
            s[q, col[h.id]] = h.score
    if excluded is not None:
        s[excluded] = -np.inf
    return s


def explanation_precision(responses: list, truth: dict[str, set[str]]) -> dict:
    """Of the concepts the server shows per hit, the share the hit's item asserts."""
    shown = correct = 0
    for resp in responses:
        for h in resp.hits:
            names = [c.name for c in h.concepts]
            shown += len(names)
            correct += sum(n in truth[h.id] for n in names)
    return {"precision": correct / shown if shown else float("nan"), "shown": shown}


def _ci(m: dict) -> str:
    return f"{m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def _row(metric: str, a: dict, b: dict) -> str:
    agree = a["lo"] <= b["value"] <= a["hi"] and b["lo"] <= a["value"] <= b["hi"]
    return f"| {metric} | {_ci(a)} | {_ci(b)} | {'yes' if agree else 'NO'} |"


def search_all(site, requests: list, what: str) -> list:
    t0 = time.perf_counter()
    out = [site.client.search(r, timeout=300.0) for r in requests]
    print(f"{len(out)} {what} queries in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def image_rows(args, model, train, test, local, site) -> tuple[list[str], dict]:
    """chest-xr and wrist: image->image (and report->image, explanations) through the API."""
    from medseek.demo_service import ingest, pseudonym
    from medseek.eval.metrics import label_overlap_relevance, ndcg_at_k
    from medseek.serve.v1 import retrieval_pb2 as pb
    from medseek.text.concepts import concept_names
    from medseek.train.ablation import _cluster_mean_ci, _patients
    from medseek.train.data import item_findings

    corpus = Path(args.data)
    recs = list(test.records)
    ids = [r.id for r in recs]
    pid = _patients(test)
    jac = label_overlap_relevance(test.label_matrix(), test.label_matrix(), "jaccard")
    totals = ingest(site, corpus, recs)
    print(f"ingested {totals['inserted']} test images", flush=True)
    i2i = search_all(site, [pb.SearchRequest(
        image=(corpus / r.path).read_bytes(), k=args.k, collection="image", diversify=False,
        filters=pb.Filters(exclude_patients=[pseudonym("patient", r.patient_id)])) for r in recs],
        "image->image")
    own = pid[:, None] == pid[None, :]
    served = {"i2i_ndcg@10": _cluster_mean_ci(ndcg_at_k(service_scores(i2i, ids, own), jac, args.k),
                                              pid, args.n_boot, 0)}
    rows = [_row("image->image nDCG@10", local["i2i_ndcg@10"], served["i2i_ndcg@10"])]
    if model.region_head is None:  # chest: report -> image and explanations
        # one query per study (its first image's report), as evaluate_split; a study whose
        # report is empty cannot be asked through the API, so both columns leave it out
        study = np.array([r.study_id or r.id for r in recs])
        _, first = np.unique(study, return_index=True)
        first = np.array([i for i in np.sort(first) if recs[i].report.strip()])
        t2i = search_all(site, [pb.SearchRequest(text=recs[i].report, k=args.k, collection="image",
                                                 diversify=False) for i in first], "report->image")
        served["t2i_ndcg@10"] = _cluster_mean_ci(ndcg_at_k(service_scores(t2i, ids), jac[first],
                                                           args.k), pid[first], args.n_boot, 0)
        rows.append(_row("report->image nDCG@10", local["t2i_ndcg@10_askable"], served["t2i_ndcg@10"]))
        names = set(concept_names())
        truth = {r.id: {n for n, v in zip(concept_names(), item_findings(r.report, r.labels)) if v}
                 & names for r in recs}
        served["explanations@10"] = explanation_precision(i2i, truth)
        le = local.get("explanations@10", {})
        rows.append(f"| explanation precision, top-10 hits | {le.get('precision', float('nan')):.3f} | "
                    f"{served['explanations@10']['precision']:.3f} | |")
    served["i2i_hits"] = [[(h.id, h.score) for h in r.hits] for r in i2i]
    return rows, served


def wrist_rows(args, train, test, local, site) -> tuple[list[str], dict]:
    """kNN fracture votes of every test image against the train split (the prior cases,
    ingested with their bone regions into a store of their own), global and per bone
    after the server's region rerank."""
    from medseek.demo_service import image_request, ingest
    from medseek.eval.region_diagnosis import summarise_votes
    from medseek.train.ablation import _patients

    corpus = Path(args.data)
    labels = local["region_diagnosis"]["majority"]["labels"]
    regions = [lab.removesuffix(" fracture") for lab in labels]
    archive = list(train.records)
    t0 = time.perf_counter()
    totals = ingest(site, corpus, archive, with_regions=True)
    print(f"ingested {totals['inserted']} prior cases with regions in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    y_of = {r.id: [lab in r.labels for lab in labels] for r in archive}
    recs = list(test.records)
    votes = {"global": np.zeros((len(recs), len(labels))), "region": np.zeros((len(recs), len(labels)))}

    def vote(resp) -> np.ndarray:
        hits = list(resp.hits)[:args.k]
        return np.mean([y_of[h.id] for h in hits], axis=0)

    glob = search_all(site, [_plain(image_request(corpus, r, args.k)) for r in recs], "kNN global")
    for q, resp in enumerate(glob):
        votes["global"][q] = vote(resp)
    for j, region in enumerate(regions):
        name = next(g.name for g in recs[0].regions if g.name.replace("_", " ") == region)
        reranked = search_all(site, [_plain(image_request(corpus, r, args.k, name)) for r in recs],
                              f"kNN {region} rerank")
        for q, resp in enumerate(reranked):
            votes["region"][q, j] = vote(resp)[j]
    y = np.array([[lab in r.labels for lab in labels] for r in recs], dtype=bool)
    served = {variant: summarise_votes(votes, y, _patients(test), labels,
                                       {key: np.array(v) for key, v in d["thresholds"].items()},
                                       args.n_boot, 0)
              for variant, d in local["region_diagnosis"].items()}
    rows = [_row(f"fracture kNN macro-F1, {variant} vote, {key}",
                 local["region_diagnosis"][variant][f"macro_f1_{key}"], d[f"macro_f1_{key}"])
            for variant, d in served.items() for key in ("global", "region", "delta")]
    return rows, {"region_diagnosis": served}


def _plain(req):
    """The request without diversification (the kNN vote is of the plain top k)."""
    req.diversify = False
    return req


def volume_rows(args, test, local, site) -> tuple[list[str], dict]:
    """chest-ct: report -> volume and organ sentence -> volume recall@5 through the API
    (an organ sentence's hit: any volume holding its findings at that site, as
    ``organ_sentence_queries`` defines it in process)."""
    from medseek.demo_service import ingest
    from medseek.serve.v1 import retrieval_pb2 as pb
    from medseek.train.ablation import _cluster_mean_ci, _patients, organ_sentence_queries

    corpus = Path(args.data)
    recs = list(test.records)
    pid = _patients(test)
    totals = ingest(site, corpus, recs)
    print(f"ingested {totals['inserted']} test volumes", flush=True)

    def recall_at_5(responses, own_ids) -> np.ndarray:
        return np.array([float(any(h.id == own for h in list(r.hits)[:5]))
                         for r, own in zip(responses, own_ids)])

    reports = search_all(site, [pb.SearchRequest(text=r.report, k=args.k, collection="volume",
                                                 diversify=False) for r in recs], "report->volume")
    served = {"t2i_recall@5": _cluster_mean_ci(recall_at_5(reports, [r.id for r in recs]), pid,
                                               args.n_boot, 0)}
    rows = [_row("report->volume R@5", local["t2i_recall@5"], served["t2i_recall@5"])]
    q_rows, q_text, relevant = organ_sentence_queries(test)
    if q_text:
        resp = search_all(site, [pb.SearchRequest(text=t, k=args.k, collection="volume",
                                                  diversify=False) for t in q_text],
                          "organ sentence->volume")
        ids = [r.id for r in recs]
        hit = np.array([float(any(relevant[q, ids.index(h.id)] for h in list(r.hits)[:5]
                                  if h.id in ids)) for q, r in enumerate(resp)])
        rows_i = np.asarray(q_rows)
        served["organ2v_recall@5"] = _cluster_mean_ci(hit, pid[rows_i], args.n_boot, 0)
        rows.append(_row("organ sentence->volume R@5", local["organ2v_recall@5"],
                         served["organ2v_recall@5"]))
    return rows, served


def main(argv: list[str] | None = None) -> int:
    import torch

    from medseek.demo_models import export_release
    from medseek.demo_service import RunningSite
    from medseek.eval.metrics import label_overlap_relevance, ndcg_at_k
    from medseek.models.release import load_release
    from medseek.train.ablation import (_cluster_mean_ci, _patients, choose_labels, evaluate_split,
                                        region_diagnosis)
    from medseek.train.data import PairDataset, load_tokenizer
    from medseek.train.loop import embed_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--release", default="chest-xr", help="shipped release name or card path")
    p.add_argument("--data", required=True, help="the release's corpus (train, val and test splits)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("-k", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)

    model = load_release(args.release)
    train = PairDataset.from_manifest(args.data, model.cfg, "train")
    test = PairDataset.from_manifest(args.data, model.cfg, "test")
    tok = load_tokenizer(model.cfg.text.max_length)
    t0 = time.perf_counter()
    local = evaluate_split(model, test, tok, choose_labels(train, test), n_boot=args.n_boot)
    if model.modality == "image" and model.region_head is None:
        # report -> image over the studies whose report can be asked through the API
        v, t = embed_dataset(model, test, tok)
        recs = list(test.records)
        y = test.label_matrix()
        study = np.array([r.study_id or r.id for r in recs])
        _, first = np.unique(study, return_index=True)
        first = np.array([i for i in np.sort(first) if recs[i].report.strip()])
        local["t2i_ndcg@10_askable"] = _cluster_mean_ci(
            ndcg_at_k(t[first] @ v.T, label_overlap_relevance(y, y, "jaccard")[first], args.k),
            _patients(test)[first], args.n_boot, 0)
    if model.region_head is not None:
        val = PairDataset.from_manifest(args.data, model.cfg, "val")
        local["region_diagnosis"] = region_diagnosis(model, train, test, val, n_boot=args.n_boot)
    print(f"in process: {time.perf_counter() - t0:.0f} s", flush=True)

    export_release(args.release, args.out / "repo")
    with RunningSite("quality", args.out / "repo", args.out / "service", model.modality) as site:
        if model.modality == "volume":
            rows, served = volume_rows(args, test, local, site)
        else:
            rows, served = image_rows(args, model, train, test, local, site)
    if model.region_head is not None:  # the prior cases in a store of their own
        with RunningSite("quality-archive", args.out / "repo", args.out / "service-archive",
                         "image") as site:
            more, diagnosis = wrist_rows(args, train, test, local, site)
        rows += more
        served.update(diagnosis)
    table = "\n".join(["| metric | in process | through gRPC + Triton | agree |",
                       "|---|---|---|---|", *rows])
    print(table)
    (args.out / "quality.json").write_text(json.dumps(
        {"release": str(args.release), "data": str(args.data), "in_process": local,
         "service": served}, indent=1, default=float))
    (args.out / "quality.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
