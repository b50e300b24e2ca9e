"""Retrieval quality through the service, next to the same numbers computed in process.

For a shipped release (or a reproduced one) and the test split of its corpus:

* in process: the torch model embeds the test images and reports, scored with
  :func:`medseek.train.ablation.evaluate_split`'s protocol;
* through the service: the release is exported to a Triton repository, ``tritonserver``
  and the gRPC retrieval server start (the demo's :class:`RunningSite`), the test images
  are ingested through ``Ingest`` with pseudonymised patients, and every test image, then
  every study's report, queries through ``Search`` (k = 10, own patient excluded by the
  request's filter, no diversification). The returned ranks are scored with the same
  metric code. Explanations are the concepts the server returns per hit.

The two columns must agree within their confidence intervals::

    python benchmarks/quality.py --release chest-xr --data CORPUS --out runs/quality

``CORPUS`` is the release's corpus (``medseek train --release chest-xr`` builds it under
``OUT/corpus``; or ``medseek data build synth-cxr --skip 1000 --n 2000 --size 128``).
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


def main(argv: list[str] | None = None) -> int:
    import torch

    from medseek.demo_models import export_release
    from medseek.demo_service import RunningSite, ingest, pseudonym
    from medseek.eval.metrics import label_overlap_relevance, ndcg_at_k
    from medseek.models.release import load_release
    from medseek.serve.v1 import retrieval_pb2 as pb
    from medseek.text.concepts import concept_names
    from medseek.train.ablation import _cluster_mean_ci, _patients, choose_labels, evaluate_split
    from medseek.train.data import PairDataset, item_findings, load_tokenizer
    from medseek.train.loop import embed_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--release", default="chest-xr", help="shipped release name or card path")
    p.add_argument("--data", required=True, help="the release's corpus (train and test splits)")
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
    v, t = embed_dataset(model, test, tok)
    print(f"in process: {time.perf_counter() - t0:.0f} s", flush=True)

    recs = list(test.records)
    ids = [r.id for r in recs]
    pid = _patients(test)
    y = test.label_matrix()
    jac = label_overlap_relevance(y, y, "jaccard")
    # report -> image: one query per study (its first image's report), as evaluate_split;
    # a study whose report is empty cannot be asked through the API, so both columns
    # leave it out
    study = np.array([r.study_id or r.id for r in recs])
    _, first = np.unique(study, return_index=True)
    first = np.array([i for i in np.sort(first) if recs[i].report.strip()])
    local["t2i_ndcg@10"] = _cluster_mean_ci(ndcg_at_k(t[first] @ v.T, jac[first], args.k),
                                            pid[first], args.n_boot, 0)
    names = set(concept_names())
    truth = {r.id: {n for n, v in zip(concept_names(), item_findings(r.report, r.labels)) if v}
             & names for r in recs}
    corpus = Path(args.data)
    export_release(args.release, args.out / "repo")
    with RunningSite("quality", args.out / "repo", args.out / "service", "image") as site:
        t0 = time.perf_counter()
        totals = ingest(site, corpus, recs)
        print(f"ingested {totals['inserted']} test images in {time.perf_counter() - t0:.0f} s",
              flush=True)
        t0 = time.perf_counter()
        i2i = [site.client.search(pb.SearchRequest(
            image=(corpus / r.path).read_bytes(), k=args.k, collection="image", diversify=False,
            filters=pb.Filters(exclude_patients=[pseudonym("patient", r.patient_id)])),
            timeout=300.0) for r in recs]
        t2i = [site.client.search(pb.SearchRequest(
            text=recs[i].report, k=args.k, collection="image", diversify=False), timeout=300.0)
            for i in first]
        print(f"{len(i2i) + len(t2i)} queries in {time.perf_counter() - t0:.0f} s", flush=True)
    own = pid[:, None] == pid[None, :]
    served = {
        "i2i_ndcg@10": _cluster_mean_ci(ndcg_at_k(service_scores(i2i, ids, own), jac, args.k),
                                        pid, args.n_boot, 0),
        "t2i_ndcg@10": _cluster_mean_ci(ndcg_at_k(service_scores(t2i, ids), jac[first], args.k),
                                        pid[first], args.n_boot, 0),
        "explanations@10": explanation_precision(i2i, truth),
    }
    rows = []
    for metric in ("i2i_ndcg@10", "t2i_ndcg@10"):
        a, b = local[metric], served[metric]
        agree = a["lo"] <= b["value"] <= a["hi"] and b["lo"] <= a["value"] <= b["hi"]
        rows.append(f"| {metric} | {a['value']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] | "
                    f"{b['value']:.3f} [{b['lo']:.3f}, {b['hi']:.3f}] | {'yes' if agree else 'NO'} |")
    le = local.get("explanations@10", {})
    rows.append(f"| explanation precision, top-10 hits | {le.get('precision', float('nan')):.3f} | "
                f"{served['explanations@10']['precision']:.3f} | |")
    table = "\n".join(["| metric | in process | through gRPC + Triton | agree |",
                       "|---|---|---|---|", *rows])
    print(table)
    (args.out / "quality.json").write_text(json.dumps(
        {"release": str(args.release), "data": str(args.data), "in_process": local,
         "service": served, "queries": ids,
         "i2i_hits": [[(h.id, h.score) for h in r.hits] for r in i2i]}, indent=1, default=float))
    (args.out / "quality.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
