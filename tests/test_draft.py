"""Report drafts (CEMRAG): composition, metrics, the chat prompt and client, and ``Draft``
through the real gRPC server. Every report sentence here is written for these tests."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from medseek.eval.report_metrics import (bleu_from_stats, bleu_stats, ce_f1, finding_counts,
                                         rouge_l, tokens)
from medseek.search.draft import (NORMAL_SENTENCES, DraftSettings, RetrievedReport,
                                  compose_draft, concept_sentence)
from medseek.search.draft_prompt import SYSTEM_PROMPT, draft_messages, read_grounded_answer
from medseek.serve.draft_llm import ChatClient, DraftConfig

NEAR = RetrievedReport("case-a", 0.91, "The heart is enlarged. There is a small left pleural "
                                       "effusion. No pneumothorax. The lungs are clear. "
                                       "Osseous structures are intact.")
FAR = RetrievedReport("case-b", 0.80, "Heart size is normal. Right pleural effusion. Mild "
                                      "atelectasis at the left base. No pneumothorax.")
SCORES = {"cardiomegaly": 0.7, "pleural effusion": 0.5, "atelectasis": -0.3,
          "pneumothorax": -1.0, "opacity": -0.2, "nodule": -0.4, "normal": -0.5}


def _by_text(draft):
    return {s.text: s for s in draft.sentences}


# -- composition ----------------------------------------------------------------------------
def test_contradicted_sentences_are_dropped_with_the_reason():
    draft = compose_draft(SCORES, [NEAR, FAR])
    reasons = {d.text: (d.source_id, d.reason) for d in draft.dropped}
    assert reasons == {
        "Heart size is normal.": (
            "case-b", "denies cardiomegaly, which the image's concepts score present (0.70)"),
        "Right pleural effusion.": (
            "case-b", "states pleural effusion on the right; the image's evidence puts it "
                      "on the left"),
        "Mild atelectasis at the left base.": (
            "case-b", "asserts atelectasis, which the image's concepts score absent (-0.30)"),
    }
    said = _by_text(draft)
    assert "The heart is enlarged." in said and "Heart size is normal." not in said
    # flipping the concepts flips what survives
    flipped = compose_draft({**SCORES, "cardiomegaly": -0.6}, [NEAR, FAR])
    assert "The heart is enlarged." in {d.text for d in flipped.dropped}
    assert "Heart size is normal." in _by_text(flipped)


def test_every_sentence_names_its_report_and_the_concepts_behind_it():
    draft = compose_draft(SCORES, [NEAR, FAR])
    texts = {"case-a": NEAR.text, "case-b": FAR.text}
    for s in draft.sentences:
        if s.kind == "retrieved":
            assert s.text in texts[s.source_id]
        else:
            assert s.source_id == ""
        for c in s.support:  # no kept sentence goes against a scored concept
            if c.score is not None:
                assert (c.score > 0) == (c.stance == "present"), (s.text, c)
    said = _by_text(draft)
    eff = said["There is a small left pleural effusion."]
    assert (eff.source_id, eff.kind) == ("case-a", "retrieved")
    assert [(c.concept, c.score, c.stance) for c in eff.support] == [
        ("pleural effusion", 0.5, "present")]
    ptx = said["No pneumothorax."]  # the same denial in both reports: kept once, nearest's
    assert ptx.source_id == "case-a" and [c.concept for c in ptx.support] == ["pneumothorax"]
    assert sum(s.text == "No pneumothorax." for s in draft.sentences) == 1


def test_laterality_is_voted_by_the_reports_and_given_sides_win():
    draft = compose_draft(SCORES, [NEAR, FAR])
    assert draft.sides == {"pleural effusion": "left"}  # rank weights 1 vs 1/2
    swapped = compose_draft(SCORES, [FAR, NEAR])
    assert swapped.sides == {"pleural effusion": "right"}
    assert "Right pleural effusion." in _by_text(swapped)
    assert "There is a small left pleural effusion." in {d.text for d in swapped.dropped}
    given = compose_draft(SCORES, [NEAR, FAR], sides={"pleural effusion": "right"})
    assert "Right pleural effusion." in _by_text(given)
    # a report stating no side does not vote
    tie = compose_draft(SCORES, [RetrievedReport("x", 0.9, "Left pleural effusion."),
                                 RetrievedReport("y", 0.9, "Effusion noted."),
                                 RetrievedReport("z", 0.9, "Right pleural effusion.")])
    assert "pleural effusion" in tie.sides  # left (1) vs right (1/3): left
    # without a majority the side stays undecided: no sentence is dropped for its side
    assert tie.sides["pleural effusion"] == "left"
    # left 1, right 1/2 + 1/3, bilateral 1/4 of 2.08: no side has more than half
    even = compose_draft(SCORES, [RetrievedReport("x", 0.9, "Left pleural effusion."),
                                  RetrievedReport("z", 0.9, "Right pleural effusion."),
                                  RetrievedReport("w", 0.9, "Right effusion is small."),
                                  RetrievedReport("v", 0.9, "Bilateral effusions.")])
    assert "pleural effusion" not in even.sides and not even.dropped


def test_concept_templates_and_normal_sentences_fill_what_retrieval_does_not_say():
    draft = compose_draft(SCORES, [])  # concepts only
    assert [(s.kind, s.text) for s in draft.sentences] == [
        ("concept", "There is cardiomegaly."),
        ("normal", NORMAL_SENTENCES["mediastinum"]),
        ("normal", NORMAL_SENTENCES["lungs"]),
        ("concept", "There is pleural effusion."),
        ("normal", NORMAL_SENTENCES["bones"]),
    ]  # no heart or pleura normal sentence: a finding is present there
    with_side = compose_draft(SCORES, [], sides={"pleural effusion": "bilateral"})
    assert "There is bilateral pleural effusion." in _by_text(with_side)
    assert concept_sentence("nodule", "right") == "There is right nodule."
    # the retrieved lungs sentence replaces the normal one; bones are covered by case-a
    draft = compose_draft(SCORES, [NEAR])
    kinds = [(s.kind, s.text) for s in draft.sentences]
    assert ("retrieved", "The lungs are clear.") in kinds
    assert ("normal", NORMAL_SENTENCES["mediastinum"]) in kinds
    assert not any(t == NORMAL_SENTENCES["bones"] for _, t in kinds)
    # a present finding no report words gets its template, ordered in its group
    draft = compose_draft({**SCORES, "nodule": 0.9}, [NEAR])
    texts = [s.text for s in draft.sentences]
    # ("the lungs are clear" denies airspace findings, not a nodule: both stay, the
    # finding first within the lungs group)
    assert texts.index("There is nodule.") == texts.index("The lungs are clear.") - 1


def test_settings_and_unscored_findings():
    with pytest.raises(ValueError, match="absent_at_most"):
        DraftSettings(present_above=-0.5, absent_at_most=0.0)
    # an undecided band: a sentence about a finding inside it is neither dropped nor forced
    loose = DraftSettings(present_above=0.5, absent_at_most=-0.5)
    draft = compose_draft({"atelectasis": -0.3}, [FAR], settings=loose)
    (s,) = [s for s in draft.sentences if "atelectasis" in s.text]  # the nearest's word stands
    assert (s.text, s.source_id) == ("Mild atelectasis at the left base.", "case-b")
    assert not draft.dropped
    further = compose_draft({"atelectasis": -0.3}, [NEAR, FAR], settings=loose)
    assert not any("atelectasis" in s.text for s in further.sentences)  # not the nearest
    assert "There is atelectasis." not in {s.text for s in further.sentences}
    # a finding the image has no concept for is kept from the nearest report, flagged
    draft = compose_draft({"cardiomegaly": -1.0}, [RetrievedReport("n", 0.9, "Small hiatal hernia.")])
    (s,) = [s for s in draft.sentences if s.source_id == "n"]
    assert s.note == "not checked against the image: no concept for hiatal hernia"


# -- metrics --------------------------------------------------------------------------------
def test_bleu4_on_hand_made_examples():
    assert tokens("No  pleural-effusion.") == ["no", "pleural", "effusion"]
    same = "the heart is normal in size and the lungs are clear"
    assert bleu_from_stats(bleu_stats(same, same)) == pytest.approx(1.0)
    # candidate "the heart is large" vs reference "the heart is normal": 1-grams 3/4,
    # 2-grams 2/3, 3-grams 1/2, 4-grams 0/1 -> BLEU 0 without smoothing
    s = bleu_stats("the heart is large", "the heart is normal")
    np.testing.assert_array_equal(s, [3, 2, 1, 0, 4, 3, 2, 1, 4, 4])
    assert bleu_from_stats(s) == 0.0
    # summed over two reports: precisions 7/9, 5/7, 3/5, 1/3; c = 9 < r = 10
    total = s + bleu_stats("the lungs are clear today", "the lungs are clear today again")
    np.testing.assert_array_equal(total, [8, 6, 4, 2, 9, 7, 5, 3, 9, 10])
    want = np.exp(1 - 10 / 9) * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25
    assert bleu_from_stats(total) == pytest.approx(want, rel=1e-12)


def test_rouge_l_and_clinical_f1_on_hand_made_examples():
    # LCS of "a b c d" and "a c b d" is 3: P = R = 3/4 -> F = 3/4
    assert rouge_l("a b c d", "a c b d") == pytest.approx(0.75)
    # P = 2/2, R = 2/4 -> F = (1 + 1.44) * 0.5 / (0.5 + 1.44 * 1)
    assert rouge_l("a d", "a b c d") == pytest.approx(2.44 * 0.5 / (0.5 + 1.44))
    assert rouge_l("", "a") == 0.0
    findings = ("pleural effusion", "cardiomegaly", "atelectasis")
    c = finding_counts("Small left pleural effusion. No cardiomegaly.",
                       "Left effusion. The heart is enlarged. Possible atelectasis.", findings)
    # effusion: tp; cardiomegaly denied by the draft, asserted by the reference: fn;
    # atelectasis hedged by the reference: not asserted on either side
    np.testing.assert_array_equal(c, [[1, 0, 0], [0, 0, 1], [0, 0, 0]])
    f = ce_f1(c + finding_counts("Atelectasis.", "Clear lungs.", findings))
    assert f["micro_f1"] == pytest.approx(2 / (2 + 1 + 1))
    assert f["macro_f1"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)


# -- the chat prompt and the OpenAI-compatible client -----------------------------------
PROMPT_SCORES = {"pleural effusion": 0.52, "cardiomegaly": -0.31, "nodule": -0.9}
PROMPT_REPORTS = [RetrievedReport("r1", 0.9, "Left pleural effusion. Heart size is normal."),
                  RetrievedReport("r2", 0.75, "No  effusion.\nThe heart is enlarged.")]


def test_the_prompt_is_exactly_the_concept_enriched_context():
    draft = compose_draft(PROMPT_SCORES, PROMPT_REPORTS)
    messages = draft_messages(PROMPT_SCORES, PROMPT_REPORTS, draft)
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert messages[1] == {"role": "user", "content": (
        "Image concepts:\n"
        "- pleural effusion: 0.52 (present, left)\n"
        "- cardiomegaly: -0.31 (absent)\n"
        "\n"
        "Retrieved reports, nearest first:\n"
        "[r1] (similarity 0.900) Left pleural effusion. Heart size is normal.\n"
        "[r2] (similarity 0.750) No effusion. The heart is enlarged.\n"
        "\n"
        "Draft composed from them (revise it; keep what the evidence supports):\n"
        "Heart size is normal. [source: r1; concepts: cardiomegaly]\n"
        "The mediastinum is unremarkable. [source: concepts; concepts: ]\n"
        "The lungs are clear. [source: concepts; concepts: airspace disease, consolidation, "
        "density, infiltrate, opacity, pneumonia, pulmonary edema]\n"
        "Left pleural effusion. [source: r1; concepts: pleural effusion]\n"
        "No acute bony abnormality. [source: concepts; concepts: ]\n"
        "\n"
        "Write the findings of the report.")}
    assert len(messages) == 2


class _ChatServer:
    """A real local HTTP server speaking the OpenAI chat-completions JSON (stdlib)."""

    def __init__(self, answer: str, status: int = 200, hold: threading.Event | None = None):
        self.requests: list[tuple[dict, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((body, dict(self.headers), self.path))
                if hold is not None:
                    hold.wait(10)
                data = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": answer},
                     "finish_reason": "stop"}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_chat_client_against_a_real_local_http_server(tmp_path):
    answer = ("Left pleural effusion. [source: r1; concepts: pleural effusion]\n"
              "The heart is enlarged. [source: r2; concepts: cardiomegaly]\n"
              "No pneumothorax. [source: r9; concepts: pneumothorax]\n"
              "Bones are unremarkable.")
    key = tmp_path / "key"
    key.write_text("sk-test-123\n")
    with _ChatServer(answer) as srv:
        client = ChatClient(DraftConfig(generator="llm", endpoint=srv.url, model="tiny",
                                        api_key_file=key, timeout_s=10))
        draft = compose_draft(PROMPT_SCORES, PROMPT_REPORTS)
        messages = draft_messages(PROMPT_SCORES, PROMPT_REPORTS, draft)
        got = client.complete(messages)
        assert got == answer
        body, headers, path = srv.requests[0]
        assert path == "/v1/chat/completions"
        assert body["model"] == "tiny" and body["messages"] == messages
        assert body["temperature"] == 0 and body["max_tokens"] == 512
        assert headers["Authorization"] == "Bearer sk-test-123"
    read = read_grounded_answer(got, PROMPT_SCORES, PROMPT_REPORTS, draft.sides)
    assert [(s.text, s.source_id, s.kind, s.note) for s in read.sentences] == [
        ("Left pleural effusion.", "r1", "generated", ""),
        ("No pneumothorax.", "", "generated", "cites 'r9', which is not a retrieved report"),
        ("Bones are unremarkable.", "", "generated", "the model gave no grounding"),
    ]
    assert [(d.text, d.reason) for d in read.dropped] == [
        ("The heart is enlarged.",
         "asserts cardiomegaly, which the image's concepts score absent (-0.31)")]
    cited = read.sentences[1].support
    assert [(c.concept, c.score, c.stance) for c in cited] == [("pneumothorax", None, "absent")]


def test_chat_client_errors_name_what_went_wrong():
    with _ChatServer("x", status=500) as srv:
        with pytest.raises(ConnectionError, match="HTTP 500"):
            ChatClient(DraftConfig(endpoint=srv.url)).complete([])
        port = srv.httpd.server_address[1]
    with pytest.raises(ConnectionError, match="unreachable"):  # the server is gone
        ChatClient(DraftConfig(endpoint=f"http://127.0.0.1:{port}/v1", timeout_s=5)).complete([])
    hold = threading.Event()
    with _ChatServer("x", hold=hold) as srv:
        try:
            with pytest.raises(TimeoutError, match="no answer within 0.3 s"):
                ChatClient(DraftConfig(endpoint=srv.url, timeout_s=0.3)).complete([])
        finally:
            hold.set()
    with pytest.raises(ValueError, match="endpoint is required"):
        DraftConfig(generator="llm")
    with pytest.raises(ValueError, match="generator must be one of"):
        DraftConfig(generator="gpt")
    with pytest.raises(ValueError, match="http"):
        DraftConfig(endpoint="127.0.0.1:8080")


# -- the store keeps each item's report ---------------------------------------------------
def test_store_keeps_report_text_until_the_item_goes(tmp_path):
    from medseek.index import ItemRecord, Store, StoreConfig

    emb = np.eye(2, 4, dtype=np.float32)
    with Store(StoreConfig(tmp_path / "s.db")) as store:
        store.upsert([ItemRecord("a", "image", report_text="Left pleural effusion."),
                      ItemRecord("b", "image")], emb)
        assert store.report_texts(["a", "b", "zz"]) == {"a": "Left pleural effusion."}
        assert "effusion" not in repr(store.get(["a"])["a"].record)
        store.upsert([ItemRecord("a", "image")], emb[:1])  # replaced without a report
        assert store.report_texts(["a"]) == {}
        store.upsert([ItemRecord("b", "image", report_text="Clear lungs.")], emb[1:])
        store.delete(["b"])
        assert store.report_texts(["b"]) == {}
        n = store._con.execute("SELECT COUNT(*) FROM report_texts").fetchone()[0]
        assert n == 0  # nothing of a deleted item's report is left
    with pytest.raises(ValueError, match="report_text"):
        ItemRecord("c", "image", report_text="  ")


# -- Draft through the real gRPC server ---------------------------------------------------
grpc = pytest.importorskip("grpc")  # the [server] extra
pytest.importorskip("grpc_health")

SERVED = {"gradient": "The heart is enlarged. Small left pleural effusion. No pneumothorax.",
          "circle": "Heart size is normal. The lungs are clear. No pleural effusion.",
          "stripes": "Right lower lobe atelectasis. No pneumothorax. Bones are intact.",
          "checker": None}  # an image without a report


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from medseek.serve.client import RetrievalClient
    from medseek.serve.config import BatchConfig, ServeConfig
    from medseek.serve.local_encoder import LocalTorchEncoder
    from medseek.serve.server import ServerThread
    from medseek.serve.v1 import retrieval_pb2 as pb

    from test_serve_api import png_bytes

    d = tmp_path_factory.mktemp("draft")
    cfg = ServeConfig(store_path=d / "store.db", index_dir=d / "index", port=0, grace_s=2.0,
                      encode_batch=BatchConfig(max_wait_ms=10.0))
    with ServerThread(cfg, LocalTorchEncoder(seed=0)) as s, \
            RetrievalClient(f"127.0.0.1:{s.port}") as c:
        items = [pb.IngestItem(id=f"img-{p}", image=png_bytes(p), report=r or "",
                               patient_pseudonym=f"pt-{p}") for p, r in SERVED.items()]
        assert c.ingest(items).inserted == 4
        yield s, c, png_bytes


def test_draft_rpc_returns_grounded_sentences(served):
    from medseek.serve.v1 import retrieval_pb2 as pb

    _, client, png_bytes = served
    resp = client.draft(pb.DraftRequest(image=png_bytes("stripes"), k=4, request_id="d1"))
    assert resp.request_id == "d1" and resp.generator == "compose"
    assert [h.id for h in resp.neighbours][0] == "img-stripes" and len(resp.neighbours) == 4
    reports = [RetrievedReport(h.id, h.score, SERVED[h.id[4:]]) for h in resp.neighbours
               if SERVED[h.id[4:]]]
    scores = {c.name: c.score for c in resp.concepts}
    assert len(scores) > 14 and list(scores.values()) == sorted(scores.values(), reverse=True)
    # the server's draft is the composition of exactly these reports and concepts
    want = compose_draft(scores, reports)
    assert [(s.text, s.source_id, s.kind) for s in resp.sentences] == [
        (s.text, s.source_id, s.kind) for s in want.sentences]
    assert [(d.text, d.source_id, d.reason) for d in resp.dropped] == [
        (d.text, d.source_id, d.reason) for d in want.dropped]
    assert resp.text == want.text and resp.sentences
    for s in resp.sentences:
        if s.kind == "retrieved":
            assert s.text in SERVED[s.source_id[4:]]
        for c in s.support:
            assert c.HasField("score") and (c.score > 0) == (c.stance == "present")
    assert resp.timings_ms["draft"] >= 0


def test_draft_of_a_stored_item_and_bad_requests(served, tmp_path, capsys):
    from medseek.cli import main
    from medseek.serve.draft_commands import demo_step
    from medseek.serve.v1 import retrieval_pb2 as pb

    server, client, _ = served
    resp = client.draft(pb.DraftRequest(item_id="img-gradient", k=2))
    assert "img-gradient" not in [h.id for h in resp.neighbours] and len(resp.neighbours) == 2
    narrowed = client.draft(pb.DraftRequest(item_id="img-gradient", k=3, filters=pb.Filters(
        exclude_patients=["pt-circle"])))
    assert "img-circle" not in [h.id for h in narrowed.neighbours]
    for request, code, words in (
            (pb.DraftRequest(), grpc.StatusCode.INVALID_ARGUMENT, "query"),
            (pb.DraftRequest(item_id="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
            (pb.DraftRequest(item_id="img-stripes", collection="scans"),
             grpc.StatusCode.INVALID_ARGUMENT, "collection"),
            (pb.DraftRequest(item_id="img-stripes", collection="volume"),
             grpc.StatusCode.FAILED_PRECONDITION, "'volume' holds no items besides item_id"),
            (pb.DraftRequest(item_id="img-stripes", k=1, filters=pb.Filters(
                exclude_patients=["pt-gradient", "pt-circle"])),
             grpc.StatusCode.FAILED_PRECONDITION, "has a stored report")):
        with pytest.raises(grpc.RpcError) as err:
            client.draft(request)
        assert err.value.code() == code and words in err.value.details(), err.value.details()
    # still serving; of any 2 neighbours one has a report (only checker has none)
    assert client.draft(pb.DraftRequest(item_id="img-circle", k=2)).sentences
    # the command line and the demo step
    rc = main(["draft", "--item-id", "img-gradient", "-k", "2", "--server",
               f"127.0.0.1:{server.port}"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("draft (compose, 2 neighbours):")
    assert resp.sentences[0].text in out
    logged = []
    summary = demo_step(client, tmp_path / "demo", logged.append, item_id="img-gradient")
    assert summary["grounded"] and summary["sentences"] > 0
    assert json.loads((tmp_path / "demo" / "draft.json").read_text())["sentences"]
    assert logged and "draft of img-gradient" in logged[0]


def test_a_stored_item_is_not_drafted_from_its_own_study(served):
    """Another view of the same study carries the item's own report: a draft of the item
    by id must not retrieve it."""
    from medseek.serve.v1 import retrieval_pb2 as pb

    import io

    from PIL import Image

    def noise_png(seed: int) -> bytes:  # new content: not a duplicate of a stored image
        pixels = np.random.default_rng(seed).integers(0, 256, (48, 48), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue()

    _, client, png_bytes = served
    views = [pb.IngestItem(id=f"img-view-{v}", image=noise_png(seed), report=SERVED["circle"],
                           study_pseudonym="st-same")
             for v, seed in (("pa", 1), ("lat", 2))]
    assert client.ingest(views).inserted == 2
    try:
        resp = client.draft(pb.DraftRequest(item_id="img-view-pa", k=5))
        ids = [h.id for h in resp.neighbours]
        assert "img-view-lat" not in ids and "img-view-pa" not in ids and ids
        # an image query is not a stored item: its study is unknown, nothing is left out
        resp = client.draft(pb.DraftRequest(image=noise_png(2), k=6))
        assert "img-view-lat" in [h.id for h in resp.neighbours]
    finally:
        client.delete(["img-view-pa", "img-view-lat"])


def test_a_draft_never_asserts_and_denies_the_same_unscored_finding():
    """When the image has no concept for a finding, retrieved reports that disagree about
    it are not both kept: the nearer report's sentence stands, the other is dropped with
    the reason."""
    reports = [RetrievedReport("near", 0.9, "Patchy opacity in the right mid lung."),
               RetrievedReport("far", 0.8, "The lungs are clear without opacity. "
                                           "No pleural effusion.")]
    draft = compose_draft({}, reports)
    texts = [s.text for s in draft.sentences]
    assert "Patchy opacity in the right mid lung." in texts
    assert "The lungs are clear without opacity." not in texts
    assert "No pleural effusion." in texts  # no clash: kept
    why = {d.text: d.reason for d in draft.dropped}
    assert why["The lungs are clear without opacity."].startswith("denies opacity, which a "
                                                                 "nearer report's sentence")
    # the other way round: a nearer denial keeps a farther assertion out
    draft = compose_draft({}, reports[::-1])
    texts = [s.text for s in draft.sentences]
    assert "The lungs are clear without opacity." in texts
    assert "Patchy opacity in the right mid lung." not in texts
