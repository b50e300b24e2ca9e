"""A real Orthanc PACS for tests: started on 127.0.0.1 with its DICOMweb plugin, stopped after.

Orthanc (Debian packages ``orthanc``, ``orthanc-dicomweb``) is configured from a file in a
temporary folder: a free HTTP port, the DICOM port disabled, ``RemoteAccessAllowed``
false (Orthanc 1.10 has no HTTP bind-address option: it listens on every interface, and
answers 403 to any client that is not on this host), HTTP basic authentication with a
random password, its storage and index in the temporary folder. Real DICOM files from
pydicom / pydicom-data are uploaded with ``POST /instances``.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ORTHANC = shutil.which("Orthanc")
PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                     "/usr/lib/orthanc/libOrthancDicomWeb.so")


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's .so, as ``dpkg -L orthanc-dicomweb`` lists it (else a known
    path)."""
    try:
        listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True,
                                text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = []
    for path in [p for p in listed if "DicomWeb" in p and ".so" in p] + list(PLUGIN_CANDIDATES):
        if Path(path).is_file():
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """``Orthanc(tmp_dir)``: started by the constructor, ``stop()`` to end it.

    Attributes: ``url`` (``http://127.0.0.1:<port>``), ``dicomweb`` (its DICOMweb root),
    ``user``, ``password``.
    """

    def __init__(self, folder: Path, startup_s: float = 60.0) -> None:
        plugin = dicomweb_plugin()
        if ORTHANC is None or plugin is None:
            raise RuntimeError("Orthanc or its DICOMweb plugin is not installed")
        self.folder = Path(folder)
        (self.folder / "db").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user, self.password = "medseek", secrets.token_hex(12)
        config = {
            "Name": "medseek-test", "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"), "HttpPort": self.port,
            "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {self.user: self.password},
            "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpThreadsCount": 4, "ConcurrentJobs": 1, "SaveJobs": False,
            "StableAge": 1, "HttpDescribeErrors": True,
        }
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(config))
        cfg.chmod(0o600)
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self._log = open(self.folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=self.folder)
        try:
            self._wait(startup_s)
        except BaseException:
            self.stop()
            raise

    def _request(self, method: str, path: str, data: bytes | None = None,
                 content_type: str | None = None):
        req = urllib.request.Request(self.url + path, data=data, method=method)
        pair = f"{self.user}:{self.password}".encode()
        req.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
        if content_type:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read() or b"null")

    def _wait(self, startup_s: float) -> None:
        deadline = time.monotonic() + startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see "
                                   f"{self.folder / 'orthanc.log'}")
            try:
                if self._request("GET", "/system").get("Version"):
                    return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer /system within {startup_s} s")
            time.sleep(0.1)

    def upload(self, data: bytes) -> str:
        """POST one DICOM file to /instances; Orthanc's id of the instance."""
        got = self._request("POST", "/instances", data, "application/dicom")
        if got.get("Status") not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"Orthanc refused an upload: {got.get('Status')}")
        return got["ID"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def derived_series(source_file: str, n_slices: int, tag: str, z_step: float = 5.0):
    """``n_slices`` copies of a real single-slice DICOM file as one new series of a new
    study: new Study/Series/SOP Instance UIDs (deterministic from ``tag``), the slices
    ``z_step`` mm apart along z. Returns (study UID, [file bytes])."""
    import pydicom
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(source_file)
    study = generate_uid(entropy_srcs=[tag, "study"])
    series = generate_uid(entropy_srcs=[tag, "series"])
    x, y, z = (float(v) for v in base.ImagePositionPatient)
    files = []
    for k in range(n_slices):
        ds = base.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[tag, "sop", str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [x, y, z + k * z_step]
        ds.SliceLocation = z + k * z_step
        ds.SliceThickness = z_step
        ds.InstanceNumber = k + 1
        files.append(dicom_bytes(ds))
    return study, files
