"""Cost of the search stages after the ANN search, against the ANN search itself.

Sizes are the issue's: K' = 200 candidates -> k = 10 hits, dim 256 (global and region
embeddings), 14 finding concepts. Each stage is the library function, timed alone on
realistic inputs:

* ``ann[N]``: ``FaissIndex.search`` (exact flat, the default) of one query over N unit
  vectors, k = K' (the baseline, measured in the same run);
* ``region_rerank``: region cosines + alpha mix for K' candidates (10 % lack the region)
  and the stable sort of the new scores;
* ``diversify``: greedy MMR over K' candidates to k, default caps (1 patient, 1 study,
  2 documents) on provenance drawn from 50 patients / 100 studies / 40 documents, and a
  0.98 near-duplicate threshold;
* ``explain``: concept scores of the query and the k hits against 14 concept prompts, and
  the shared-concept ranking;
* ``pipeline[N]``: ``SearchPipeline.search`` end to end (filter, ANN, SQLite fetch of K'
  records with embeddings, region children fetch, rerank, diversify, explain) on a real
  store in tmp_path holding N images and one region child each.

Derived numbers: candidates/s = items handled / min time (K' for ann, rerank, diversify
and pipeline; k for explain), and t / t_ann = the stage's min time over the ANN search's
min time at the same N; and the same ratio of CPU times (``time.process_time`` per call
over extra calls), which moves less than wall time when other jobs share the cores.
``test_summary`` prints the table and the pipeline's own per-stage wall timings (median
over rounds). FAISS and BLAS are limited to one thread so that a single
query's latency is measured, not the machine's load.

Regression gate (``benchmarks/compare.py``): each benchmark records ``extra_info["ratio"]``
against a baseline timed once before each of its rounds (``bench_gate.paired``):
``ann[N]`` against the plain NumPy search of the same query (``gallery @ q`` and a top-K'
sort), every later stage against ``ann[20k]`` (ratio t_ann / t_stage, "higher is
faster"). ``region_rerank``, ``diversify`` and ``explain`` are in the CI ``quick`` tier
(``ann[N]``'s ratio to the memory-bound NumPy search moved 0.56x between two runs on the
loaded 2-core VM: too close to the tier's 0.5 floor).

    pytest benchmarks/test_search_stages.py -p no:cacheprovider
"""

from __future__ import annotations

import time

import faiss
import numpy as np
import pytest
from bench_gate import paired
from threadpoolctl import threadpool_limits  # installed with scikit-learn

from medseek.index.catalog import Catalog, CatalogConfig
from medseek.index.faiss_index import FaissIndex
from medseek.index.records import ItemRecord, StoreConfig
from medseek.index.store import Store
from medseek.search.diversify import DEFAULT_CAPS, diversify
from medseek.search.explain import ConceptBank, concept_scores, explain
from medseek.search.pipeline import SearchPipeline
from medseek.search.query import RegionQuery, SearchConfig
from medseek.search.rerank import region_rerank

DIM, K_PRIME, K, CONCEPTS = 256, 200, 10, 14
GALLERIES = {"20k": 20_000, "100k": 100_000}
STORE_N = "20k"  # the end-to-end case: ingesting 100k rows + children takes minutes here
_results: dict[str, dict[str, float]] = {}
_pipeline_timings: list[dict[str, float]] = []


def unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=-1, keepdims=True), dtype=np.float32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    with threadpool_limits(1, user_api="blas"):
        yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def gallery(rng):
    vectors = unit(rng.standard_normal((max(GALLERIES.values()), DIM)))
    query = unit(vectors[7] + 0.5 * unit(rng.standard_normal(DIM)))
    return vectors, query


def numpy_search(vectors: np.ndarray, query: np.ndarray, k: int):
    """The plain reference of an exact inner-product top-k: one GEMV and a partial sort."""
    scores = vectors @ query
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top], kind="stable")]


