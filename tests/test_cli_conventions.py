"""The ``medseek`` command follows CLI conventions: every option has help and shows its
default, ``--log-level``, ``--json`` on the client commands, ``MEDSEEK_*`` variables
that flags override, one-line client errors, and a missing extra named with its
install command. Client commands run against a real gRPC server on port 0; the error
and missing-extra paths run the real CLI in a subprocess."""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseek.cli import HelpFormatter, build_parser, log_level, main

TOKEN = "conventions-token-0123456789"


def _walk(parser: argparse.ArgumentParser, path=("medseek",)):
    """``(command path, parser)`` of every parser in the tree, the root included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))


def _undocumented(parser: argparse.ArgumentParser, path) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if a.help}
            missing += [f"{' '.join(path)} {name} (sub-command)"
                        for name in action.choices if name not in helped]
        elif not action.help or action.help == argparse.SUPPRESS:
            name = "/".join(action.option_strings) or action.dest
            missing.append(f"{' '.join(path)} {name}")
    return missing


def test_every_option_of_every_command_has_help_and_the_shared_formatter():
    """The guard for new flags: a flag added without help text fails here."""
    tree = list(_walk(build_parser()))
    commands = {" ".join(path) for path, _ in tree}
    assert {"medseek serve", "medseek query", "medseek ingest", "medseek stats",
            "medseek triton start", "medseek data build", "medseek export"} <= commands
    missing = [m for path, parser in tree for m in _undocumented(parser, path)]
    assert missing == [], f"options without help: {missing}"
    assert [p.prog for _, p in tree if p.formatter_class is not HelpFormatter] == []


def test_help_shows_defaults_once_and_the_environment():
    parser = build_parser()
    sub = {" ".join(path): p for path, p in _walk(parser)}
    query = sub["medseek query"].format_help()
    assert "hits to return (default: 10)" in query
    assert "seconds per call (default: 300.0)" in " ".join(query.split())
    assert "$MEDSEEK_ADDRESS" in query and "MEDSEEK_TOKEN" in query
    assert "(default: None)" not in query and "(default: [])" not in query
    assert "(default: False)" not in query
    # help that already states its default is not given a second one
    demo = " ".join(sub["medseek demo"].format_help().split())
    assert "(default 400; all 3,955 takes minutes)" in demo and "(default: 400)" not in demo
    root = parser.format_help()
    for var in ("MEDSEEK_LOG_LEVEL", "MEDSEEK_ADDRESS", "MEDSEEK_TOKEN_FILE", "MEDSEEK_TOKEN",
                "MEDSEEK_HOST", "MEDSEEK_PORT", "MEDSEEK_CONFIG"):
        assert f"\n  {var} " in root  # the epilog's table keeps one variable a line
    assert "--log-level" in root


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_client_flags_override_environment_variables(tmp_path):
    from medseek.serve.commands import client_settings

    env_file, flag_file = tmp_path / "env-token", tmp_path / "flag-token"
    env_file.write_text("from-env-file\n")
    flag_file.write_text("from-flag-file\n")
    assert client_settings(_args("stats"), {}) == ("127.0.0.1:50051", None)
    env = {"MEDSEEK_ADDRESS": "10.1.2.3:7000", "MEDSEEK_TOKEN": "from-env"}
    assert client_settings(_args("stats"), env) == ("10.1.2.3:7000", "from-env")
    assert client_settings(_args("stats", "--server", "127.0.0.1:1"), env)[0] == "127.0.0.1:1"
    assert client_settings(_args("stats", "--address", "h:2"), env)[0] == "h:2"
    env["MEDSEEK_TOKEN_FILE"] = str(env_file)  # a token file beats the bare token
    assert client_settings(_args("stats"), env)[1] == "from-env-file"
    assert client_settings(_args("stats", "--token-file", str(flag_file)), env)[1] == \
        "from-flag-file"
    env["MEDSEEK_TOKEN_FILE"] = str(tmp_path / "missing")
    with pytest.raises(SystemExit, match="medseek stats: cannot read the token file .*missing"):
        client_settings(_args("stats"), env)


def test_serve_flags_override_environment_variables(tmp_path):
    from medseek.serve.commands import serve_settings

    env = {"MEDSEEK_CONFIG": str(tmp_path / "serve.toml"), "MEDSEEK_HOST": "::1",
           "MEDSEEK_PORT": "6001"}
    assert serve_settings(_args("serve"), {}) == (None, None, None)
    assert serve_settings(_args("serve"), env) == (tmp_path / "serve.toml", "::1", 6001)
    flags = _args("serve", "--config", "other.toml", "--host", "127.0.0.1", "--port", "0")
    assert serve_settings(flags, env) == (Path("other.toml"), "127.0.0.1", 0)
    with pytest.raises(SystemExit, match="MEDSEEK_PORT must be a port number, got 'http'"):
        serve_settings(_args("serve"), {"MEDSEEK_PORT": "http"})


def test_log_level_flag_then_environment_then_the_commands_default():
    assert log_level(_args("stats"), {}) == "warning"
    assert log_level(_args("serve"), {}) == "info"
    assert log_level(_args("serve"), {"MEDSEEK_LOG_LEVEL": "ERROR"}) == "error"
    assert log_level(_args("--log-level", "DEBUG", "serve"), {"MEDSEEK_LOG_LEVEL": "error"}) \
        == "debug"
    with pytest.raises(SystemExit, match="MEDSEEK_LOG_LEVEL must be one of .* got 'loud'"):
        log_level(_args("stats"), {"MEDSEEK_LOG_LEVEL": "loud"})
    with pytest.raises(SystemExit):
        _args("--log-level", "loud", "stats")


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _json_out(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out)  # the whole of stdout is one JSON document


def test_json_output_of_ingest_query_and_stats_against_a_real_server(tmp_path, capsys,
                                                                      monkeypatch):
    pytest.importorskip("grpc_health")
    from medseek.serve.config import ServeConfig
    from medseek.serve.local_encoder import LocalTorchEncoder
    from medseek.serve.server import ServerThread

    folder = tmp_path / "archive"
    folder.mkdir()
    for n in range(3):
        (folder / f"img{n}.png").write_bytes(_png(n))
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "note.txt").write_text("Small left pleural effusion.")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    cfg = ServeConfig(store_path=tmp_path / "s.db", index_dir=tmp_path / "idx", port=0,
                      tokens=(TOKEN,), grace_s=1.0)
    for var in ("MEDSEEK_ADDRESS", "MEDSEEK_TOKEN", "MEDSEEK_TOKEN_FILE", "MEDSEEK_LOG_LEVEL"):
        monkeypatch.delenv(var, raising=False)
    with ServerThread(cfg, LocalTorchEncoder(seed=0)) as s:
        # the address and the token come from the environment only
        monkeypatch.setenv("MEDSEEK_ADDRESS", f"127.0.0.1:{s.port}")
        monkeypatch.setenv("MEDSEEK_TOKEN", TOKEN)
        assert main(["ingest", str(folder), "--batch-size", "2", "--json"]) == 1
        captured = capsys.readouterr()
        done = json.loads(captured.out)
        assert "it/s" not in captured.err  # no progress bar
        assert (done["inserted"], done["failed"], done["items"]) == (4, 1, 5)
        assert [a["index"] for a in done["acks"]] == [0, 1, 2, 3, 4]
        failed, = [a for a in done["acks"] if a["status"] == "failed"]
        assert failed["id"] == "broken.png" and failed["error"]["code"] == 3
        assert "failed: item 0 'broken.png': INVALID_ARGUMENT" in captured.err

        assert main(["query", "--image", str(folder / "img1.png"), "-k", "2", "--json"]) == 0
        found = _json_out(capsys)
        assert [h["id"] for h in found["hits"]][0] == "img1.png" and len(found["hits"]) == 2
        assert found["hits"][0]["score"] > found["hits"][1]["score"]
        assert "total" in found["timings_ms"]

        assert main(["stats", "--json"]) == 0
        stats = _json_out(capsys)
        assert sum(int(c["items"]) for c in stats["collections"]) == 4
        assert main(["stats"]) == 0
        table = capsys.readouterr().out
        assert table.splitlines()[0].split() == ["collection", "items", "indexed", "dim",
                                                 "applied_seq"] and "last_seq" in table

        # a flag overrides its variable: a wrong --token-file is refused by the server
        wrong = tmp_path / "wrong-token"
        wrong.write_text("not-the-token-000000")
        assert main(["stats", "--json", "--token-file", str(wrong)]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("medseek stats: UNAUTHENTICATED: ")
        monkeypatch.setenv("MEDSEEK_ADDRESS", "127.0.0.1:1")
        assert main(["stats", "--json", "--server", f"127.0.0.1:{s.port}"]) == 0
        assert _json_out(capsys)["collections"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed on return: nothing listens there


def _run_cli(*argv: str, tmp_path: Path, pythonpath: Path | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSEEK_")}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(pythonpath),
                                                          env.get("PYTHONPATH"))))
    return subprocess.run([sys.executable, "-m", "medseek.cli", *argv], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=env)


def test_a_failed_call_is_one_line_with_its_status_code(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    run = _run_cli("query", "--text", "effusion", "--server", address, "--timeout", "20",
                   tmp_path=tmp_path)
    assert run.returncode == 1 and run.stdout == ""
    assert "Traceback" not in run.stderr
    line, = run.stderr.splitlines()
    assert line.startswith("medseek query: UNAVAILABLE: ") and address in line
    debug = _run_cli("--log-level", "debug", "stats", "--server", address, "--timeout", "20",
                     tmp_path=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert debug.stderr.splitlines()[-1].startswith("medseek stats: UNAVAILABLE: ")


def _failing_package(root: Path, name: str) -> Path:
    """A package ``name`` on ``root`` whose import fails as an uninstalled one does."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(
        f"raise ModuleNotFoundError({f'No module named {name!r}'!r}, name={name!r})\n")
    return root


