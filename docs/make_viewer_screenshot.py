"""Make the README's viewer pictures with the shipped, trained wrist model.

``docs/viewer.png`` is the browser viewer's results page for a held-out wrist radiograph
with a distal radius fracture, searched with its ``distal radius`` box (the two-stage
region rerank), k = 8; ``docs/viewer-compare.png`` is the side-by-side view after clicking
the first hit. Both come from the real product path, nothing stubbed:

1. a synth-wrist corpus, seed 0 (``medseek data build synth-wrist --out DIR --n 200
   --seed 0``; the shipped wrist model was trained on seed 1, so these phantoms are
   unseen), built under ``--work`` unless ``--corpus`` names one already built;
2. the shipped wrist release (``medseek.models.release``) exported to a model repository,
   as ``medseek demo`` does, and served by the gRPC server with the in-process ONNX
   Runtime encoder (what ``medseek serve --encoder onnx --model-repo REPO`` runs);
3. the corpus's train and val images ingested with their labels, pseudonyms and
   bone-region boxes, from a JSONL manifest read by ``medseek ingest``'s own parser;
4. the HTTP gateway with its root at the corpus folder (thumbnails are the real files),
   driven by headless Chromium through selenium: upload the query, fill in k and the
   region, search, screenshot; click the first hit, screenshot.

The query is the first test-split PA view (by id) labelled ``distal radius fracture``.
The hits table is printed too, and the script fails if every score is the same (what an
untrained encoder gives) rather than write a picture that hides it.

Needs the ``serve``, ``onnx`` and ``test`` extras (selenium) and Debian's ``chromium`` and
``chromium-driver``. Rerun from the repository root::

    python docs/make_viewer_screenshot.py            # writes docs/viewer*.png
    python docs/make_viewer_screenshot.py --corpus /tmp/wrist0 --work /tmp/shot

Each PNG is quantised to a palette so that it stays under ``--max-kb`` (300 kB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REGION = "distal radius"
LABEL = "distal radius fracture"
K = 8
WAIT_S = 120
WINDOW = (1400, 1250)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path,
                   help="a synth-wrist corpus folder (with manifest.parquet) to reuse; "
                        "default: build one (200 studies, seed 0) under --work")
    p.add_argument("--work", type=Path,
                   help="scratch folder: corpus, model repository, store, browser profile "
                        "(default: a new temporary folder, removed afterwards)")
    p.add_argument("--out", type=Path, default=here,
                   help=f"where viewer.png and viewer-compare.png go (default {here})")
    p.add_argument("--max-kb", type=int, default=300, help="largest PNG size in kB")
    return p.parse_args(argv)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ corpus and model

def ensure_corpus(corpus: Path | None, work: Path) -> Path:
    """``corpus`` if it holds a manifest, else a fresh seed-0 synth-wrist corpus under
    ``work`` built by the ``medseek`` command itself."""
    if corpus is not None:
        if not (corpus / "manifest.parquet").is_file():
            raise SystemExit(f"--corpus {corpus}: no manifest.parquet there (build one with "
                             "`medseek data build synth-wrist --out DIR --n 200 --seed 0`)")
        return corpus
    out = work / "synth-wrist-200-seed0"
    if (out / "manifest.parquet").is_file():
        return out
    medseek = shutil.which("medseek", path=str(Path(sys.executable).parent)) \
        or shutil.which("medseek")
    if medseek is None:
        raise SystemExit("the `medseek` command is not on PATH (pip install -e '.[serve]')")
    log(f"building the corpus: medseek data build synth-wrist --out {out} --n 200 --seed 0")
    subprocess.run([medseek, "data", "build", "synth-wrist", "--out", str(out), "--n", "200",
                    "--seed", "0", "--quiet"], check=True)
    return out


def export_wrist(work: Path) -> Path:
    """The shipped wrist release exported to a model repository (reused when the one under
    ``work`` was made from the same weights)."""
    from medseek.demo_models import export_release
    from medseek.models.release import read_card

    sha = read_card("wrist")["sha256"]
    repo = work / "wrist-repo"
    stamp = repo / "release.sha256"
    if stamp.is_file() and stamp.read_text() == sha:
        return repo
    shutil.rmtree(repo, ignore_errors=True)
    log(f"exporting the shipped wrist release ({sha[:12]}…) to {repo}")
    export_release("wrist", repo)
    stamp.write_text(sha)
    return repo


# ------------------------------------------------------------------ archive and query

def write_ingest_manifest(corpus: Path, dest: Path) -> list:
    """A ``medseek ingest`` JSONL manifest of the corpus's train + val images (ids are
    their paths in the corpus, so the gateway's ``root`` finds the files); the test-split
    images are returned for choosing the query."""
    from medseek.data.manifest import read_manifest
    from medseek.demo_service import pseudonym

    rows = [r for r in read_manifest(corpus) if r.kind == "image"]
    with dest.open("w") as f:
        for r in rows:
            if r.split not in ("train", "val"):
                continue
            f.write(json.dumps({
                "id": r.path, "path": str((corpus / r.path).resolve()),
                "modality": r.modality, "body_part": r.body_part.lower(), "view": r.view,
                "labels": list(r.labels), "patient_pseudonym": pseudonym("patient", r.patient_id),
                "study_pseudonym": pseudonym("study", r.study_id),
                "source_document": pseudonym("document", r.source_id),
                "regions": [{"name": g.name, "box": list(g.box)} for g in r.regions
                            if g.box is not None]}) + "\n")
    return [r for r in rows if r.split == "test"]


def pick_query(test: list):
    """The first test-split PA image (by id) labelled with a distal radius fracture that
    has a ``distal radius`` box."""
    for r in sorted(test, key=lambda r: r.id):
        if LABEL in r.labels and r.view == "PA" and any(
                g.name == REGION and g.box is not None for g in r.regions):
            return r, next(g.box for g in r.regions if g.name == REGION)
    raise SystemExit(f"no test-split PA image labelled {LABEL!r} with a {REGION!r} box; "
                     "use a larger corpus")


def ingest(client, manifest: Path, batch: int = 32) -> int:
    """Stream the manifest's items to the server with ``medseek ingest``'s parser."""
    from medseek.serve.ingest_sources import iter_items

    items, n = [], 0
    for item in iter_items(manifest):
        items.append(item)
        if len(items) == batch:
            n += client.ingest(items).inserted
            items = []
    if items:
        n += client.ingest(items).inserted
    return n


# ------------------------------------------------------------------ browser

def open_browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if chromium is None or driver_bin is None:
        raise SystemExit("chromium and chromedriver are needed (Debian: apt-get install -y "
                         "chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--no-first-run",
                "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    # an explicit chromedriver: selenium-manager never looks for (or downloads) one
    driver = webdriver.Chrome(service=Service(executable_path=driver_bin), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    return driver


def _set(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def _images_loaded(driver, css: str) -> bool:
    return driver.execute_script(
        "const imgs = document.querySelectorAll(arguments[0]);"
        "return imgs.length > 0 && [...imgs].every(i => i.complete && i.naturalWidth > 0);", css)


def search_in_page(driver, url: str, query: Path, box) -> list:
    """Upload ``query`` with its region box and k; the hit cards once their pictures show."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.execute_script("return document.readyState") == "complete")
    driver.find_element(By.ID, "q-file").send_keys(str(query))
    _set(driver, "k", str(K))
    _set(driver, "region-name", REGION)
    for name, value in zip(("box-x0", "box-y0", "box-x1", "box-y1"), box):
        _set(driver, name, f"{value:.1f}")
    driver.find_element(By.ID, "search-btn").click()
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element(By.ID, "search-btn").is_enabled()
        and d.find_element(By.ID, "summary").text not in ("", "searching\u2026"))
    error = driver.find_element(By.ID, "error")
    if error.is_displayed() and error.text:
        raise SystemExit(f"the viewer shows an error: {error.text}")
    WebDriverWait(driver, WAIT_S).until(
        lambda d: _images_loaded(d, "#results .hit-card .picture img"))
    return driver.find_elements(By.CSS_SELECTOR, "#results .hit-card")


