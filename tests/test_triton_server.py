"""The real tritonserver (pytriton wheel, python backend + ONNX Runtime) on a repository
exported from the tiny models: same embeddings as in process and as torch, dynamic
batching, per-request errors, and a client that survives a server crash and restart.

One server for the module; the crash test runs last and leaves a restarted server."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from medseek.encoders import (Encoder, EncoderInputError, EncoderSpec, EncoderTimeout,
                              EncoderUnavailable, OnnxRuntimeEncoder, TritonEncoder)
from medseek.encoders.preprocess import tokenize
from medseek.encoders.triton_client import TritonEncoderConfig
from medseek.export.repository import write_repository
from medseek.models import create_model
from medseek.serve.triton import TritonServer, TritonServerConfig

MIN_COS = 0.9999


def row_cos(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(1)
    return create_model("cxr-tiny").eval(), create_model("ct-tiny").eval()


@pytest.fixture(scope="module")
def repo(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton-repo")
    write_repository(list(models), out)
    return out


@pytest.fixture(scope="module")
def server(repo):
    srv = TritonServer(TritonServerConfig(repo, startup_timeout=180))
    srv.start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def image_client(server, repo):
    enc = TritonEncoder(TritonEncoderConfig(server.grpc_url, batch_size=4),
                        EncoderSpec.load(repo / "image_encoder" / "1" / "spec.json"))
    yield enc
    enc.close()


@pytest.fixture(scope="module")
def volume_client(server, repo):
    enc = TritonEncoder(TritonEncoderConfig(server.grpc_url),
                        EncoderSpec.load(repo / "volume_encoder" / "1" / "spec.json"))
    yield enc
    enc.close()


def test_images_equal_in_process_and_torch(models, repo, image_client):
    x = np.random.default_rng(0).standard_normal((11, 1, 64, 64)).astype(np.float32)
    assert isinstance(image_client, Encoder) and image_client.dim == 32
    got = image_client.encode_images(x)  # 3 requests of <= 4 rows
    local = OnnxRuntimeEncoder(repo, "image").encode_images(x)
    with torch.inference_mode():
        ref = models[0].encode_image(torch.from_numpy(x)).numpy()
    assert got.shape == (11, 32) and got.dtype == np.float32
    assert row_cos(got, local).min() >= MIN_COS
    assert row_cos(got, ref).min() >= MIN_COS


def test_volumes_equal_in_process_and_torch(models, repo, volume_client):
    rng = np.random.default_rng(1)
    vols = [rng.random((20, 32, 32), dtype=np.float32), rng.random((45, 16, 24), dtype=np.float32),
            rng.random((3, 32, 32), dtype=np.float32)]
    got = volume_client.encode_volumes(vols)
    local = OnnxRuntimeEncoder(repo, "volume").encode_volumes(vols)
    with torch.inference_mode():
        ref = np.stack([models[1].encode_volume_array(v).volume.numpy() for v in vols])
    assert row_cos(got, local).min() >= MIN_COS
    assert row_cos(got, ref).min() >= MIN_COS


def test_texts_equal_in_process_and_torch(models, repo, image_client):
    texts = ["", "No acute disease.", "Right upper lobe mass. " * 20, "épanchement pleural"]
    got = image_client.encode_texts(texts)  # tokenised inside the server (text_ensemble)
    local_enc = OnnxRuntimeEncoder(repo, "image")
    ids, mask = tokenize(local_enc.tokenizer, texts)
    with torch.inference_mode():
        ref = models[0].encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert row_cos(got, local_enc.encode_texts(texts)).min() >= MIN_COS
    assert row_cos(got, ref).min() >= MIN_COS


def test_concurrent_requests_are_batched(image_client):
    before = image_client.statistics("image_encoder")["model_stats"][0]
    x = np.random.default_rng(2).standard_normal((2, 1, 64, 64)).astype(np.float32)
    want = image_client.encode_images(x)
    errors, results = [], []

    def worker():
        try:
            for _ in range(4):
                results.append(image_client.encode_images(x))
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 64 and all(row_cos(r, want).min() >= MIN_COS for r in results)
    after = image_client.statistics("image_encoder")["model_stats"][0]
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert inferences == 2 * 64 + 2
    assert executions < 64  # 65 requests of 2 rows ran in fewer model executions
    assert max(int(b["batch_size"]) for b in after["batch_stats"]) > 2


def test_bad_inputs_get_clear_errors_and_the_server_keeps_serving(image_client, volume_client):
    x = np.zeros((2, 1, 64, 64), np.float32)
    # wrong image size: rejected by the server itself (the config's dims are the model's)
    with pytest.raises(EncoderInputError,
                       match=r"unexpected shape for input 'images'.*Expected \[-1,1,64,64\]"):
        image_client.run_graph("image", {"images": np.zeros((2, 1, 32, 32), np.float32)},
                               ["embeddings"])
    # wrong dtype: rejected by the server before the model
    with pytest.raises(EncoderInputError, match="INT32.*expects 'FP32'"):
        image_client.run_graph("image", {"images": x.astype(np.int32)}, ["embeddings"])
    # tokens and positions disagree on N
    with pytest.raises(EncoderInputError, match="dim 'tokens' of input 'positions' is 6 but 5"):
        volume_client.run_graph("chunks", {"tokens": np.zeros((1, 5, 256), np.float32),
                                           "positions": np.zeros((1, 6, 3), np.int32),
                                           "token_mask": np.ones((1, 5), bool)}, ["chunk_features"])
    with pytest.raises(EncoderInputError, match="empty list"):
        image_client.encode_texts([])
    # a good request afterwards
    assert image_client.encode_images(x).shape == (2, 32)
    assert volume_client.encode_volumes([np.zeros((8, 16, 16), np.float32)]).shape == (1, 32)


def test_concurrent_bad_requests_do_not_fail_good_ones(image_client):
    good = np.random.default_rng(3).standard_normal((1, 1, 64, 64)).astype(np.float32)
    want = image_client.encode_images(good)
    outcomes = []

    def send(images):
        try:
            outcomes.append(("ok", image_client.run_graph("image", {"images": images},
                                                          ["embeddings"])[0]))
        except EncoderInputError as exc:
            outcomes.append(("error", exc))

    threads = [threading.Thread(target=send, args=(good if i % 2 else good[:, :, :32, :32],))
               for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(k for k, _ in outcomes) == ["error"] * 6 + ["ok"] * 6
    assert all(row_cos(v, want).min() >= MIN_COS for k, v in outcomes if k == "ok")


def test_async_encoder_matches_the_sync_one(server, repo, image_client, volume_client):
    import asyncio

    from medseek.encoders import AsyncTritonEncoder

    x = np.random.default_rng(5).standard_normal((6, 1, 64, 64)).astype(np.float32)
    vols = [np.random.default_rng(6).random((20, 32, 32), dtype=np.float32)]
    texts = ["Small left pleural effusion.", ""]

    async def run():
        cfg = TritonEncoderConfig(server.grpc_url, batch_size=4)
        async with AsyncTritonEncoder(cfg, image_client.spec) as img, \
                AsyncTritonEncoder(cfg, volume_client.spec) as vol:
            return (await img.encode_images(x), await img.encode_texts(texts),
                    await vol.encode_volumes(vols))

    images, txt, volumes = asyncio.run(run())
    assert row_cos(images, image_client.encode_images(x)).min() >= MIN_COS
    assert row_cos(txt, image_client.encode_texts(texts)).min() >= MIN_COS
    assert row_cos(volumes, volume_client.encode_volumes(vols)).min() >= MIN_COS



def test_shared_memory_inputs_give_the_same_vectors(server, volume_client):
    vols = [np.random.default_rng(7).random((40, 32, 32), dtype=np.float32)]
    cfg = TritonEncoderConfig(server.grpc_url, shared_memory_bytes=0)  # every request
    with TritonEncoder(cfg, volume_client.spec) as enc:
        got = enc.encode_volumes(vols)
        regions = enc.client.get_system_shared_memory_status(as_json=True).get("regions", {})
    assert row_cos(got, volume_client.encode_volumes(vols)).min() >= MIN_COS
    assert not regions  # each request's region is unregistered after it


def test_deadline_gives_a_timeout_error(server, image_client):
    x = np.zeros((32, 1, 64, 64), np.float32)
    cfg = TritonEncoderConfig(server.grpc_url, batch_size=32, client_timeout=1e-4)
    with TritonEncoder(cfg, image_client.spec) as enc:
        with pytest.raises(EncoderTimeout, match="within client_timeout=0.0001 s"):
            enc.encode_images(x)
    assert image_client.encode_images(x[:2]).shape == (2, 32)

def test_killed_server_gives_unavailable_and_restart_is_used_by_the_same_client(server, image_client):
    x = np.random.default_rng(4).standard_normal((3, 1, 64, 64)).astype(np.float32)
    want = image_client.encode_images(x)
    port = server.grpc_port
    server.kill()  # SIGKILL: no clean shutdown
    with pytest.raises(EncoderUnavailable, match="unavailable") as info:
        image_client.encode_images(x)
    assert isinstance(info.value, ConnectionError)
    assert not image_client.ready()
    server.start()  # same ports
    assert server.grpc_port == port
    got = image_client.encode_images(x)  # same client object, no reconnect call
    assert row_cos(got, want).min() >= MIN_COS

