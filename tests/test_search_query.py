"""The typed query: QueryOptions, RegionSpec and SearchQuery refuse bad values with an
InvalidQuery that names the request field, and resolve against the pipeline's config."""

import numpy as np
import pytest

from medseek.search.query import (MAX_K, Box, InvalidQuery, QueryOptions, RegionSpec,
                                  SearchConfig, SearchFilters, SearchQuery)


@pytest.mark.parametrize("kwargs, field, words", [
    (dict(k=0), "k", "must be >= 1, got 0"),
    (dict(k=-3), "k", "must be >= 1, got -3"),
    (dict(k=2.0), "k", "must be an int, got 2.0"),
    (dict(k=True), "k", "must be an int, got True"),
    (dict(k_prime=0), "k_prime", "must be >= 1, got 0"),
    (dict(mmr_lambda=1.5), "mmr_lambda", "must be in [0, 1], got 1.5"),
    (dict(mmr_lambda=-0.1), "mmr_lambda", "must be in [0, 1], got -0.1"),
    (dict(mmr_lambda=float("nan")), "mmr_lambda", "must be in [0, 1], got nan"),
    (dict(mmr_lambda="0.5"), "mmr_lambda", "must be a float in [0, 1], got '0.5'"),
    (dict(filters={"modality": "CR"}), "filters", "must be a SearchFilters, got dict"),
    (dict(diversify="yes"), "diversify", "must be a bool, got 'yes'"),
])
def test_query_options_errors_name_the_field(kwargs, field, words):
    with pytest.raises(InvalidQuery) as err:
        QueryOptions(**kwargs)
    assert err.value.field == field
    assert str(err.value) == f"{field}: {words}"
    assert isinstance(err.value, ValueError)


def test_query_options_resolve_against_the_config_and_hash():
    cfg = SearchConfig(k_prime=50, k=7, lam=0.6)
    assert QueryOptions().resolve(cfg) == QueryOptions(k=7, mmr_lambda=0.6, k_prime=50)
    # K' grows to k; explicit values win over the config's
    got = QueryOptions(k=80, mmr_lambda=0.25, k_prime=10, diversify=False).resolve(cfg)
    assert (got.k, got.k_prime, got.mmr_lambda, got.diversify) == (80, 80, 0.25, False)
    assert QueryOptions(mmr_lambda=np.float32(0.5)).mmr_lambda == 0.5
    assert isinstance(QueryOptions(k=np.int64(3)).k, int)
    # equal options are one micro-batch key; different MMR weights are different keys
    a = QueryOptions(k=5, filters=SearchFilters(modality=("CR",)), mmr_lambda=0.3)
    b = QueryOptions(k=5, filters=SearchFilters(modality=("CR",)), mmr_lambda=0.3)
    assert a == b and hash(a) == hash(b) and a != QueryOptions(k=5, mmr_lambda=0.3)
    assert len({QueryOptions(mmr_lambda=x / 10) for x in range(11)}) == 11


@pytest.mark.parametrize("make, field, words", [
    (lambda: SearchQuery(None, b""), "query",
     "one of text, image, volume or item_id is required"),
    (lambda: SearchQuery("audio", b""), "query",
     "one of text, image, volume or item_id is required"),
    (lambda: SearchQuery("text", "x", options=QueryOptions(k=MAX_K + 1)), "k",
     f"must be in [1, {MAX_K}], got {MAX_K + 1}"),
    (lambda: SearchQuery("text", 3), "text", "must be str, bytes or a memoryview, got int"),
    (lambda: SearchQuery("text", "x", options={"k": 3}), "options",
     "must be a QueryOptions, got dict"),
    (lambda: RegionSpec(""), "region.name", "must be non-empty"),
    (lambda: RegionSpec("liver", z_range=(9, 3)), "region.z_range",
     "z_start 9 must be before z_end 3"),
    (lambda: RegionSpec("liver", z_range=(4, 4)), "region.z_range",
     "z_start 4 must be before z_end 4"),
])
def test_search_query_errors_name_the_field(make, field, words):
    with pytest.raises(InvalidQuery) as err:
        make()
    assert err.value.field == field and str(err.value).startswith(f"{field}: {words}")


def test_search_query_keeps_what_was_asked_and_hides_content():
    q = SearchQuery("image", b"\x89PNG-secret", "image", QueryOptions(k=3),
                    RegionSpec("distal_radius", box=Box(1, 2, 30, 40)), request_id="r1")
    assert q.region.box.x1 == 30 and q.options.k == 3 and q.request_id == "r1"
    assert "secret" not in repr(q)
    assert RegionSpec("liver", z_range=(np.int64(2), 10)).z_range == (2, 10)
