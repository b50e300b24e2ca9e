"""`medseek demo` end to end on small sizes, twice: the README's main job must keep working.

The first run builds the corpora, trains the three demo models for one step, exports them
and serves each through a real tritonserver and the real gRPC server; the second run must
take all of that from the cache. Both runs must leave no tritonserver behind.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from medseek.cli import main
from medseek.models.release import list_releases

pytest.importorskip("grpc")  # the [demo] extra
pytest.importorskip("tritonclient.grpc")

ARGS = ["--n-cxr", "12", "--n-wrist", "8", "--n-ct", "4", "--steps", "1", "--reports", "40",
        "-k", "5"]
# the chest model is the shipped release: exported, never trained by the demo
# every site builds its corpus and repository; only sites without a shipped release train
CACHED = ({"synth-cxr", "repo-chest-xr", "synth-wrist", "repo-wrist", "synth-ct", "repo-chest-ct",
           "iu-embeddings"}
          | {f"train-{site}" for site in ("chest-xr", "wrist", "chest-ct") if site not in list_releases()})
QUERY_KINDS = {
    "chest-xr": {"text->image 0", "text->image 1", "image -> image"},
    "wrist": {"image -> image", "region rerank"},
    "chest-ct": {"text->volume", "volume -> volume"},
}


def tritonservers_under(folder: Path) -> list[int]:
    """Pids of live tritonserver processes serving a repository inside ``folder``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\x00", b" ").decode(errors="replace")
        except OSError:
            continue
        if "tritonserver" in cmd and str(folder.resolve()) in cmd:
            pids.append(int(entry.name))
    return pids


def check_run(out: Path, text: str) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    for step in range(1, 7):
        assert f"[{step}/6]" in text
    untrained = [site for site in QUERY_KINDS if site not in list_releases()]
    assert ("barely trained" in text) == bool(untrained), untrained
    for site, kinds in QUERY_KINDS.items():
        got = summary["sites"][site]["queries"]
        assert kinds <= set(got), (site, got)
        assert all(n > 0 for n in got.values()), (site, got)
        ingest = summary["sites"][site]["ingest"]
        assert ingest["inserted"] == ingest["acks"] > 0
        for label, m in summary["sites"][site]["metrics"].items():
            for name in ("ndcg", "precision"):
                mean, lo, hi = m[name]
                assert all(math.isfinite(v) for v in (mean, lo, hi)), (site, label, m)
                assert 0.0 <= lo <= mean <= hi <= 1.0, (site, label, m)
            assert m["n_queries"] >= 1 and 0.0 <= m["chance_precision"] <= 1.0
        assert summary["sites"][site]["sheets"]
        for sheet in summary["sites"][site]["sheets"]:
            with Image.open(sheet) as im:
                im.load()
                assert im.width >= 2 * 160 and im.height > 160  # query and hits at least
    # the shipped chest model ranks: scores differ, and explanations differ between hits
    # whose labels differ (the collapsed wave-1 model scored every hit 1.000 and gave
    # every hit the same concepts)
    assert "shipped release chest-xr" in text and "model card" in text
    for label, hits in summary["sites"]["chest-xr"]["hits"].items():
        scores = [h["score"] for h in hits]
        assert max(scores) - min(scores) > 1e-3, (label, scores)
        by_labels = {tuple(sorted(h["labels"])): tuple(h["concepts"]) for h in hits}
        if len(by_labels) > 1 and any(by_labels.values()):
            assert len(set(by_labels.values())) > 1, (label, by_labels)
    # the wrist model stored region children and the rerank named its region
    assert summary["sites"]["wrist"]["ingest"]["collections"].get("region", 0) > 0
    assert "distal radius (" in text
    assert set(summary["sites"]["wrist"]["metrics"]) == {"global", "region rerank (distal radius)"}
    # reasoning over the retrieved cases: a grounded report draft of a held-out chest image,
    # and a contrastive wrist diagnosis that answers or abstains with its evidence sets
    draft = summary["sites"]["chest-xr"]["draft"]
    assert draft["sentences"] > 0 and draft["grounded"]
    assert (out / "reasoning" / "draft.txt").read_text().strip()
    contrastive = summary["sites"]["wrist"]["contrastive"]
    assert contrastive["calibration"]["n"] > 0, contrastive
    shown = [contrastive[k]["contrastive"] for k in ("answered", "abstained") if k in contrastive]
    assert shown and all(c["evidence_sets"] for c in shown), contrastive
    assert "margin threshold" in text
    auto = summary["sites"]["wrist"]["auto_regions"]  # boxes the server's localiser found
    assert auto["children"] > 0 and auto["mean_iou"] > 0.5 and auto["query_hits"] > 0, auto
    for name in ("MiniLM only", "MiniLM + side-aware concepts"):
        mean, lo, hi = summary["reports"][name]
        assert 0.0 <= lo <= mean <= hi <= 1.0
    assert text.count("query: ") == 4  # the IU report archive's free-text queries
    with Image.open(out / "volume_chunks.png") as im:
        assert im.height > 8
    con = sqlite3.connect(out / "archive" / "medseek.sqlite")
    try:
        n_items = con.execute("SELECT COUNT(*) FROM items WHERE collection = 'report'").fetchone()[0]
    finally:
        con.close()
    assert 20 <= n_items <= 40
    return summary