@pytest.fixture(scope="module")
def ann20k(gallery):
    """One ANN search over the 20k gallery: the in-run baseline of the later stages."""
    vectors, query = gallery
    n = GALLERIES["20k"]
    index = FaissIndex(DIM)
    index.add(np.arange(n, dtype=np.int64), vectors[:n])
    return lambda: index.search(query[None], K_PRIME)


@pytest.fixture(scope="module")
def candidates(rng, gallery):
    """K' candidates as the ANN returns them: sorted by score, with embeddings/provenance."""
    vectors, query = gallery
    index = FaissIndex(DIM)
    index.add(np.arange(GALLERIES["20k"], dtype=np.int64), vectors[:GALLERIES["20k"]])
    scores, ids = index.search(query[None], K_PRIME)
    embs = vectors[ids[0]]
    regions = unit(rng.standard_normal((K_PRIME, DIM)))
    regions[rng.random(K_PRIME) < 0.1] = np.nan
    prov = {"patient": [f"P{v}" for v in rng.integers(0, 50, K_PRIME)],
            "study": [f"S{v}" for v in rng.integers(0, 100, K_PRIME)],
            "document": [f"D{v}" for v in rng.integers(0, 40, K_PRIME)]}
    return dict(query=query, scores=scores[0].astype(np.float64), embs=embs, regions=regions,
                query_region=unit(rng.standard_normal(DIM)), prov=prov,
                concepts=unit(rng.standard_normal((CONCEPTS, DIM))))


