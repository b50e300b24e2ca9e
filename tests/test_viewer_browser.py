"""The browser viewer (``medseek/serve/static``) driven in headless Chromium by selenium,
against the real gateway and gRPC server (SQLite, FAISS, the in-process encoder) over an
archive of real radiographs (pydicom-data's chest and leg CR, downsampled to PNG) and real
DICOM files (pydicom's CT and MR slices).

Set ``MEDSEEK_VIEWER_PNG=some.png`` to also write the results page's screenshot there
(the test encoder is untrained, so its scores say nothing; the README's pictures, with the
shipped wrist model, come from ``docs/make_viewer_screenshot.py``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("grpc_health")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                "(pip install selenium; it is in the test extra)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("chromium and chromedriver are not installed (Debian: apt-get install -y "
                "chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from medseek.io import DeidConfig, read_image  # noqa: E402
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.config import ServeConfig  # noqa: E402
from medseek.serve.gateway import Gateway, GatewayConfig  # noqa: E402
from medseek.io import unit_intensity  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

from test_serve_api import REPORTS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

TOKEN = "viewer-token-0123456789"
WAIT_S = 60


def _radiograph(name: str, longest: int = 256) -> Image.Image:
    """A real pydicom-data radiograph as an 8-bit image, longest side ``longest``."""
    from pydicom.data import get_testdata_file

    unit = unit_intensity(read_image(get_testdata_file(name)).pixels)
    img = Image.fromarray((unit * 255).astype(np.uint8))
    scale = longest / max(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, list[pb.IngestItem]]:
    """Files named by their ids, and the items to ingest (with metadata and provenance)."""
    from pydicom.data import get_testdata_file

    root = tmp_path_factory.mktemp("viewer-archive")
    chest, leg = _radiograph("RG1_UNCR.dcm"), _radiograph("RG3_UNCR.dcm")
    pictures = {
        "cxr/chest-pa.png": (chest, "chest", "PA", ["effusion"]),
        "cxr/chest-mirrored.png": (chest.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "chest",
                                   "PA", ["cardiomegaly"]),
        "cxr/chest-crop.png": (chest.crop((16, 16, chest.width - 16, chest.height - 40)),
                               "chest", "AP", []),
        "msk/leg.png": (leg, "leg", "AP", ["fracture"]),
        "msk/leg-mirrored.png": (leg.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "leg", "AP", []),
    }
    items = []
    for n, (rel, (img, part, view, labels)) in enumerate(pictures.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / rel)
        w, h = img.size
        centre = pb.Box(x0=w * 0.3, y0=h * 0.3, x1=w * 0.7, y1=h * 0.7)
        items.append(pb.IngestItem(id=rel, image=(root / rel).read_bytes(), modality="CR",
                                   body_part=part, view=view, labels=labels,
                                   patient_pseudonym=f"PT-{n // 2:03d}",
                                   study_pseudonym=f"ST-{n:03d}",
                                   regions=[pb.Region(name="centre", box=centre)]))
    for name, part in (("CT_small.dcm", "head"), ("MR_small.dcm", "head")):
        rel = f"dicom/{name}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(name), root / rel)
        items.append(pb.IngestItem(id=rel, image=(root / rel).read_bytes(), body_part=part))
    items += [pb.IngestItem(id=i, text=t, modality="report", labels=lab, patient_pseudonym=p,
                            source_document=f"report-{i}") for i, (t, lab, p) in REPORTS.items()]
    return root, items


@pytest.fixture(scope="module")
def served(tmp_path_factory, archive):
    """(gateway, gRPC client) over the ingested archive; the server needs a token."""
    root, items = archive
    d = tmp_path_factory.mktemp("viewer-serve")
    cfg = ServeConfig(store_path=d / "store.db", index_dir=d / "index", port=0, tokens=(TOKEN,),
                      grace_s=1.0, deid=DeidConfig.development())
    with ServerThread(cfg, LocalTorchEncoder(seed=0)) as s, \
            RetrievalClient(f"127.0.0.1:{s.port}", token=TOKEN) as client:
        assert client.ingest(items).failed == 0
        with Gateway(GatewayConfig(f"127.0.0.1:{s.port}", root=root)) as gateway:
            yield gateway, client


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    # an explicit chromedriver: selenium-manager never looks for (or downloads) one
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser, gateway, token: str | None = TOKEN):
    browser.get(gateway.url + "/")
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.execute_script("return document.readyState") == "complete")
    field = browser.find_element(By.ID, "token")
    field.clear()
    if token:
        field.send_keys(token)
    browser.execute_script("document.getElementById('token').dispatchEvent(new Event('change'))")


def _set(browser, element_id: str, value: str) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def _search(browser) -> None:
    browser.find_element(By.ID, "search-btn").click()
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_element(By.ID, "search-btn").is_enabled()
        and d.find_element(By.ID, "summary").text != "searching\u2026")


def _cards(browser):
    return browser.find_elements(By.CSS_SELECTOR, "#results .hit-card")


def _error(browser) -> str:
    box = browser.find_element(By.ID, "error")
    return box.text if box.is_displayed() else ""


def test_text_search_shows_ranked_cards(browser, served):
    gateway, client = served
    _open(browser, gateway)
    _set(browser, "q-text", "pleural effusion")
    _set(browser, "k", "3")
    _search(browser)
    assert _error(browser) == ""
    cards = _cards(browser)
    want = client.search(pb.SearchRequest(text="pleural effusion", k=3))
    assert [c.get_attribute("data-id") for c in cards] == [h.id for h in want.hits]
    assert len(cards) == 3 and cards[0].get_attribute("data-id") == "r-effusion"
    first = cards[0].text
    assert "effusion" in first and "patient P1" in first and "source report-r-effusion" in first
    assert cards[0].find_element(By.CSS_SELECTOR, ".why").text.startswith("why: ")
    assert browser.find_element(By.ID, "summary").text.startswith("3 hits of ")


def test_image_upload_shows_hits_with_boxes_and_side_by_side(browser, served, archive,
                                                             tmp_path):
    gateway, client = served
    root, _ = archive
    query = root / "cxr" / "chest-pa.png"
    _open(browser, gateway)
    browser.find_element(By.ID, "q-file").send_keys(str(query))
    assert browser.find_element(By.ID, "kind-file").is_selected()
    _set(browser, "k", "4")
    _set(browser, "f-modality", "CR")
    _set(browser, "region-name", "centre")
    with Image.open(query) as im:
        w, h = im.size
    for name, value in zip(("box-x0", "box-y0", "box-x1", "box-y1"),
                           (w * 0.3, h * 0.3, w * 0.7, h * 0.7)):
        _set(browser, name, f"{value:.1f}")
    _search(browser)
    assert _error(browser) == ""
    cards = _cards(browser)
    want = client.search(pb.SearchRequest(
        image=query.read_bytes(), k=4, filters=pb.Filters(modality=["CR"]),
        region=pb.Region(name="centre", box=pb.Box(x0=w * 0.3, y0=h * 0.3, x1=w * 0.7,
                                                    y1=h * 0.7))))
    assert [c.get_attribute("data-id") for c in cards] == [hit.id for hit in want.hits]
    assert len(cards) == 4 and cards[0].get_attribute("data-id") == "cxr/chest-pa.png"
    for card in cards:  # each shows its file's pixels, with its matched region drawn
        img = card.find_element(By.CSS_SELECTOR, ".picture img")
        assert browser.execute_script("return arguments[0].naturalWidth", img) > 0
        assert card.find_elements(By.CSS_SELECTOR, ".box-overlay")
        assert "region centre" in card.text
    shot = tmp_path / "results.png"
    browser.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.size[0] > 0
    if os.environ.get("MEDSEEK_VIEWER_PNG"):
        _save_readme_picture(shot, Path(os.environ["MEDSEEK_VIEWER_PNG"]))

    cards[1].click()
    compare = browser.find_element(By.ID, "compare")
    WebDriverWait(browser, WAIT_S).until(
        lambda d: compare.is_displayed() and "loading" not in
        d.find_element(By.ID, "compare-hit").text)
    hit_pane = browser.find_element(By.ID, "compare-hit")
    assert want.hits[1].id in hit_pane.text and "patient" in hit_pane.text
    assert hit_pane.find_elements(By.CSS_SELECTOR, ".picture img")
    query_pane = browser.find_element(By.ID, "compare-query")
    assert query_pane.find_elements(By.CSS_SELECTOR, ".picture img")
    assert query_pane.find_elements(By.CSS_SELECTOR, ".box-overlay")  # the query's box
    assert "chest-pa.png" in query_pane.text
    browser.save_screenshot(str(tmp_path / "side-by-side.png"))


def _save_readme_picture(shot: Path, dest: Path) -> None:
    """The screenshot as an optimised palette PNG (small enough to commit)."""
    with Image.open(shot) as im:
        small = im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        small.save(dest, optimize=True)


def test_bad_inputs_show_the_error_in_the_page(browser, served, tmp_path):
    gateway, _ = served
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but nothing of an image follows")
    _open(browser, gateway)
    browser.find_element(By.ID, "q-file").send_keys(str(broken))
    _search(browser)
    error = _error(browser)
    assert error.startswith("INVALID_ARGUMENT: ") and "image" in error
    assert _cards(browser) == []

    browser.find_element(By.ID, "kind-text").click()
    _set(browser, "q-text", "effusion")
    _set(browser, "region-name", "centre")
    _set(browser, "box-x0", "3")  # a box with one corner only
    _search(browser)
    assert _error(browser).startswith("INVALID_ARGUMENT: region.box[1]: must be a number")

    _open(browser, gateway, token=None)  # the server's auth, passed through
    _set(browser, "q-text", "effusion")
    _search(browser)
    assert _error(browser) == "UNAUTHENTICATED: missing bearer token"
    assert "enter a token" in browser.find_element(By.ID, "stats").text
