"""Start, watch and stop a ``tritonserver`` on a model repository.

Binary: the one inside the ``nvidia-pytriton`` wheel (python backend only, runs on CPU),
else ``tritonserver`` on PATH (NVIDIA's container, with TensorRT). For the wheel's binary
the environment is set as DESIGN.md says: the venv's ``bin`` first on PATH (the python
backend stub finds the interpreter's packages through it), ``nvidia_pytriton.libs`` and
the interpreter's LIBDIR on LD_LIBRARY_PATH; the python backend's stub for this Python
version is copied next to the backend in a private work folder (as pytriton does).

The server binds 127.0.0.1 by default on free gRPC, HTTP and metrics ports, loads every
model of the repository (``--model-control-mode none``), writes its log to a file, and
:meth:`TritonServer.start` returns once ``/v2/health/ready`` says every model is ready.
If it exits first (a model failed to load), :class:`TritonStartError` quotes the
model's error lines from the log. :meth:`TritonServer.stop` sends SIGTERM to the
server's process group, then SIGKILL after a grace period.

Several exported repositories (each exported with its own ``--name-prefix``) are served by
one server through :func:`merge_repositories`: a folder of links to every model of
each, built after checking that no model name appears twice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PID_FILE = "triton.pid"
LOG_FILE = "triton.log"


class TritonStartError(RuntimeError):
    """tritonserver is missing, exited during start-up, or did not get ready in time."""


class RepositoryMergeError(ValueError):
    """Repositories cannot be served together: a model name appears in two of them, or a
    folder is not a model repository."""


# sub-folders of a repository that are not models (Python caches, editor/VCS folders)
_NOT_MODELS = ("__pycache__",)


def repository_models(repo_dir: str | Path) -> dict[str, Path]:
    """The models of a repository: name -> folder, for every sub-folder with a
    ``config.pbtxt``. Raises :class:`RepositoryMergeError` for a folder that is missing,
    holds no model, or has a sub-folder without a config (tritonserver would fail on it)."""
    repo = Path(repo_dir)
    if not repo.is_dir():
        raise RepositoryMergeError(f"repository {repo} is not a folder")
    models = {}
    for sub in sorted(repo.iterdir()):
        if not sub.is_dir() or sub.name.startswith(".") or sub.name in _NOT_MODELS:
            continue
        if not (sub / "config.pbtxt").is_file():
            raise RepositoryMergeError(f"{sub} has no config.pbtxt: {repo} is not a model "
                                       "repository written by `medseek export`")
        models[sub.name] = sub.resolve()
    if not models:
        raise RepositoryMergeError(f"repository {repo} holds no model (no <model>/config.pbtxt)")
    return models


def merge_repositories(repo_dirs: Sequence[str | Path], dest: str | Path) -> dict[str, Path]:
    """Make ``dest`` one model repository holding the models of all ``repo_dirs``.

    Each model of each repository becomes a symbolic link ``dest/<model>`` to its folder
    (nothing is copied; a re-export shows up at the next server start). ``dest`` must be
    missing or empty. Raises :class:`RepositoryMergeError`, before linking anything, when
    two repositories hold a model of the same name (export them with different
    ``--name-prefix``) or when a repository is given twice.

    Returns
    -------
    dict model name -> the folder it links to
    """
    repos = [Path(r) for r in repo_dirs]
    if not repos:
        raise RepositoryMergeError("repo_dirs must name at least one repository, got none")
    seen_repo: dict[Path, Path] = {}
    owner: dict[str, Path] = {}  # model -> repository that holds it
    merged: dict[str, Path] = {}
    for repo in repos:
        key = repo.resolve()
        if key in seen_repo:
            raise RepositoryMergeError(f"repository {repo} is given twice")
        seen_repo[key] = repo
        for name, folder in repository_models(repo).items():
            if name in owner:
                raise RepositoryMergeError(
                    f"model {name!r} is in both {owner[name]} and {repo}: one tritonserver "
                    "cannot serve two models of one name; export one of them with another "
                    "prefix (`medseek export ... --name-prefix wrist_`)")
            owner[name] = repo
            merged[name] = folder
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise RepositoryMergeError(f"dest {dest} must be missing or empty")
    dest.mkdir(parents=True, exist_ok=True)
    for name, folder in merged.items():
        (dest / name).symlink_to(folder, target_is_directory=True)
    return merged


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (bind port 0, read it, close)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1", avoid=()) -> list[int]:
    """``n`` distinct TCP ports that nothing listens on right now, none of them in
    ``avoid``. All ``n`` sockets are held bound until every port is read: the kernel may
    hand a just-closed port straight out again, so ports picked one at a time (bind,
    read, close, repeat) can come out equal, and tritonserver refuses to start when two
    of its listeners share one."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port not in avoid:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _wheel_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return path if (path / "bin" / "tritonserver").is_file() else None