@pytest.mark.parametrize("argv", [("serve", "--store", "s.db", "--index-dir", "idx"),
                                  ("query", "--text", "effusion"),
                                  ("ingest", "."), ("stats", "--json")])
def test_a_missing_server_extra_is_named_with_its_install_command(tmp_path, argv):
    fake = _failing_package(tmp_path / "no-grpc", "grpc")
    run = _run_cli(*argv, tmp_path=tmp_path, pythonpath=fake)
    assert run.returncode == 2, run.stderr
    assert run.stderr == (f"medseek {argv[0]} needs the 'server' extra: "
                          f'pip install "medseek[server]"\n')
    assert run.stdout == "" and not (tmp_path / "s.db").exists()
    assert _run_cli("query", "--help", tmp_path=tmp_path, pythonpath=fake).returncode == 0


def test_a_missing_onnxruntime_names_the_triton_extra(tmp_path):
    fake = _failing_package(tmp_path / "no-ort", "onnxruntime")
    export = _run_cli("export", "--model", "cxr-tiny", "--repo", "repo", tmp_path=tmp_path,
                      pythonpath=fake)
    assert (export.returncode, export.stderr) == (
        2, 'medseek export needs the \'triton\' extra: pip install "medseek[triton]"\n')
    # imported inside the handler, not up front: the same message, no traceback
    serve = _run_cli("--log-level", "error", "serve", "--store", "s.db", "--index-dir", "idx",
                     "--encoder", "onnx", "--model-repo", "repo", tmp_path=tmp_path,
                     pythonpath=fake)
    assert (serve.returncode, serve.stderr) == (
        2, 'medseek serve needs the \'triton\' extra: pip install "medseek[triton]"\n')
