"""Reader for the Indiana University chest X-ray reports (OpenI, CC BY-NC-ND 4.0).

The 3,955 reports ship inside the ``torchxrayvision`` wheel as one tar of XML files.
They are read in place at run time and never copied into this repository or into any
artefact that medseek writes for redistribution. ``torchxrayvision`` itself is not
imported (it imports torchvision, which does not load beside the CPU torch build);
its data folder is located with :func:`importlib.util.find_spec` instead.
"""

from __future__ import annotations

import importlib.util
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ARCHIVE_NAME = "NLMCXR_reports.tgz"


@dataclass(frozen=True)
class IUReport:
    """One IU X-ray report.

    ``uid`` is the report id (``"CXR1002"``), ``image_ids`` the ids of its images
    (usually a PA and a lateral view). ``mesh_major`` holds the human-assigned MeSH
    terms, each a ``/``-separated path such as ``"Opacity/lung/base/left/mild"``;
    ``["normal"]`` marks a normal study. ``mesh_automatic`` holds the terms that a
    program assigned; they are noisier and are not used as ground truth.
    """

    uid: str
    comparison: str
    indication: str
    findings: str
    impression: str
    mesh_major: tuple[str, ...]
    mesh_automatic: tuple[str, ...] = field(default=())
    image_ids: tuple[str, ...] = field(default=())

    @property
    def text(self) -> str:
        """Findings and impression joined, the part of a report that describes the image."""
        parts = [p for p in (self.findings, self.impression) if p]
        return "\n".join(parts)

    @property
    def mesh_headings(self) -> frozenset[str]:
        """Lower-case first components of the human MeSH terms (``"opacity"``,
        ``"normal"``), without ``"no indexing"``: the labels that relevance is built on."""
        heads = {t.split("/")[0].strip().lower() for t in self.mesh_major}
        return frozenset(heads - {"no indexing"})

    @property
    def is_normal(self) -> bool:
        return tuple(t.lower() for t in self.mesh_major) == ("normal",)


def locate_iu_archive() -> Path:
    """Path of the report archive inside the installed ``torchxrayvision`` package.

    Raises
    ------
    FileNotFoundError
        When ``torchxrayvision`` is not installed or the archive is missing.
    """
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "torchxrayvision is not installed; it carries the IU X-ray reports "
            "(install it with `pip install --no-deps torchxrayvision`)"
        )
    path = Path(spec.origin).parent / "data" / ARCHIVE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"IU report archive not found at {path}")
    return path


def _text(node: ET.Element | None) -> str:
    if node is None:
        return ""
    return " ".join("".join(node.itertext()).split())


def parse_report(xml_bytes: bytes) -> IUReport:
    """Parse one report's XML document into an :class:`IUReport`."""
    root = ET.fromstring(xml_bytes)
    uid_node = root.find("uId")
    if uid_node is None or not uid_node.get("id"):
        raise ValueError("IU report XML has no <uId id=...>")
    sections = {
        (node.get("Label") or "").upper(): _text(node) for node in root.iter("AbstractText")
    }
    mesh = root.find("MeSH")
    major = tuple(_text(n) for n in mesh.findall("major")) if mesh is not None else ()
    automatic = tuple(_text(n) for n in mesh.findall("automatic")) if mesh is not None else ()
    images = tuple(n.get("id", "") for n in root.findall("parentImage") if n.get("id"))
    return IUReport(
        uid=uid_node.get("id", ""),
        comparison=sections.get("COMPARISON", ""),
        indication=sections.get("INDICATION", ""),
        findings=sections.get("FINDINGS", ""),
        impression=sections.get("IMPRESSION", ""),
        mesh_major=tuple(t for t in major if t),
        mesh_automatic=tuple(t for t in automatic if t),
        image_ids=images,
    )


def mesh_heading_matrix(reports) -> tuple[list[str], "np.ndarray"]:
    """Multi-hot MeSH headings of reports: ``(names, (N, H) bool)``, names sorted.

    The label table behind report-to-report relevance (Jaccard overlap of these rows).
    """
    import numpy as np

    names = sorted(set().union(*(r.mesh_headings for r in reports)))
    matrix = np.array([[h in r.mesh_headings for h in names] for r in reports], dtype=bool)
    return names, matrix.reshape(len(reports), len(names))


def load_iu_reports(path: str | Path | None = None) -> list[IUReport]:
    """Read every report in the archive, sorted by numeric report id.

    Parameters
    ----------
    path : str or Path, optional
        The ``.tgz`` archive; by default the one inside ``torchxrayvision``.
    """
    archive = Path(path) if path is not None else locate_iu_archive()
    reports = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".xml"):
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                reports.append(parse_report(handle.read()))
    reports.sort(key=lambda r: int("".join(ch for ch in r.uid if ch.isdigit()) or 0))
    return reports