def find_tritonserver() -> tuple[Path, Path | None]:
    """``(binary, wheel dir or None)``: the pytriton wheel's binary, else one on PATH.

    Raises :class:`TritonStartError` when neither exists.
    """
    wheel = _wheel_dir()
    if wheel is not None:
        return wheel / "bin" / "tritonserver", wheel
    found = shutil.which("tritonserver")
    if found:
        return Path(found), None
    raise TritonStartError(
        "tritonserver not found: install the triton extra (`pip install medseek[triton]`, "
        "which brings the nvidia-pytriton wheel) or put tritonserver on PATH "
        "(NVIDIA's Triton container has it at /opt/tritonserver/bin)"
    )


def wheel_environment(wheel: Path, base: dict[str, str]) -> dict[str, str]:
    """``base`` with PATH and LD_LIBRARY_PATH set for the wheel's binary (DESIGN.md)."""
    env = dict(base)
    libs = wheel.parent.parent / "nvidia_pytriton.libs"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(libs), libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def prepare_backends(wheel: Path, work_dir: Path) -> Path:
    """Copy the wheel's backends into ``work_dir`` with the python stub for this Python."""
    dst = work_dir / "backends"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(wheel / "backends", dst)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonStartError(f"the pytriton wheel has no python backend stub for Python {version}")
    shutil.copy2(stub, dst / "python" / "triton_python_backend_stub")
    return dst


@dataclass
class TritonServerConfig:
    """repo_dir : model repository; host : bind address; *_port : None = a free port;
    log_path : None = ``<repo_dir>/triton.log``; work_dir : backends copy (None = a temp
    folder removed at stop); startup_timeout : seconds to wait for readiness;
    model_config_name : e.g. ``"tensorrt"`` for ``configs/tensorrt.pbtxt``; log_verbose :
    tritonserver's --log-verbose level; extra_args : appended to the command line"""

    repo_dir: Path
    host: str = "127.0.0.1"
    grpc_port: int | None = None
    http_port: int | None = None
    metrics_port: int | None = None
    log_path: Path | None = None
    work_dir: Path | None = None
    startup_timeout: float = 120.0
    model_config_name: str | None = None
    log_verbose: int = 0
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.repo_dir = Path(self.repo_dir)
        if not self.repo_dir.is_dir():
            raise ValueError(f"repo_dir must be a model repository folder, got {self.repo_dir}")
        if not self.startup_timeout > 0:
            raise ValueError(f"startup_timeout must be > 0, got {self.startup_timeout}")
        for name in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 < int(port) < 65536:
                raise ValueError(f"{name} must be in 1..65535, got {port}")


# error lines a CPU-only host always logs; they say nothing about the models
_NOISE = ("CudaDriverHelper has not been initialized",)


def load_errors(log_text: str) -> list[str]:
    """Lines of a tritonserver log that report a failed model load or a fatal error."""
    keep = []
    for line in log_text.splitlines():
        if any(n in line for n in _NOISE):
            continue
        if (re.match(r"^E\d{4}", line) or "failed to load" in line or "UNAVAILABLE:" in line
                or line.startswith("error:")):
            keep.append(line.strip())
    return keep


