"""The HTTP/JSON gateway (``medseek.serve.gateway``) in front of a real gRPC server (port 0,
SQLite, FAISS, the in-process encoder), called with urllib / http.client as a REST user
would: answers agree with the gRPC API's, auth and errors pass through, bodies are bounded.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("grpc_health")
from medseek.io import DeidConfig  # noqa: E402
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.config import ServeConfig  # noqa: E402
from medseek.serve.gateway import Gateway, GatewayConfig  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

from test_serve_api import REPORTS, nifti_bytes, png_bytes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

TOKEN = "gateway-token-0123456789"
LIMIT = 256 * 1024  # the gateway's body limit in these tests (a test volume is ~130 kB)
BOX = [12.0, 12.0, 36.0, 36.0]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """The folder the image and volume ids are paths in (as ``medseek ingest`` makes)."""
    root = tmp_path_factory.mktemp("archive")
    for pattern in ("gradient", "circle", "stripes", "checker"):
        (root / f"{pattern}.png").write_bytes(png_bytes(pattern))
    (root / "vol-a.nii").write_bytes(nifti_bytes(1))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, archive):
    d = tmp_path_factory.mktemp("gw-serve")
    cfg = ServeConfig(store_path=d / "store.db", index_dir=d / "index", port=0, tokens=(TOKEN,),
                      grace_s=1.0, deid=DeidConfig.development())
    with ServerThread(cfg, LocalTorchEncoder(seed=0)) as s:
        with RetrievalClient(f"127.0.0.1:{s.port}", token=TOKEN) as c:
            items = [pb.IngestItem(id=i, text=t, modality="report", labels=lab,
                                   patient_pseudonym=p, source_document=f"doc-{i}")
                     for i, (t, lab, p) in REPORTS.items()]
            for n, pattern in enumerate(("gradient", "circle", "stripes", "checker")):
                items.append(pb.IngestItem(
                    id=f"{pattern}.png", image=(archive / f"{pattern}.png").read_bytes(),
                    modality="CR", body_part="chest" if n < 3 else "hand", view="PA",
                    labels=["nodule"] if n % 2 else [], patient_pseudonym=f"P{n + 1}",
                    study_pseudonym=f"S{n + 1}",
                    regions=[pb.Region(name="centre", box=pb.Box(x0=12, y0=12, x1=36, y1=36))]))
            items.append(pb.IngestItem(id="vol-a.nii", volume=(archive / "vol-a.nii").read_bytes(),
                                       modality="CT", body_part="abdomen"))
            assert c.ingest(items).inserted == len(items)
            yield s, c


@pytest.fixture(scope="module")
def gateway(server, archive):
    s, _ = server
    cfg = GatewayConfig(f"127.0.0.1:{s.port}", max_body_bytes=LIMIT, root=archive)
    with Gateway(cfg) as g:
        yield g


def call(gateway, method: str, path: str, body=None, token: str | None = TOKEN,
         data: bytes | None = None, headers: dict | None = None):
    """(status, JSON answer, headers) of one request."""
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    if body is not None:
        data = json.dumps(body).encode()
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(gateway.url + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read()), err.headers


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_size(data_url: str) -> tuple[int, int]:
    assert data_url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))) as im:
        return im.size


def test_text_search_answers_what_the_grpc_api_answers(gateway, server):
    _, client = server
    status, got, _ = call(gateway, "POST", "/v1/search",
                          {"text": "pleural effusion", "k": 3, "diversify": True,
                           "request_id": "q1"})
    assert status == 200, got
    want = client.search(pb.SearchRequest(text="pleural effusion", k=3, diversify=True))
    assert [h["id"] for h in got["hits"]] == [h.id for h in want.hits]
    assert [h["score"] for h in got["hits"]] == pytest.approx([h.score for h in want.hits],
                                                               abs=1e-6)
    top = got["hits"][0]
    assert top["id"] == "r-effusion" and got["request_id"] == "q1"
    assert (top["item"]["patient_pseudonym"], top["item"]["source_document"]) == (
        "P1", "doc-r-effusion")
    assert top["item"]["labels"] == ["effusion"]
    assert [c["name"] for c in top["concepts"]] == [c.name for c in want.hits[0].concepts]
    assert top["concepts"]  # the explanation comes through
    assert 0.98 <= got["dup_threshold"] <= 1.0 and "thumbnail" not in top


def test_image_search_with_filters_region_and_thumbnails(gateway, server, archive):
    _, client = server
    image = (archive / "stripes.png").read_bytes()
    body = {"image": b64(image), "k": 5, "filters": {"body_part": ["chest"]},
            "region": {"name": "centre", "box": BOX}, "thumbnails": True, "preview": True}
    status, got, _ = call(gateway, "POST", "/v1/search", body)
    assert status == 200, got
    want = client.search(pb.SearchRequest(
        image=image, k=5, filters=pb.Filters(body_part=["chest"]),
        region=pb.Region(name="centre", box=pb.Box(x0=12, y0=12, x1=36, y1=36))))
    assert [h["id"] for h in got["hits"]] == [h.id for h in want.hits]
    assert len(got["hits"]) == 3 and got["hits"][0]["id"] == "stripes.png"
    assert {h["item"]["body_part"] for h in got["hits"]} == {"chest"}  # the filter applied
    for hit in got["hits"]:
        assert hit["matched_region"] == "centre" and hit["region_score"] is not None
        assert hit["region"] == {"name": "centre", "box": BOX, "z_range": None}
        thumb = hit["thumbnail"]
        assert (thumb["source"], thumb["width"], thumb["height"]) == ("file", 48, 48)
        assert png_size(thumb["png"]) == (160, 160)
    preview = got["query_preview"]
    assert (preview["source"], preview["width"]) == ("upload", 48)


def test_volume_search_and_item_thumbnails(gateway, archive):
    status, got, _ = call(gateway, "POST", "/v1/search",
                          {"volume": b64(nifti_bytes(1)), "k": 1, "preview": True,
                           "thumbnails": True, "thumbnail_size": 80, "preview_size": 64})
    assert status == 200, got
    assert got["hits"][0]["id"] == "vol-a.nii"
    shown = got["query_preview"]
    assert shown["depth"] == 24 and shown["slice"] == 12 and png_size(shown["png"]) == (64, 64)
    assert png_size(got["hits"][0]["thumbnail"]["png"]) == (80, 80)
    # a chunk: its id holds slashes; its picture is its parent's file at its z-range
    status, chunk, _ = call(gateway, "GET", "/v1/items/vol-a.nii%2Fchunk%2F0?size=96")
    assert status == 200, chunk
    assert (chunk["parent_id"], chunk["collection"], chunk["z_range"]) == ("vol-a.nii", "chunk",
                                                                          [0, 24])
    assert (chunk["thumbnail"]["source"], chunk["thumbnail"]["depth"]) == ("file", 24)
    assert png_size(chunk["thumbnail"]["png"]) == (96, 96)


def test_item_metadata_and_thumbnails(gateway):
    status, item, _ = call(gateway, "GET", "/v1/items/circle.png")
    assert status == 200, item
    assert (item["id"], item["collection"], item["body_part"], item["view"]) == (
        "circle.png", "image", "chest", "PA")
    assert (item["patient_pseudonym"], item["study_pseudonym"], item["labels"]) == (
        "P2", "S2", ["nodule"])
    assert item["thumbnail"]["source"] == "file" and len(item["content_sha256"]) == 64
    region = call(gateway, "GET", "/v1/items/circle.png/region/centre")[1]  # raw slashes too
    assert (region["parent_id"], region["box"]) == ("circle.png", BOX)
    report = call(gateway, "GET", "/v1/items/r-cardio")[1]
    assert report["thumbnail"]["source"] == "metadata"  # no file: a card of its metadata
    assert png_size(report["thumbnail"]["png"]) == (160, 160)
    assert "thumbnail" not in call(gateway, "GET", "/v1/items/r-cardio?thumbnail=false")[1]
    status, err, _ = call(gateway, "GET", "/v1/items/no-such-item")
    assert (status, err["code"]) == (404, "NOT_FOUND") and "no-such-item" in err["message"]
    status, err, _ = call(gateway, "GET", "/v1/items/r-cardio?size=9999")
    assert (status, err["code"]) == (400, "INVALID_ARGUMENT")
    assert err["message"].startswith("size:")


def test_thumbnails_never_read_outside_the_archive(gateway, archive):
    secret = archive.parent / "outside.png"
    secret.write_bytes(png_bytes("circle"))
    from medseek.serve.thumbnails import source_file

    class Item:
        parent_id = ""
        id = "../outside.png"

    assert secret.is_file() and source_file(archive, Item()) is None
    Item.id = "circle.png"
    assert source_file(archive, Item()) == (archive / "circle.png").resolve()


def test_stats_and_health(gateway, server):
    _, client = server
    status, got, _ = call(gateway, "GET", "/v1/stats")
    assert status == 200, got
    want = {c.name: c.items for c in client.stats().collections}
    assert {c["name"]: c["items"] for c in got["collections"]} == want
    assert want["image"] == 4 and got["last_seq"] == client.stats().last_seq
    assert call(gateway, "GET", "/healthz", token=None)[:2] == (200, {"status": "SERVING"})


def test_auth_is_the_servers(gateway):
    status, err, headers = call(gateway, "GET", "/v1/stats", token=None)
    assert (status, err["code"], err["message"]) == (401, "UNAUTHENTICATED",
                                                     "missing bearer token")
    assert headers["WWW-Authenticate"] == "Bearer"
    status, err, _ = call(gateway, "POST", "/v1/search", {"text": "effusion"}, token="wrong")
    assert (status, err["code"], err["message"]) == (401, "UNAUTHENTICATED",
                                                     "invalid bearer token")
    assert call(gateway, "GET", "/v1/items/r-cardio", token="wrong")[0] == 401


@pytest.mark.parametrize("body, field", [
    (b"{\"text\": ", "body"),
    (b"[1, 2]", "body"),
    ({"text": "effusion", "k": "ten"}, "k"),
    ({"text": "effusion", "k": -1}, "k"),
    ({"text": "effusion", "diversity": True}, "diversity"),
    ({"text": "effusion", "image": "AAAA"}, "query"),
    ({}, "query"),
    ({"image": "not base64!"}, "image"),
    ({"text": "effusion", "filters": {"modality": "CR"}}, "filters.modality"),
    ({"text": "effusion", "filters": {"site": ["x"]}}, "filters.site"),
    ({"text": "effusion", "region": {"name": "c", "box": [1, 2, 3]}}, "region.box"),
    ({"text": "effusion", "mmr_lambda": "high"}, "mmr_lambda"),
])
def test_bad_request_is_400_naming_the_field(gateway, body, field):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, err, _ = call(gateway, "POST", "/v1/search", data=data)
    assert (status, err["code"]) == (400, "INVALID_ARGUMENT"), err
    assert err["message"].startswith(f"{field}:"), err["message"]


def test_server_errors_keep_their_status_and_message(gateway):
    status, err, _ = call(gateway, "POST", "/v1/search",
                          {"image": b64(b"this is not an image at all")})
    assert (status, err["code"]) == (400, "INVALID_ARGUMENT")
    assert "image" in err["message"]
    status, err, _ = call(gateway, "POST", "/v1/search", {"item_id": "no-such-item"})
    assert (status, err["code"]) == (404, "NOT_FOUND")
    status, err, _ = call(gateway, "POST", "/v1/search", {"text": "effusion", "k": 5},
                          headers={"Content-Type": "text/plain"})
    assert (status, err["code"]) == (415, "INVALID_ARGUMENT")


def test_oversize_body_is_413_before_it_is_read(gateway):
    status, err, _ = call(gateway, "POST", "/v1/search",
                          {"image": b64(b"\0" * LIMIT)})  # 4/3 LIMIT once base64
    assert (status, err["code"]) == (413, "RESOURCE_EXHAUSTED")
    assert str(LIMIT) in err["message"]
    # a gigabyte announced and never sent: answered from the header alone
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/search")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(10**9))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["code"] == "RESOURCE_EXHAUSTED"
    finally:
        conn.close()
    assert call(gateway, "GET", "/healthz")[0] == 200  # and the gateway serves on


def test_viewer_files_are_served_with_a_strict_policy(gateway):
    with urllib.request.urlopen(gateway.url + "/", timeout=10) as resp:
        html = resp.read().decode()
        assert "medseek viewer" in html and "/static/app.js" in html
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    with urllib.request.urlopen(gateway.url + "/static/app.js", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/javascript")
    for path in ("/static/../gateway.py", "/static/missing.js", "/v2/search"):
        assert call(gateway, "GET", path)[:2][0] == 404


def test_config_refuses_a_public_host_and_bad_values():
    with pytest.raises(ValueError, match="not loopback"):
        GatewayConfig("127.0.0.1:1", host="0.0.0.0")
    with pytest.raises(ValueError, match="grpc_address"):
        GatewayConfig("nowhere")
    with pytest.raises(ValueError, match="max_body_bytes"):
        GatewayConfig("127.0.0.1:1", max_body_bytes=10)


def test_gateway_command_serves_until_terminated(server, tmp_path):
    s, _ = server
    port_file, log = tmp_path / "port", tmp_path / "gateway.log"
    medseek = Path(sys.executable).with_name("medseek")  # the installed console script
    with log.open("wb") as out, subprocess.Popen(
            [str(medseek), "gateway", "--grpc", f"127.0.0.1:{s.port}", "--port", "0",
             "--port-file", str(port_file)], stdout=out, stderr=subprocess.STDOUT) as proc:
        try:
            for _ in range(600):  # up to 60 s for the interpreter to start
                if port_file.exists() or proc.poll() is not None:
                    break
                try:
                    proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
            assert port_file.exists(), log.read_text()

            class Remote:
                url = f"http://127.0.0.1:{int(port_file.read_text())}"

            assert call(Remote, "GET", "/v1/stats")[0] == 200
            assert call(Remote, "GET", "/v1/stats", token=None)[0] == 401
        finally:
            proc.terminate()
            code = proc.wait(timeout=30)
    assert code == 0, log.read_text()
    assert "medseek gateway on http://127.0.0.1:" in log.read_text()


def test_serve_http_port_starts_and_stops_the_gateway(server, tmp_path, monkeypatch, capsys):
    from medseek.serve import commands

    s, _ = server
    seen = []

    def fake_serve(cfg, encoder, ready):  # the running test server stands in for serve()
        ready(None, s.port)
        url = capsys.readouterr().out.split("medseek gateway on ")[1].split()[0]

        class Remote:
            pass

        Remote.url = url
        seen.append((url, call(Remote, "GET", "/v1/stats")[0]))

    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")  # leave this process's BLAS alone
    monkeypatch.setattr(commands, "encoder_from_args", lambda args: None)
    monkeypatch.setattr("medseek.serve.server.serve", fake_serve)
    assert commands.main(["serve", "--store", str(tmp_path / "s.db"), "--index-dir",
                          str(tmp_path / "idx"), "--port", "0", "--http-port", "0"]) == 0
    (url, status), = seen
    assert url.startswith("http://127.0.0.1:") and status == 200
    with pytest.raises(urllib.error.URLError):  # stopped with the server
        urllib.request.urlopen(url + "/healthz", timeout=5)
