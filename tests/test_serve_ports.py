"""Ports a server picks for itself: distinct, even where the kernel hands a just-closed
port straight out again (which made tritonserver refuse to start: "cannot listen to HTTP
requests and metrics requests at the same address and port")."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from medseek.serve import triton


class ReusingSocket:
    """A socket whose ``bind((host, 0))`` gets the lowest port no open socket holds: the
    kernel's behaviour at its worst, where a port closed a moment ago comes back first."""

    held: set[int] = set()

    def __init__(self, *args) -> None:
        self.port = None

    def bind(self, address) -> None:
        port = 40000
        while port in ReusingSocket.held:
            port += 1
        self.port = port
        ReusingSocket.held.add(port)

    def getsockname(self):
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        ReusingSocket.held.discard(self.port)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture
def reusing_kernel(monkeypatch):
    ReusingSocket.held = set()
    # the fake stands in for the socket module inside medseek.serve.triton only
    monkeypatch.setattr(triton, "socket", SimpleNamespace(socket=ReusingSocket, AF_INET=socket.AF_INET,
                                                          SOCK_STREAM=socket.SOCK_STREAM))


def test_free_ports_are_distinct_even_when_the_kernel_reuses_closed_ports(reusing_kernel):
    assert triton.free_port() == triton.free_port()  # one at a time: the same port twice
    ports = triton.free_ports(3)
    assert len(set(ports)) == 3
    assert 40000 not in triton.free_ports(2, avoid={40000})
    assert not ReusingSocket.held  # every probe socket closed


def test_triton_server_listens_on_three_distinct_ports(reusing_kernel, tmp_path, monkeypatch):
    monkeypatch.setattr(triton, "find_tritonserver", lambda: (tmp_path / "tritonserver", None))
    server = triton.TritonServer(triton.TritonServerConfig(repo_dir=tmp_path))
    assert len({server.grpc_port, server.http_port, server.metrics_port}) == 3
    # a port the caller names is kept, and no picked port equals it
    server = triton.TritonServer(triton.TritonServerConfig(repo_dir=tmp_path, http_port=40000))
    assert server.http_port == 40000
    assert len({server.grpc_port, server.http_port, server.metrics_port}) == 3


def test_free_ports_on_the_real_kernel():
    ports = triton.free_ports(8)
    assert len(set(ports)) == 8
    for port in ports:  # each is bindable now
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
