"""Throughput of report understanding: evidence extraction and the MiniLM text tower.

Derived numbers (printed with ``-s``, and in ``extra_info`` of the JSON report):

* extraction: reports/s over the first ``N_REPORTS`` IU reports, with the sentence
  cache cleared before each round (``cold``: every sentence parsed) or kept (``warm``:
  boilerplate sentences hit the cache, as in a long ingest);
* MiniLM: texts/s for ``N_TEXTS`` report texts, the plain-torch tower against
  sentence-transformers on the same weights and thread count in the same run (ratio
  ``medseek / sentence-transformers`` in texts/s).

    pytest benchmarks/test_text.py -p no:cacheprovider -s
"""

from __future__ import annotations

import os

import pytest

N_REPORTS = 500
N_TEXTS = 64


@pytest.fixture(scope="module")
def texts():
    from medseek.data.iu import load_iu_reports

    try:
        reports = load_iu_reports()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return [r.text for r in reports if r.text.strip()]


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_extract_evidence(benchmark, texts, cache):
    from medseek.text import evidence

    batch = texts[:N_REPORTS]

    def run():
        if cache == "cold":
            evidence._analyse_sentence.cache_clear()
        return sum(len(evidence.extract_evidence(t)) for t in batch)

    n_evidence = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    rate = len(batch) / benchmark.stats.stats.min
    benchmark.extra_info.update(reports_per_s=rate, evidence=n_evidence)
    print(f"\nextract_evidence[{cache}]: {rate:.0f} reports/s ({n_evidence} mentions)")
    assert n_evidence > len(batch)


@pytest.fixture(scope="module")
def minilm_rates():
    return {}


@pytest.mark.parametrize("impl", ["medseek", "sentence_transformers"])
def test_minilm_encode(benchmark, texts, impl, minilm_rates):
    torch = pytest.importorskip("torch")
    from medseek.models.text_tower import TextEncoder, locate_minilm

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    batch = texts[:N_TEXTS]
    if impl == "medseek":
        model = TextEncoder()

        def run():
            return model.encode(batch, batch_size=32)
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        st = pytest.importorskip("sentence_transformers")
        ref = st.SentenceTransformer(str(locate_minilm()), device="cpu")

        def run():
            return ref.encode(batch, batch_size=32, convert_to_numpy=True)

    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert out.shape == (len(batch), 384)
    rate = len(batch) / benchmark.stats.stats.min
    minilm_rates[impl] = rate
    benchmark.extra_info["texts_per_s"] = rate
    line = f"\nminilm[{impl}]: {rate:.1f} texts/s"
    if len(minilm_rates) == 2:
        ratio = minilm_rates["medseek"] / minilm_rates["sentence_transformers"]
        line += f" (medseek / sentence-transformers = {ratio:.2f}x)"
    print(line)
