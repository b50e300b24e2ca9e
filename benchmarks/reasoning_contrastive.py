"""Contrastive evidence sets with abstention vs the plain kNN vote (issue 15, part 2).

Rerunnable: ``python benchmarks/reasoning_contrastive.py [--work DIR]`` (default
``runs/reasoning_contrastive``)
(``--wrist-corpus`` / ``--cxr-corpus`` reuse built corpora; missing ones are rebuilt from
the release cards' corpus specs with ``build_release_corpus``). Results go to
``<work>/results.{json,md}``, the curves to ``<work>/risk_coverage_<task>.png``, and the
val-calibrated thresholds to ``<work>/thresholds.json``.

Per task (synth-wrist with the ``wrist`` release: distal radius fracture vs none; synth-cxr
with the ``chest-xr`` release: pleural effusion vs atelectasis vs normal), the archive is
the train split, thresholds and ``beta`` are chosen on val, numbers are on test. Queries
are the val/test images whose labels support exactly one hypothesis.

Methods (every one answers its leading hypothesis at full coverage; its confidence orders
the risk-coverage curve):

* ``knn``: the service's vote (``medseek.search.diagnose``: top 10, weights
  softmax(score / 0.1)); a hypothesis' probability is the weight of the neighbours that
  support it; confidence = the winner's probability.
* ``similarity``: evidence sets of the m = 5 most similar items per hypothesis (no
  contrast, no diversity, no caps), the pairwise-margin decision; confidence = margin.
* ``diverse``: the same with MMR (lam 0.7) and the provenance caps (patient, study 1).
* ``contrastive``: ``diverse`` plus the rival-similarity penalty (beta chosen on val).

Confusable pairs (MediConfusion-style): pairs of test queries of different patients and
different true answers that the kNN vote answers the same (so kNN's set-level accuracy
there is 0 by construction), matched one-to-one from the most similar pair down;
set-level accuracy = both answered right. CIs: percentile bootstrap, 1000 resamples, over
patients (over pairs for the pair metrics); differences are paired on the same resamples.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from medseek.eval.selective import aurc, calibrate_threshold, risk_coverage, selective_accuracy
from medseek.search.contrastive import (Hypothesis, decide, hypothesis_membership,
                                        select_evidence)
from medseek.search.diagnose import vote_weights
from medseek.search.diversify import DEFAULT_CAPS

TASKS = {
    "synth-wrist": {"release": "wrist", "hypotheses": (
        Hypothesis("fracture", ("distal radius fracture",)), Hypothesis("none", ()))},
    "synth-cxr": {"release": "chest-xr", "hypotheses": (
        Hypothesis("effusion", ("pleural effusion",)), Hypothesis("atelectasis", ("atelectasis",)),
        Hypothesis("normal", ("normal",)))},
}
M, POOL, LAM, KNN_K, KNN_T = 5, 40, 0.7, 10, 0.1
BETAS = (0.25, 0.5, 1.0)
TARGET_RISK, COVERAGE = 0.10, 0.80
CAPS = {"patient": 1, "study": 1}


def embed_split(model, corpus: Path, split: str, cache: Path) -> dict:
    """Global embeddings, labels, patients and studies of one split (cached as .npz)."""
    from medseek.train.ablation import embed_images_and_regions
    from medseek.train.data import PairDataset

    ds = PairDataset.from_manifest(corpus, model.cfg, split=split)
    meta = {"labels": [list(r.labels) for r in ds.records],
            "patient": [r.patient_id or r.study_id or r.id for r in ds.records],
            "study": [r.study_id or r.id for r in ds.records]}
    if not cache.is_file():
        g, _ = embed_images_and_regions(model, ds)
        np.savez(cache, emb=g.astype(np.float32))
    emb = np.load(cache)["emb"].astype(np.float64)
    return {"emb": emb / np.linalg.norm(emb, axis=1, keepdims=True), **meta}


def knn_answers(sims: np.ndarray, member: np.ndarray, names: list[str]) -> tuple:
    """The plain vote for each query: (answer index, confidence)."""
    answer, conf = np.zeros(len(sims), dtype=np.int64), np.zeros(len(sims))
    for q, s in enumerate(sims):
        top = np.argsort(-s, kind="stable")[:KNN_K]
        w = vote_weights(s[top], KNN_K, weighted=True, temperature=KNN_T)
        probs = w @ member[top]  # (H,) weight of the neighbours supporting each hypothesis
        answer[q], conf[q] = int(np.argmax(probs)), float(probs.max())
    return answer, conf


def set_answers(sims: np.ndarray, archive: dict, member: np.ndarray, names: list[str], *,
                beta: float, lam: float, caps) -> tuple:
    """Evidence sets + pairwise-margin decision per query: (answer, margin, example)."""
    answer = np.full(len(sims), -1, dtype=np.int64)
    margin = np.full(len(sims), np.nan)
    clean = member & (member.sum(axis=1) == 1)[:, None]
    cols = [np.flatnonzero(clean[:, j]) for j in range(len(names))]
    example = None
    for q, s in enumerate(sims):
        cand = np.unique(np.concatenate(
            [c[np.argsort(-s[c], kind="stable")[:POOL]] for c in cols]))
        prov = {k: [archive[k][i] for i in cand] for k in ("patient", "study")}
        sets = select_evidence(s[cand], archive["emb"][cand], member[cand], names, prov, m=M,
                               pool=POOL, beta=beta, lam=lam, caps=caps)
        d = decide(sets, threshold=0.0)
        if d.leader is not None:
            answer[q], margin[q] = names.index(d.leader), d.margin
        if example is None:
            example = {"sets": {st.hypothesis: [int(cand[i]) for i in st.indices] for st in sets},
                       "margins": {f"{a}>{b}": v for (a, b), v in d.margins.items()}}
    return answer, margin, example


def methods_on(sims: np.ndarray, archive: dict, member: np.ndarray, names: list[str],
               beta: float) -> dict:
    """Answer and confidence of every method for queries with similarities ``sims``."""
    out = {"knn": knn_answers(sims, member, names)}
    for name, b, lam, caps in (("similarity", 0.0, 1.0, None), ("diverse", 0.0, LAM, CAPS),
                               ("contrastive", beta, LAM, CAPS)):
        a, c, _ = set_answers(sims, archive, member, names, beta=b, lam=lam, caps=caps)
        out[name] = (a, c)
    return out


def truth_of(split: dict, hyps) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose labels support exactly one hypothesis, and that hypothesis' index."""
    mem = hypothesis_membership(split["labels"], hyps)
    rows = np.flatnonzero(mem.sum(axis=1) == 1)
    return rows, mem[rows].argmax(axis=1)


