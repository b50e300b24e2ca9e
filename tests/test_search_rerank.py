"""Region-conditioned reranking (WristMIR second stage) and volume organ embeddings."""

import numpy as np
import pytest

from medseek.search.rerank import (mix_region_scores, organ_embedding, region_rerank,
                                   region_similarity)

NAN = np.nan
GLOBAL = np.array([0.9, 0.8, 0.7, 0.6])
QUERY = np.array([1.0, 0.0])
# candidate 0 region orthogonal to the query's, 1 identical, 2 missing, 3 at cos 0.8
REGIONS = np.array([[0.0, 1.0], [1.0, 0.0], [NAN, NAN], [0.8, 0.6]])


def order(scores):
    return np.argsort(-scores, kind="stable").tolist()


def test_alpha_changes_the_order():
    assert order(region_rerank(QUERY, REGIONS, GLOBAL, 0.0)) != order(
        region_rerank(QUERY, REGIONS, GLOBAL, 0.5))


def test_alpha_zero_keeps_global_scores_and_order():
    s = region_rerank(QUERY, REGIONS, GLOBAL, 0.0)
    np.testing.assert_array_equal(s, GLOBAL)
    assert order(s) == [0, 1, 2, 3]


def test_alpha_half_mixes_and_imputes_the_missing_region():
    s = region_rerank(QUERY, REGIONS, GLOBAL, 0.5, missing_penalty=0.1)
    # 0.5*cos + 0.5*global; missing: cos imputed as mean(0, 1, 0.8) - 0.1 = 0.5
    np.testing.assert_allclose(s, [0.45, 0.9, 0.6, 0.7], rtol=0, atol=1e-12)
    assert order(s) == [1, 3, 2, 0]


def test_alpha_one_is_region_only():
    s = region_rerank(QUERY, REGIONS, GLOBAL, 1.0, missing_penalty=0.1)
    np.testing.assert_allclose(s, [0.0, 1.0, 0.5, 0.8], rtol=0, atol=1e-12)
    assert order(s) == [1, 3, 2, 0]


def test_penalty_two_at_alpha_one_sinks_candidates_without_the_region():
    assert order(region_rerank(QUERY, REGIONS, GLOBAL, 1.0, missing_penalty=0.5)) == [1, 3, 2, 0]
    assert order(region_rerank(QUERY, REGIONS, GLOBAL, 1.0, missing_penalty=2.0)) == [1, 3, 0, 2]


def test_no_candidate_with_the_region_keeps_the_global_order():
    none = np.full((4, 2), np.nan)
    s = region_rerank(QUERY, none, GLOBAL, 0.7, missing_penalty=0.1)
    np.testing.assert_allclose(s, 0.3 * GLOBAL - 0.07, rtol=0, atol=1e-12)
    assert order(s) == [0, 1, 2, 3]


def test_present_mask_equals_nan_rows():
    filled = np.nan_to_num(REGIONS, nan=0.0)
    present = np.array([True, True, False, True])
    np.testing.assert_array_equal(
        region_rerank(QUERY, filled, GLOBAL, 0.5, present=present),
        region_rerank(QUERY, REGIONS, GLOBAL, 0.5))
    sims = region_similarity(QUERY, REGIONS.astype(np.float32))
    np.testing.assert_allclose(sims, [0.0, 1.0, NAN, 0.8], rtol=0, atol=1e-7)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="alpha must be in"):
        region_rerank(QUERY, REGIONS, GLOBAL, 1.5)
    with pytest.raises(ValueError, match="candidate_region_embs must be L2-normalised: row 3"):
        region_rerank(QUERY, np.array([[0, 1.0], [1, 0], [NAN, NAN], [2, 0]]), GLOBAL, 0.5)
    with pytest.raises(ValueError, match="candidate_region_embs must have 2 columns"):
        region_rerank(QUERY, np.ones((4, 3)) / np.sqrt(3), GLOBAL, 0.5)
    with pytest.raises(ValueError, match="global_scores must have shape"):
        mix_region_scores(np.zeros(4), np.zeros(3), 0.5)
    with pytest.raises(ValueError, match="global_scores must be finite"):
        mix_region_scores(np.zeros(2), np.array([0.1, np.inf]), 0.5)
    with pytest.raises(ValueError, match="missing_penalty must be finite and >= 0"):
        mix_region_scores(np.zeros(2), np.zeros(2), 0.5, missing_penalty=-1.0)
    with pytest.raises(TypeError, match="query_region_emb must have dtype"):
        region_rerank(np.array([1, 0]), REGIONS, GLOBAL, 0.5)


def test_organ_embedding_weights_chunks_by_slice_overlap():
    chunks = np.eye(3, dtype=np.float32)
    z = np.array([[0, 4], [4, 8], [8, 12]])  # half-open: slices 0-3, 4-7, 8-11
    # organ slices [2, 10): 2 slices of chunk 0, 4 of chunk 1, 2 of chunk 2
    expect = np.array([2.0, 4.0, 2.0]) / np.sqrt(24.0)
    np.testing.assert_allclose(organ_embedding(chunks, z, (2, 10)), expect, rtol=0, atol=1e-7)
    assert organ_embedding(chunks, z, (2, 10)).dtype == np.float32
    np.testing.assert_array_equal(organ_embedding(chunks, z, (5, 7)), [0, 1, 0])
    # z1 is exclusive: [4, 8) touches chunk 1 only, [3, 4) chunk 0 only
    np.testing.assert_array_equal(organ_embedding(chunks, z, (4, 8)), [0, 1, 0])
    np.testing.assert_array_equal(organ_embedding(chunks, z, (3, 4)), [1, 0, 0])
    assert organ_embedding(chunks, z, (12, 20)) is None
    with pytest.raises(ValueError, match="organ_z must be"):
        organ_embedding(chunks, z, (9, 2))
    with pytest.raises(ValueError, match="organ_z must be"):
        organ_embedding(chunks, z, (5, 5))  # empty
    with pytest.raises(ValueError, match="chunk_z must be an int array of shape"):
        organ_embedding(chunks, z[:2], (2, 10))