class TritonServer:
    """A ``tritonserver`` process; a context manager that starts and stops it.

    >>> with TritonServer(TritonServerConfig(repo)) as server:  # doctest: +SKIP
    ...     client = InferenceServerClient(server.grpc_url)

    The ports are fixed at the first :meth:`start`, so a restarted server (after
    :meth:`stop` or :meth:`kill`) listens where the old one did and clients reconnect.
    """

    def __init__(self, cfg: TritonServerConfig) -> None:
        self.cfg = cfg
        self.binary, self.wheel = find_tritonserver()
        given = (cfg.grpc_port, cfg.http_port, cfg.metrics_port)
        auto = iter(free_ports(sum(1 for p in given if not p), cfg.host, avoid=set(given)))
        self.grpc_port, self.http_port, self.metrics_port = (p or next(auto) for p in given)
        self.log_path = Path(cfg.log_path) if cfg.log_path else cfg.repo_dir / LOG_FILE
        self._own_work_dir = cfg.work_dir is None
        self.work_dir = Path(cfg.work_dir) if cfg.work_dir else None
        self.process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.cfg.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.cfg.host}:{self.http_port}"

    def command(self, backend_dir: Path | None) -> list[str]:
        cmd = [str(self.binary), f"--model-repository={self.cfg.repo_dir.resolve()}",
               "--model-control-mode=none", "--exit-on-error=true", "--strict-readiness=true",
               f"--grpc-address={self.cfg.host}", f"--grpc-port={self.grpc_port}",
               f"--http-address={self.cfg.host}", f"--http-port={self.http_port}",
               f"--metrics-address={self.cfg.host}", f"--metrics-port={self.metrics_port}",
               f"--log-verbose={self.cfg.log_verbose}"]
        if backend_dir is not None:
            cmd.append(f"--backend-directory={backend_dir}")
        if self.cfg.model_config_name:
            cmd.append(f"--model-config-name={self.cfg.model_config_name}")
        return cmd + list(self.cfg.extra_args)

    def start(self) -> "TritonServer":
        """Launch and wait until every model is ready; raises :class:`TritonStartError`."""
        if self.running:
            raise TritonStartError(f"this server is already running (pid {self.process.pid})")
        env = dict(os.environ)
        backend_dir = None
        if self.wheel is not None:
            if self.work_dir is None:
                self.work_dir = Path(tempfile.mkdtemp(prefix="medseek-triton-"))
            if not (self.work_dir / "backends").is_dir():
                prepare_backends(self.wheel, self.work_dir)
            backend_dir = self.work_dir / "backends"
            env = wheel_environment(self.wheel, env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== medseek: starting {' '.join(self.command(backend_dir))}\n".encode())
            log.flush()
            start = log.tell()
            self.process = subprocess.Popen(self.command(backend_dir), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True)
        self._wait_ready(start)
        return self

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self, log_offset: int) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                errors = load_errors(self._log_since(log_offset))
                self.process = None
                detail = "\n  ".join(errors[-12:]) or "(no error lines; see the log)"
                raise TritonStartError(
                    f"tritonserver exited with code {code} during start-up "
                    f"(repository {self.cfg.repo_dir}, log {self.log_path}):\n  {detail}"
                )
            if self.ready():
                return
            time.sleep(0.2)
        errors = load_errors(self._log_since(log_offset))
        self.stop()
        raise TritonStartError(
            f"tritonserver not ready after {self.cfg.startup_timeout:.0f} s (log {self.log_path})"
            + ("".join(f"\n  {e}" for e in errors[-12:]))
        )

    def ready(self) -> bool:
        """True when the server answers and every model is ready (strict readiness)."""
        return http_ready(self.http_url)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM the server's process group, SIGKILL after ``grace`` s; returns the exit code."""
        if self.process is None:
            return None
        code = terminate_group(self.process.pid, grace, self.process)
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL the server at once (tests: a crashed backend); :meth:`start` revives it."""
        if self.process is not None:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None

    def close(self) -> None:
        """Stop the server and remove the private work folder."""
        self.stop()
        if self._own_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None

    def __enter__(self) -> "TritonServer":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {"pid": self.pid, "host": self.cfg.host, "grpc_port": self.grpc_port,
                "http_port": self.http_port, "metrics_port": self.metrics_port,
                "log": str(self.log_path), "work_dir": str(self.work_dir or ""),
                "repo_dir": str(self.cfg.repo_dir.resolve())}


def http_ready(http_url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{http_url}/v2/health/ready", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session=True: the group id is the server's pid
    except ProcessLookupError:
        pass


def process_alive(pid: int) -> bool:
    """True while process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def terminate_group(pid: int, grace: float, process: subprocess.Popen | None = None) -> int | None:
    """SIGTERM process group ``pid``, wait ``grace`` s, then SIGKILL; the exit code if known."""
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                break
        elif not process_alive(pid):
            break
        time.sleep(0.1)
    else:
        _signal_group(pid, signal.SIGKILL)
    if process is not None:
        code = process.wait()
        _signal_group(pid, signal.SIGKILL)  # python backend stubs left in the group
        return code
    return None


# ----------------------------------------------------------------------------- pid file
# ``medseek triton start`` leaves a server running; the pid file in the repository says
# where it is, so ``status`` and ``stop`` can find it.


def write_pid_file(server: TritonServer, repo_dirs: Sequence[str | Path] | None = None) -> Path:
    """Record ``server`` in ``triton.pid`` of each of ``repo_dirs`` (None: the served
    repository), so ``status`` and ``stop`` find it from any of them; returns the first."""
    repos = [Path(r) for r in repo_dirs] if repo_dirs else [server.cfg.repo_dir]
    info = server.describe()
    info["repositories"] = [str(r.resolve()) for r in repos]
    text = json.dumps(info, indent=2)
    for repo in repos:
        (repo / PID_FILE).write_text(text)
    return repos[0] / PID_FILE


def read_pid_file(repo_dir: str | Path) -> dict | None:
    path = Path(repo_dir) / PID_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def stop_from_pid_file(repo_dir: str | Path, grace: float = 15.0) -> dict | None:
    """Stop the server recorded in ``<repo_dir>/triton.pid``; returns its record (or None).

    The pid files of the other repositories it served (merged) go with it, where they
    still record the same server."""
    info = read_pid_file(repo_dir)
    if info is None:
        return None
    if info.get("pid") and process_alive(int(info["pid"])):
        terminate_group(int(info["pid"]), grace)
    if info.get("work_dir"):
        shutil.rmtree(info["work_dir"], ignore_errors=True)
    for repo in {str(Path(repo_dir).resolve()), *info.get("repositories", [])}:
        other = read_pid_file(repo) if Path(repo).is_dir() else None
        if other is not None and other.get("pid") == info.get("pid"):
            (Path(repo) / PID_FILE).unlink(missing_ok=True)
    return info