def confusable_pairs(emb: np.ndarray, truth: np.ndarray, patients: np.ndarray,
                     knn_answer: np.ndarray) -> np.ndarray:
    """``(P, 2)`` disjoint test-query pairs the kNN vote confuses: different true answers,
    different patients, the same kNN answer; matched greedily from the most similar pair
    down, each query in at most one pair (so a few hard queries cannot fill the set)."""
    sims = emb @ emb.T
    i, j = np.triu_indices(len(emb), 1)
    ok = ((truth[i] != truth[j]) & (patients[i] != patients[j])
          & (knn_answer[i] == knn_answer[j]))
    i, j = i[ok], j[ok]
    used, pairs = set(), []
    for t in np.argsort(-sims[i, j], kind="stable"):
        a, b = int(i[t]), int(j[t])
        if a not in used and b not in used:
            used.update((a, b))
            pairs.append((a, b))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _ci(stat, clusters: np.ndarray, seed: int = 0) -> dict:
    from medseek.train.ablation import _cluster_stat_ci

    r = _cluster_stat_ci(stat, clusters, n_boot=1000, seed=seed)
    return {k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in r.items()}


def evaluate_task(task: str, corpus: Path, work: Path, log=print) -> dict:
    from medseek.models.release import load_release

    spec = TASKS[task]
    hyps, names = spec["hypotheses"], [h.name for h in spec["hypotheses"]]
    model = load_release(spec["release"])
    t0 = time.perf_counter()
    data = {s: embed_split(model, corpus, s, work / f"emb_{task}_{s}.npz")
            for s in ("train", "val", "test")}
    log(f"{task}: embedded in {time.perf_counter() - t0:.0f} s")
    archive = data["train"]
    member = hypothesis_membership(archive["labels"], hyps)
    queries = {}
    for s in ("val", "test"):
        rows, truth = truth_of(data[s], hyps)
        queries[s] = {"rows": rows, "truth": truth,
                      "sims": data[s]["emb"][rows] @ archive["emb"].T,
                      "patients": np.array(data[s]["patient"])[rows]}

    # beta on val (lowest val AURC of the contrastive method)
    v = queries["val"]
    by_beta = {}
    for b in BETAS:
        a, c, _ = set_answers(v["sims"], archive, member, names, beta=b, lam=LAM, caps=CAPS)
        by_beta[b] = aurc(c, a == v["truth"])
    beta = min(by_beta, key=by_beta.get)
    log(f"{task}: val AURC by beta {by_beta} -> beta {beta}")
    val = methods_on(v["sims"], archive, member, names, beta)
    t = queries["test"]
    t0 = time.perf_counter()
    test = methods_on(t["sims"], archive, member, names, beta)
    per_query_ms = (time.perf_counter() - t0) * 1e3 / max(len(t["rows"]), 1) / 4
    _, _, example = set_answers(t["sims"][:1], archive, member, names, beta=beta, lam=LAM,
                                caps=CAPS)
    truth, patients = t["truth"], t["patients"]
    pairs = confusable_pairs(data["test"]["emb"][t["rows"]], truth, patients, test["knn"][0])
    pair_ids = np.arange(len(pairs))

    res = {"hypotheses": {h.name: list(h.labels) for h in hyps}, "beta": beta,
           "val_aurc_by_beta": by_beta, "n_val": int(len(v["rows"])),
           "n_test": int(len(t["rows"])), "n_test_patients": int(len(np.unique(patients))),
           "test_truth_counts": {n: int((truth == j).sum()) for j, n in enumerate(names)},
           "n_confusable_pairs": int(len(pairs)), "ms_per_query_per_method": round(per_query_ms, 2),
           "example_first_test_query": example, "methods": {}}
    curves = {}
    for name, (ans, conf) in test.items():
        ok = ans == truth
        va, vc = val[name]
        cal = calibrate_threshold(vc, va == v["truth"], TARGET_RISK, min_answered=10)
        answered = np.nan_to_num(conf, nan=-np.inf) >= cal.threshold
        if name != "knn":
            answered &= np.nan_to_num(conf, nan=-np.inf) > 0  # the decision's own rule

        def cov_risk(idx, answered=answered, ok=ok):
            return np.mean(answered[idx]), (np.sum(answered[idx] & ~ok[idx])
                                            / max(np.sum(answered[idx]), 1))

        both = ok[pairs[:, 0]] & ok[pairs[:, 1]] if len(pairs) else np.zeros(0, bool)
        res["methods"][name] = {
            "accuracy": _ci(lambda i, ok=ok: float(np.mean(ok[i])), patients),
            "aurc": _ci(lambda i, c=conf, ok=ok: aurc(c[i], ok[i]), patients),
            f"selective_accuracy@{COVERAGE:.0%}": _ci(
                lambda i, c=conf, ok=ok: selective_accuracy(c[i], ok[i], COVERAGE), patients),
            "val_threshold": cal.threshold, "val_coverage": round(cal.coverage, 4),
            "val_risk": cal.risk,
            "test_coverage_at_val_threshold": _ci(lambda i: cov_risk(i)[0], patients),
            "test_risk_at_val_threshold": _ci(lambda i: cov_risk(i)[1], patients),
            "pair_set_accuracy": _ci(lambda i, b=both: float(np.mean(b[i])), pair_ids)
            if len(pairs) else None,
        }
        curves[name] = risk_coverage(conf, ok)
    for base in ("knn", "similarity"):
        for other in ("contrastive", "diverse"):
            (a0, c0), (a1, c1) = test[base], test[other]
            ok0, ok1 = a0 == truth, a1 == truth
            key = f"{other}-{base}"
            res.setdefault("differences", {})[key] = {
                "aurc": _ci(lambda i: aurc(c1[i], ok1[i]) - aurc(c0[i], ok0[i]), patients),
                f"selective_accuracy@{COVERAGE:.0%}": _ci(
                    lambda i: selective_accuracy(c1[i], ok1[i], COVERAGE)
                    - selective_accuracy(c0[i], ok0[i], COVERAGE), patients),
                "pair_set_accuracy": _ci(
                    lambda i: float(np.mean((ok1[pairs[i, 0]] & ok1[pairs[i, 1]]).astype(float)
                                            - (ok0[pairs[i, 0]] & ok0[pairs[i, 1]]))), pair_ids)
                if len(pairs) else None}
    plot_curves(curves, task, work / f"risk_coverage_{task}.png")
    return res


