"""Throughput of report understanding: evidence extraction and the MiniLM text tower.

Derived numbers (printed with ``-s``, and in ``extra_info`` of the JSON report):

* extraction: reports/s over the first ``N_REPORTS`` IU reports, with the sentence
  cache cleared before each round (``cold``: every sentence parsed) or kept (``warm``:
  boilerplate sentences hit the cache, as in a long ingest);
* MiniLM: texts/s for ``N_TEXTS`` report texts, the plain-torch tower against
  sentence-transformers on the same weights and thread count in the same run (ratio
  ``medseek / sentence-transformers`` in texts/s).

Regression gate (``benchmarks/compare.py``): ``extra_info["ratio"]`` is a speed-up against
a baseline timed once before each round (``bench_gate.paired``): ``cold`` extraction
against a plain regex word scan of the same reports (the least any pass over the text
costs), ``warm`` against ``cold`` (what the sentence cache buys), the medseek tower
against sentence-transformers, and sentence-transformers against ``GEMM_REPEAT`` torch.mm
of ``GEMM_N``³ (the machine's float32 speed). Extraction is in the CI ``quick`` tier.

    pytest benchmarks/test_text.py -p no:cacheprovider -s
"""

from __future__ import annotations

import os
import re

import pytest
from bench_gate import paired

N_REPORTS = 500
N_TEXTS = 64
GEMM_N, GEMM_REPEAT = 1024, 10
SCAN_REPEAT = 100
_WORD = re.compile(r"[a-z]+")


def word_scan(batch: list[str]) -> int:
    """Lower-case and split every report into words, SCAN_REPEAT times: the extraction's
    plain floor, repeated so that it lasts about as long as the extraction (a baseline
    far shorter than the path finds quiet moments on a loaded machine the path cannot)."""
    return sum(len(_WORD.findall(t.lower())) for _ in range(SCAN_REPEAT) for t in batch)


@pytest.fixture(scope="module")
def texts():
    from medseek.data.iu import load_iu_reports

    try:
        reports = load_iu_reports()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return [r.text for r in reports if r.text.strip()]


@pytest.mark.quick
@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_extract_evidence(benchmark, texts, cache):
    from medseek.text import evidence

    batch = texts[:N_REPORTS]

    def extract(clear: bool) -> int:
        if clear:
            evidence._analyse_sentence.cache_clear()
        return sum(len(evidence.extract_evidence(t)) for t in batch)

    if cache == "cold":
        baseline, vs = (lambda: word_scan(batch)), f"regex word scan x{SCAN_REPEAT}"
    else:
        baseline, vs = (lambda: extract(True)), "cold cache"
    n_evidence = paired(benchmark, lambda: extract(cache == "cold"), baseline, vs, rounds=5)
    assert n_evidence > len(batch)
    if getattr(benchmark, "stats", None) is None:  # --benchmark-disable: nothing timed
        return
    rate = len(batch) / benchmark.stats.stats.min
    benchmark.extra_info.update(reports_per_s=rate, evidence=n_evidence)
    print(f"\nextract_evidence[{cache}]: {rate:.0f} reports/s ({n_evidence} mentions)")


@pytest.fixture(scope="module")
def minilm_rates():
    return {}


@pytest.fixture(scope="module")
def minilm_runs(texts):
    """Encode N_TEXTS reports: medseek's tower, sentence-transformers, and a GEMM floor."""
    torch = pytest.importorskip("torch")
    from medseek.models.text_tower import TextEncoder, locate_minilm

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    batch = texts[:N_TEXTS]
    model = TextEncoder()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(locate_minilm()), device="cpu")
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    return {"medseek": lambda: model.encode(batch, batch_size=32),
            "sentence_transformers": lambda: ref.encode(batch, batch_size=32,
                                                        convert_to_numpy=True),
            "gemm": lambda: [torch.mm(a, b) for _ in range(GEMM_REPEAT)]}


@pytest.mark.parametrize("impl", ["medseek", "sentence_transformers"])
def test_minilm_encode(benchmark, texts, impl, minilm_rates, minilm_runs):
    batch = texts[:N_TEXTS]
    base = "sentence_transformers" if impl == "medseek" else "gemm"
    vs = ("sentence-transformers" if impl == "medseek"
          else f"{GEMM_REPEAT} x torch.mm {GEMM_N}^3 fp32")
    out = paired(benchmark, minilm_runs[impl], minilm_runs[base], vs, rounds=3)
    assert out.shape == (len(batch), 384)
    rate = len(batch) / benchmark.stats.stats.min
    minilm_rates[impl] = rate
    benchmark.extra_info["texts_per_s"] = rate
    line = f"\nminilm[{impl}]: {rate:.1f} texts/s"
    if len(minilm_rates) == 2:
        ratio = minilm_rates["medseek"] / minilm_rates["sentence_transformers"]
        line += f" (medseek / sentence-transformers = {ratio:.2f}x)"
    print(line)


QUERY_TEXTS = ("right pleural effusion", "enlarged heart", "no acute cardiopulmonary disease",
               "bibasilar atelectasis", "pneumothorax on the left", "pulmonary edema",
               "nodule in the right upper lobe", "the lungs are clear")
QUERY_REPEAT = 40


@pytest.fixture(scope="module")
def query_encoders(tmp_path_factory):
    """The report ranker's MiniLM as the server runs it (ONNX Runtime, one thread) and its
    torch reference (eager, one thread)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from medseek.encoders.minilm_onnx import OnnxTextEncoder
    from medseek.models.text_tower import TextEncoder

    torch.set_num_threads(1)
    return TextEncoder(), OnnxTextEncoder(threads=1, cache_dir=tmp_path_factory.mktemp("onnx"))


@pytest.mark.parametrize("batch", [1, 8])
def test_minilm_queries_onnx(benchmark, query_encoders, batch):
    """Short query texts, ``batch`` at a time (a light query's micro-batch), QUERY_REPEAT
    times: ONNX Runtime against eager torch (``ratio``: torch CPU time / ONNX Runtime's)."""
    torch_enc, onnx_enc = query_encoders
    texts = list(QUERY_TEXTS[:batch])
    out = paired(benchmark, lambda: [onnx_enc.encode(texts) for _ in range(QUERY_REPEAT)],
                 lambda: [torch_enc.encode(texts) for _ in range(QUERY_REPEAT)],
                 "torch TextEncoder, eager, 1 thread", rounds=5)
    assert out[0].shape == (batch, 384)
    per_text = benchmark.stats.stats.min / (QUERY_REPEAT * batch) * 1e3
    benchmark.extra_info["ms_per_text"] = per_text
    print(f"\nminilm queries, batch {batch}: ONNX Runtime {per_text:.2f} ms/text, "
          f"{benchmark.extra_info.get('ratio', float('nan')):.2f}x torch (CPU time)")