def open_compare(driver, card) -> None:
    """Click a hit card and wait for the side-by-side view with both pictures."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    card.click()
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element(By.ID, "compare").is_displayed()
        and "loading" not in d.find_element(By.ID, "compare-hit").text
        and _images_loaded(d, "#compare .picture img"))
    driver.execute_script("window.scrollTo(0, 0)")


def save_png(driver, dest: Path, max_kb: int) -> int:
    """The viewport as a palette PNG (fewer colours until it fits in ``max_kb``); its size."""
    import io

    from PIL import Image

    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    for colors in (128, 96, 64, 48, 32):
        buf = io.BytesIO()
        shot.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(buf, "PNG",
                                                                          optimize=True)
        if buf.tell() <= max_kb * 1000:
            break
    else:
        raise SystemExit(f"{dest}: {buf.tell() / 1000:.0f} kB even with 32 colours, over "
                         f"--max-kb {max_kb}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(buf.getvalue())
    return buf.tell()


# ------------------------------------------------------------------ main

def report_hits(resp, query) -> None:
    """The ranked hits on stdout; fail when every score is the same (untrained vision)."""
    print(f"query {query.path} ({', '.join(query.labels)}), region {REGION!r}, k={K}")
    for n, h in enumerate(resp.hits, 1):
        concepts = ", ".join(c.name for c in h.concepts[:3])
        print(f"{n:2d}  {h.score:.4f}  {h.id:44s} {', '.join(h.item.labels) or '(none)':40s}"
              f" why: {concepts}")
    scores = [round(h.score, 4) for h in resp.hits]
    fractures = sum(any("fracture" in lab for lab in h.item.labels) for h in resp.hits)
    print(f"{len(set(scores))} distinct scores of {len(scores)}; {fractures} of "
          f"{len(resp.hits)} hits carry a fracture label")
    if len(resp.hits) > 1 and len(set(scores)) == 1:
        raise SystemExit("every hit has the same score: the encoder is not the trained one")


def run(args: argparse.Namespace, work: Path) -> None:
    from medseek.encoders import OnnxRuntimeEncoder
    from medseek.io import DeidConfig
    from medseek.serve.client import RetrievalClient
    from medseek.serve.config import ServeConfig
    from medseek.serve.gateway import Gateway, GatewayConfig
    from medseek.serve.server import ServerThread
    from medseek.serve.v1 import retrieval_pb2 as pb

    corpus = ensure_corpus(args.corpus, work)
    repo = export_wrist(work)
    test = write_ingest_manifest(corpus, work / "ingest.jsonl")
    query, box = pick_query(test)
    query_path = (corpus / query.path).resolve()
    serve_dir = work / "serve"
    shutil.rmtree(serve_dir, ignore_errors=True)  # a fresh archive each run
    encoder = OnnxRuntimeEncoder(repo)
    cfg = ServeConfig(store_path=serve_dir / "store.sqlite", index_dir=serve_dir / "index",
                      port=0, model=encoder.spec.name, deid=DeidConfig.development(),
                      grace_s=2.0)
    with ServerThread(cfg, encoder) as server, \
            RetrievalClient(f"127.0.0.1:{server.port}") as client:
        t0 = time.perf_counter()
        n = ingest(client, work / "ingest.jsonl")
        log(f"ingested {n} images with their region boxes ({time.perf_counter() - t0:.1f} s)")
        report_hits(client.search(pb.SearchRequest(
            image=query_path.read_bytes(), k=K,
            region=pb.Region(name=REGION, box=pb.Box(x0=box[0], y0=box[1], x1=box[2],
                                                     y1=box[3])))), query)
        with Gateway(GatewayConfig(f"127.0.0.1:{server.port}", root=corpus)) as gateway:
            driver = open_browser(work / "chromium-profile")
            try:
                cards = search_in_page(driver, gateway.url, query_path, box)
                size = save_png(driver, args.out / "viewer.png", args.max_kb)
                log(f"wrote {args.out / 'viewer.png'} ({size / 1000:.0f} kB, {len(cards)} hits)")
                open_compare(driver, cards[0])
                size = save_png(driver, args.out / "viewer-compare.png", args.max_kb)
                log(f"wrote {args.out / 'viewer-compare.png'} ({size / 1000:.0f} kB)")
            finally:
                driver.quit()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        run(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="medseek-viewer-shot-") as tmp:
            run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
