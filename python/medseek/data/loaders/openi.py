"""Indiana University chest X-rays as published by OpenI.

::

    root/
      ecgen-radiology/1.xml 2.xml ...     one report per file (OpenI "ecgen-radiology" XML)
      NLMCXR_png/CXR1_1_IM-0001-3001.png   images named by <parentImage id="...">

Each XML holds ``<uId id="CXR1"/>``, ``<AbstractText Label="FINDINGS">`` etc., MeSH
terms (``<MeSH><major>Opacity/lung/base/left/mild</major>``) and one
``<parentImage id="...">`` per image with a ``<caption>`` that often names the view.
Report text is read at run time and goes only into the manifest the caller writes.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from medseek.data.iu import parse_report
from medseek.data.loaders._common import ON_MISSING, check_choice, keep_row
from medseek.data.manifest import ManifestRecord
from medseek.data.mesh import normalised_labels

_VIEW_PATTERNS = (
    (re.compile(r"\blat(eral)?\b", re.I), "LATERAL"),
    (re.compile(r"\bpa\b|posteroanterior|frontal", re.I), "PA"),
    (re.compile(r"\bap\b|anteroposterior", re.I), "AP"),
)


def _view(caption: str) -> str:
    """The view a caption names; "" when it names none or several ("PA and lateral")."""
    views = {view for pattern, view in _VIEW_PATTERNS if pattern.search(caption)}
    return views.pop() if len(views) == 1 else ""


def load_openi(
    root: str | Path,
    *,
    reports_dir: str = "ecgen-radiology",
    images_dir: str = "NLMCXR_png",
    on_missing: str = "error",
) -> list[ManifestRecord]:
    """Manifest records for IU X-ray/OpenI: one per image and one per report.

    Parameters
    ----------
    root : str or Path
        Folder holding the report and image folders.
    reports_dir, images_dir : str
        Their names under ``root``.
    on_missing : {"error", "skip", "keep"}
        Policy for an image named in a report but not on disk.

    Notes
    -----
    Patient ids are the report uids (OpenI has one study per patient id). Labels are
    the normalised MeSH *major* terms (:func:`medseek.data.mesh.normalised_labels`).
    """
    base = Path(root)
    check_choice("on_missing", on_missing, ON_MISSING)
    xml_dir = base / reports_dir
    if not xml_dir.is_dir():
        raise FileNotFoundError(f"reports folder not found: {xml_dir}")
    files = sorted(xml_dir.glob("*.xml"), key=lambda p: (len(p.stem), p.stem))
    records: list[ManifestRecord] = []
    for xml_path in files:
        data = xml_path.read_bytes()
        try:
            rep = parse_report(data)
        except (ValueError, ET.ParseError) as exc:
            raise ValueError(f"{xml_path}: {exc}") from None
        captions = {
            node.get("id", ""): " ".join("".join(node.findtext("caption") or "").split())
            for node in ET.fromstring(data).findall("parentImage")
        }
        labels = normalised_labels(rep.mesh_major)
        patient = f"openi:{rep.uid}"
        for image_id in rep.image_ids:
            rel = Path(images_dir) / f"{image_id}.png"
            what = f"{xml_path} image {image_id}: {base / rel} not found"
            if not keep_row((base / rel).is_file(), on_missing, what):
                continue
            records.append(
                ManifestRecord(
                    id=f"openi:{image_id}",
                    path=rel.as_posix(),
                    kind="image",
                    modality="CR",
                    body_part="CHEST",
                    view=_view(captions.get(image_id, "")),
                    patient_id=patient,
                    study_id=patient,
                    source_id=patient,
                    labels=labels,
                    meta={"caption": captions.get(image_id, "")},
                )
            )
        records.append(
            ManifestRecord(
                id=f"openi:{rep.uid}:report",
                path=xml_path.relative_to(base).as_posix(),
                kind="report",
                body_part="CHEST",
                patient_id=patient,
                study_id=patient,
                source_id=patient,
                labels=labels,
                report=rep.text,
                meta={"mesh_major": list(rep.mesh_major), "indication": rep.indication},
            )
        )
    return records
