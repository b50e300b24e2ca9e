"""Shared setup of the benchmarks: the ``quick`` tier is tagged in the JSON report.

``benchmarks/compare.py --tier quick`` expects exactly the baseline's benchmarks tagged
``"tier": "quick"``, so the tag is written from the marker rather than kept by hand.
A module may also name single parametrised cases of the tier in ``QUICK`` (test names
as pytest shows them, e.g. ``"test_pipeline[small-medseek_fused]"``) where a marker on
one parameter would pull in every combination with the others.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if item.name in getattr(item.module, "QUICK", ()):
            item.add_marker(pytest.mark.quick)


@pytest.fixture(autouse=True)
def _tag_tier(request):
    """``extra_info["tier"] = "quick"`` on benchmarks marked ``quick``."""
    if "benchmark" in request.fixturenames and request.node.get_closest_marker("quick"):
        request.getfixturevalue("benchmark").extra_info["tier"] = "quick"