def test_demo_runs_end_to_end_then_from_the_cache(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *ARGS]) == 0
    first = check_run(out, capsys.readouterr().out)
    assert set(first["cache"]["misses"]) == CACHED and first["cache"]["hits"] == []
    assert tritonservers_under(out) == []
    assert not list((out / "cache").glob("repo-*/models/triton.pid"))

    assert main(["demo", "--out", str(out), *ARGS]) == 0
    second = check_run(out, capsys.readouterr().out)
    assert set(second["cache"]["hits"]) == CACHED and second["cache"]["misses"] == []
    assert tritonservers_under(out) == []


def test_demo_names_the_install_command_when_extras_are_missing(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytriton" else real(name, *a))
    with pytest.raises(SystemExit, match=r'nvidia-pytriton.*\n.*pip install "\.\[demo\]"'):
        main(["demo", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_cache_keys_change_with_the_config_and_stale_builds_are_replaced(tmp_path):
    from medseek.demo_models import Cache, corpus_spec, train_spec

    assert corpus_spec("synth-cxr", 12, 0) != corpus_spec("synth-cxr", 13, 0)
    assert corpus_spec("synth-cxr", 12, 0) != corpus_spec("synth-cxr", 12, 1)
    assert train_spec("demo-cxr", 1, "c") != train_spec("demo-cxr", 2, "c")
    assert train_spec("demo-cxr", 1, "c") != train_spec("demo-cxr", 1, "d")
    assert train_spec("demo-cxr", 1, "c") != train_spec("demo-wrist", 1, "c")
    assert train_spec("demo-cxr", 1, "c") == train_spec("demo-cxr", 1, "c")

    cache, built = Cache(tmp_path), []

    def build(folder):
        built.append(folder.name)
        (folder / "x").write_text("1")

    a = cache.get("thing", {"n": 1}, build)
    assert cache.get("thing", {"n": 1}, build) == a and len(built) == 1
    b = cache.get("thing", {"n": 2}, build)  # changed config: rebuilt, the stale one removed
    assert b != a and len(built) == 2 and not a.exists() and (b / "x").is_file()
    assert cache.hits == ["thing"] and cache.misses == ["thing", "thing"]
    # an interrupted build (no done.json) is not reused
    (b / "done.json").unlink()
    assert cache.get("thing", {"n": 2}, build) == b and len(built) == 3
    assert os.listdir(tmp_path) == [b.name]