def record(benchmark, name: str, items: int, run, cpu_calls: int) -> None:
    """Keep the wall times, and the CPU time per call of ``cpu_calls`` more calls."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    # CPU seconds of this process: unlike wall time, hardly moved by other processes
    # competing for the 2 cores (the wall-time minimum is the other load-robust number)
    cpu0 = time.process_time()
    for _ in range(cpu_calls):
        run()
    cpu = (time.process_time() - cpu0) / cpu_calls
    _results[name] = {"min": stats.stats.min, "median": stats.stats.median, "items": items,
                      "cpu": cpu}
    benchmark.extra_info.update({"items": items, "items_per_s": items / stats.stats.min,
                                 "cpu_s": cpu})


@pytest.mark.parametrize("size", list(GALLERIES))
def test_ann(benchmark, gallery, size):
    vectors, query = gallery
    n = GALLERIES[size]
    index = FaissIndex(DIM)
    index.add(np.arange(n, dtype=np.int64), vectors[:n])
    benchmark.group = "search-stages"
    def run():
        return index.search(query[None], K_PRIME)

    plain = vectors[:n]
    _, ids = paired(benchmark, run, lambda: numpy_search(plain, query, K_PRIME),
                    f"numpy search [{size}]", rounds=30, warmup_rounds=2)
    assert ids.shape == (1, K_PRIME) and ids[0, 0] == 7
    record(benchmark, f"ann[{size}]", K_PRIME, run, 30)


@pytest.mark.quick
def test_region_rerank(benchmark, candidates, ann20k):
    c = candidates

    def run():
        s = region_rerank(c["query_region"], c["regions"], c["scores"], 0.5)
        return np.argsort(-s, kind="stable")

    benchmark.group = "search-stages"
    order = paired(benchmark, run, ann20k, "ann[20k]", rounds=300, warmup_rounds=5)
    assert order.shape == (K_PRIME,)
    record(benchmark, "region_rerank", K_PRIME, run, 300)


@pytest.mark.quick
def test_diversify(benchmark, candidates, ann20k):
    c = candidates

    def run():
        return diversify(c["scores"], c["embs"], c["prov"], K, 0.7, DEFAULT_CAPS, 0.98)

    benchmark.group = "search-stages"
    out = paired(benchmark, run, ann20k, "ann[20k]", rounds=300, warmup_rounds=5)
    assert out.selected.size == K
    record(benchmark, "diversify", K_PRIME, run, 300)


@pytest.mark.quick
def test_explain(benchmark, candidates, ann20k):
    c = candidates
    names = [f"c{i}" for i in range(CONCEPTS)]

    def run():
        q = concept_scores(c["query"], c["concepts"])
        h = concept_scores(c["embs"][:K], c["concepts"])
        return explain(q, h, names, top=3)

    benchmark.group = "search-stages"
    assert len(paired(benchmark, run, ann20k, "ann[20k]", rounds=300, warmup_rounds=5)) == K
    record(benchmark, "explain", K, run, 300)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, rng, gallery):
    vectors, query = gallery
    n = GALLERIES[STORE_N]
    path = tmp_path_factory.mktemp("search-bench")
    store = Store(StoreConfig(path / "store.db"))
    records = [ItemRecord(f"img-{i}", "image", modality="CR",
                          patient_pseudonym=f"P{i // 4}", study_pseudonym=f"S{i // 2}",
                          source_document=f"D{i // 16}") for i in range(n)]
    store.upsert(records, vectors[:n])
    regions = [ItemRecord(f"img-{i}/radius", "region", parent_id=f"img-{i}",
                          region="distal_radius") for i in range(n)]
    store.upsert(regions, unit(rng.standard_normal((n, DIM))))
    catalog = Catalog(store, CatalogConfig(index_dir=path / "indexes"))
    catalog.open()
    bank = ConceptBank(tuple(f"c{i}" for i in range(CONCEPTS)),
                       unit(rng.standard_normal((CONCEPTS, DIM))))
    pipe = SearchPipeline(catalog, store, SearchConfig(k_prime=K_PRIME, k=K), concepts=bank)
    yield pipe, query, RegionQuery("distal_radius", unit(rng.standard_normal(DIM)))
    pipe.close()
    store.close()


def test_pipeline(benchmark, pipeline, ann20k):
    pipe, query, region = pipeline

    def run():
        return pipe.search("image", query, region=region)

    def timed():
        res = run()
        _pipeline_timings.append(res.timings)
        return res

    benchmark.group = "search-stages"
    res = paired(benchmark, timed, ann20k, "ann[20k]", rounds=30, warmup_rounds=2)
    assert len(res.hits) == K and res.candidates == K_PRIME
    assert sum(h.region_score is not None for h in res.hits) == K
    record(benchmark, f"pipeline[{STORE_N}]", K_PRIME, run, 30)


def test_summary(capsys):
    """Print candidates/s and t / t_ann of every stage (min wall times; CPU times)."""
    if "ann[20k]" not in _results:
        pytest.skip("benchmarks were not timed in this run")
    anns = {size: _results[f"ann[{size}]"] for size in GALLERIES if f"ann[{size}]" in _results}
    head = "".join(f"{'t / ann[' + s + ']':>15}" for s in anns)
    cpu_head = "".join(f"{'cpu / ann[' + s + ']':>17}" for s in anns)
    lines = [f"\nsearch stages: K'={K_PRIME} -> k={K}, dim {DIM}, {CONCEPTS} concepts; "
             f"1 FAISS/BLAS thread; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"{'stage':<16}{'min us':>10}{'median us':>11}{'items':>7}{'items/s':>12}{head}"
             f"{'cpu us':>10}{cpu_head}"]
    for name, r in _results.items():
        ratios = "".join(f"{r['min'] / a['min']:>14.3f}x" for a in anns.values())
        cpu_ratios = "".join(f"{r['cpu'] / a['cpu']:>16.3f}x" for a in anns.values())
        lines.append(f"{name:<16}{r['min'] * 1e6:>10.1f}{r['median'] * 1e6:>11.1f}"
                     f"{r['items']:>7}{r['items'] / r['min']:>12.3g}{ratios}"
                     f"{r['cpu'] * 1e6:>10.1f}{cpu_ratios}")
    if _pipeline_timings:
        med = {k: float(np.median([t[k] for t in _pipeline_timings]))
               for k in _pipeline_timings[0]}
        lines.append(f"pipeline[{STORE_N}] per-stage medians (us): " + ", ".join(
            f"{k} {v * 1e6:.0f}" for k, v in med.items()))
    with capsys.disabled():
        print("\n".join(lines))