def plot_curves(curves: dict, task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (_, cov, risk) in curves.items():
        ax.step(cov, risk, where="post", label=name)
    ax.axhline(TARGET_RISK, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="coverage", ylabel="risk (error rate among answered)", xlim=(0, 1),
           title=f"{task}: risk-coverage (test)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ensure_corpus(task: str, given: str | None, work: Path) -> Path:
    """The given corpus, or the release card's corpus rebuilt under ``work``."""
    from medseek.train.release import RELEASES, build_release_corpus

    if given:
        return Path(given)
    return build_release_corpus(RELEASES[TASKS[task]["release"]]["corpus"],
                                work / f"corpus-{task}", progress=True)


def _fmt(d: dict | None) -> str:
    if not d:
        return "n/a"
    return f"{d['value']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def write_markdown(results: dict, path: Path) -> None:
    lines = []
    for task, r in results["tasks"].items():
        lines += [f"### {task} (beta {r['beta']}, n_test {r['n_test']} from "
                  f"{r['n_test_patients']} patients, {r['n_confusable_pairs']} confusable pairs)",
                  "", "| method | accuracy | AURC (lower better) | sel. acc @80 % | "
                  "val threshold (risk <= 10 %) | test coverage | test risk | pair set acc |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, m in r["methods"].items():
            lines.append(f"| {name} | {_fmt(m['accuracy'])} | {_fmt(m['aurc'])} | "
                         f"{_fmt(m['selective_accuracy@80%'])} | {m['val_threshold']:.4g} | "
                         f"{_fmt(m['test_coverage_at_val_threshold'])} | "
                         f"{_fmt(m['test_risk_at_val_threshold'])} | "
                         f"{_fmt(m['pair_set_accuracy'])} |")
        lines += ["", "| difference | AURC | sel. acc @80 % | pair set acc |", "|---|---|---|---|"]
        for key, d in r["differences"].items():
            lines.append(f"| {key} | {_fmt(d['aurc'])} | {_fmt(d['selective_accuracy@80%'])} | "
                         f"{_fmt(d['pair_set_accuracy'])} |")
        lines.append("")
    path.write_text("\n".join(lines))


def store_thresholds(thresholds: dict, store_path: Path, collection: str) -> None:
    """Write each task's calibrated threshold (and beta) into the store's meta table."""
    from medseek.index.store import Store, StoreConfig
    from medseek.serve.contrastive_service import save_calibration

    with Store(StoreConfig(store_path)) as store:
        for task, t in thresholds.items():
            if not np.isfinite(t["threshold"]):
                print(f"{task}: no threshold met the target risk; nothing stored")
                continue
            hyps = [Hypothesis(n, tuple(labels)) for n, labels in t["hypotheses"].items()]
            key = save_calibration(store, collection, hyps, t["threshold"], t["target_risk"],
                                   t["beta"], calibrated_on=f"{task} val")
            print(f"stored {key} = {t['threshold']:.4g}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/reasoning_contrastive")
    p.add_argument("--wrist-corpus", default=None, help="built synth-wrist release corpus")
    p.add_argument("--cxr-corpus", default=None, help="built synth-cxr release corpus")
    p.add_argument("--only", choices=sorted(TASKS), default=None)
    p.add_argument("--store", default=None,
                   help="also store each task's val-calibrated threshold in this SQLite store "
                        "(what `Diagnose` with these hypotheses then applies)")
    p.add_argument("--collection", default="image", help="--store: the collection it is for")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    given = {"synth-wrist": args.wrist_corpus, "synth-cxr": args.cxr_corpus}
    t0 = time.perf_counter()
    results = {"machine": platform.platform(), "settings": {
        "m": M, "pool": POOL, "lam": LAM, "caps": CAPS, "knn_k": KNN_K, "knn_temperature": KNN_T,
        "betas": BETAS, "target_risk": TARGET_RISK, "coverage": COVERAGE,
        "default_caps": dict(DEFAULT_CAPS)}, "tasks": {}}
    thresholds = {}
    for task in ([args.only] if args.only else list(TASKS)):
        r = evaluate_task(task, ensure_corpus(task, given[task], work), work)
        results["tasks"][task] = r
        thresholds[task] = {"hypotheses": r["hypotheses"], "beta": r["beta"],
                            "target_risk": TARGET_RISK,
                            "threshold": r["methods"]["contrastive"]["val_threshold"]}
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    (work / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (work / "thresholds.json").write_text(json.dumps(thresholds, indent=1))
    write_markdown(results, work / "results.md")
    if args.store:
        store_thresholds(thresholds, Path(args.store), args.collection)
    print((work / "results.md").read_text())
    print(f"wall {results['wall_s']} s; results in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
