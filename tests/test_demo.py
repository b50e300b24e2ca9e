"""`medseek demo` end to end on small sizes: the README's main job must keep working."""

import sqlite3

from PIL import Image

from medseek.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--reports", "40", "--n", "2"]) == 0
    text = capsys.readouterr().out
    for step in range(1, 6):
        assert f"[{step}/5]" in text
    # every free-text query printed ranked hits with an explanation line
    assert text.count("query: ") == 4
    assert text.count("  1. CXR") == 4
    assert "nDCG@10" in text
    for sheet in ("synth-cxr", "synth-wrist", "synth-ct"):
        with Image.open(out / sheet / "contact_sheet.png") as im:
            assert im.width > 0 and im.height > 0
    with Image.open(out / "volume_chunks.png") as im:
        assert im.height > 8
    con = sqlite3.connect(out / "archive" / "medseek.sqlite")
    try:
        n_items = con.execute("SELECT COUNT(*) FROM items WHERE collection = 'report'").fetchone()[0]
    finally:
        con.close()
    assert 20 <= n_items <= 40
