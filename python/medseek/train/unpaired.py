"""Unpaired evidence alignment (LGDEA, seed "LLM-Guided Diagnostic Evidence Alignment").

LGDEA's point is that a shared *diagnostic evidence* space lets images and reports
that have no partner still teach the model: an image with labels from any source says
which findings it shows, a report says which findings it asserts, and both can be
aligned to that evidence space without knowing which report belongs to which image.

Here the evidence space is the finding vector of :mod:`medseek.text.concepts` (the
46 lexicon findings plus ``normal``), the same targets as the paired finding loss
(:func:`medseek.train.losses.finding_loss`):

* a **paired** item keeps its image, its report and :func:`~medseek.train.data.
  item_findings` (the contrastive term and the two-sided finding BCE, as before);
* an **image-only** item keeps its image; its report text is dropped (``""``) and its
  targets are its manifest labels mapped to findings (:func:`label_evidence`:
  ``item_findings("", labels)``, plus ``fracture`` from ``"distal radius fracture"``);
* a **report-only** item keeps its report; its image is replaced by zeros and its
  targets come from an *extractor* ``extract(report) -> (F,) 0/1 vector``. The default
  ``"rules"`` is the rule-based negation-aware extraction standing in for the paper's
  LLM; another (an LLM's) is plugged in with :func:`register_extractor` and named in the
  recipe's ``unpaired.extractor``.

:func:`split_pairing` keeps a fraction of the train *patients* as pairs and splits the
other patients into two disjoint halves, one contributing only images and one only
reports, so no image-only item has a partner among the report-only items (no pair is
recoverable). Each batch carries a ``pairing`` code per row (:data:`PAIRED`,
:data:`IMAGE_ONLY`, :data:`REPORT_ONLY`); :func:`~medseek.train.losses.combine_losses`
feeds only the paired rows to the contrastive, gap and paired finding terms, and the
image side of image-only rows plus the text side of report-only rows to the
``finding_unpaired`` term (weight ``LossConfig.w_finding_unpaired``), and every row with
an image (pairs and image-only rows, by their labels) to the ``neighbours`` term.

Region captions (WristMIR's bone sentences) are sentences of the report, so only paired
items keep them: an image-only item has no report, and a report-only item's zero image
has nothing in its boxes. The region terms (``w_region``, ``w_region_finding``) then see
the pairs' regions only (the collate drops uncaptioned regions);
:func:`check_unpaired_regions` refuses a batch where an unpaired row still carries one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

PAIRED, IMAGE_ONLY, REPORT_ONLY = 0, 1, 2

Extractor = Callable[[str], np.ndarray]


def rule_extract(report: str) -> np.ndarray:
    """The rule-based extractor (the default): what the report asserts, negation-aware,
    ``normal`` when it asserts no finding (:func:`~medseek.train.data.report_finding_vector`)."""
    from .data import report_finding_vector

    return report_finding_vector(report).copy()


EXTRACTORS: dict[str, Extractor] = {"rules": rule_extract}


def register_extractor(name: str, fn: Extractor) -> None:
    """Make ``fn`` (report text → finding vector of length ``len(concept_names())``)
    selectable as ``unpaired.extractor = name``; an LLM extractor plugs in here."""
    if not callable(fn):
        raise TypeError(f"extractor {name!r} must be callable report -> finding vector, got {type(fn).__name__}")
    EXTRACTORS[name] = fn


@dataclass(frozen=True)
class UnpairedConfig:
    pairs_kept: float = 1.0  # share of train patients kept as image+report pairs; 1.0: off
    use_unpaired: bool = True  # False: train on the kept pairs only (the paired-only baseline)
    paired_share: float = 0.5  # expected share of paired rows per batch (pairs are repeated)
    seed: int = 0  # which patients stay paired and which half gives images vs reports
    extractor: str = "rules"  # EXTRACTORS key: report -> findings for report-only items

    def __post_init__(self) -> None:
        if not isinstance(self.pairs_kept, (int, float)) or not 0 < self.pairs_kept <= 1:
            raise ValueError(f"unpaired.pairs_kept must be in (0, 1], got {self.pairs_kept!r}")
        if not isinstance(self.paired_share, (int, float)) or not 0 < self.paired_share < 1:
            raise ValueError(f"unpaired.paired_share must be in (0, 1), got {self.paired_share!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"unpaired.seed must be an int, got {self.seed!r}")

    @property
    def active(self) -> bool:
        return self.pairs_kept < 1


@dataclass(frozen=True)
class PairingSplit:
    """Record indices of a :class:`~medseek.train.data.PairDataset` by role; report-only
    holds one record per study (its report is the study's, the image is not used)."""

    paired: tuple[int, ...]
    image_only: tuple[int, ...]
    report_only: tuple[int, ...]


def _patient(rec) -> str:
    return rec.patient_id or rec.study_id or rec.id


def split_pairing(ds, pairs_kept: float, seed: int = 0) -> PairingSplit:
    """Patients of ``ds`` drawn (seeded) into: ``round(pairs_kept · P)`` (at least 1)
    paired patients, then the rest alternately into image-only and report-only halves.
    The three patient sets are disjoint, so nothing links an image-only item to a
    report-only one."""
    if not 0 < pairs_kept <= 1:
        raise ValueError(f"pairs_kept must be in (0, 1], got {pairs_kept!r}")
    pids = np.array([_patient(r) for r in ds.records])
    uniq = np.unique(pids)
    order = np.random.default_rng(seed).permutation(len(uniq))
    n_keep = min(len(uniq), max(1, int(round(pairs_kept * len(uniq)))))
    role = {}
    for rank, j in enumerate(order):
        role[uniq[j]] = PAIRED if rank < n_keep else (IMAGE_ONLY if (rank - n_keep) % 2 == 0 else REPORT_ONLY)
    paired = tuple(i for i, p in enumerate(pids) if role[p] == PAIRED)
    image_only = tuple(i for i, p in enumerate(pids) if role[p] == IMAGE_ONLY)
    seen: set[str] = set()
    report_only = []
    for i, p in enumerate(pids):
        study = ds.records[i].study_id or ds.records[i].id
        if role[p] == REPORT_ONLY and study not in seen and ds.records[i].report:
            seen.add(study)
            report_only.append(i)
    return PairingSplit(paired, image_only, tuple(report_only))


@dataclass(frozen=True)
class UnpairedDataset:
    """A train set of paired, image-only and report-only items (module doc). Index
    ``i`` maps to ``(record, role)`` through ``slots``: the paired records repeated so
    that they make up about ``paired_share`` of the items, then the unpaired ones.
    Duck-types :class:`~medseek.train.data.PairDataset` for the trainer."""

    base: object  # PairDataset
    split: PairingSplit
    slots: tuple[tuple[int, int], ...]
    extract: Extractor
    _items: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def records(self):
        return tuple(self.base.records[j] for j, _ in self.slots)

    @property
    def text_ids(self) -> dict:
        return self.base.text_ids

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.base.label_names

    @property
    def model_cfg(self):
        return self.base.model_cfg

    def __len__(self) -> int:
        return len(self.slots)

    def roles(self) -> np.ndarray:
        return np.array([role for _, role in self.slots], dtype=np.int64)

    def _base_item(self, j: int) -> dict:
        if j not in self._items:  # a paired record sits in several slots: decode it once
            self._items[j] = self.base[j]
        return self._items[j]

    def __getitem__(self, i: int) -> dict:
        j, role = self.slots[i]
        item = dict(self._base_item(j))
        item["pairing"] = role
        if role != PAIRED and "captions" in item:  # region captions are report sentences
            item["captions"] = [""] * len(item["captions"])
        if role == IMAGE_ONLY:
            # the report is never seen: evidence from the manifest labels alone
            item["report"] = ""
            item["sentences"] = ()
            item["findings"] = label_evidence(self.base.records[j].labels,
                                              self.base.model_cfg.preprocess.regions)
        elif role == REPORT_ONLY:
            if "image" not in item:
                raise ValueError("unpaired training supports image datasets only (report-only items "
                                 "replace the image with zeros)")
            item["image"] = np.zeros_like(item["image"])
            item["findings"] = _checked(self.extract(item["report"]), item["findings"].shape)
            item["id"] = f"report-only:{self.base.records[j].study_id or item['id']}"
        return item


def label_evidence(labels: tuple[str, ...], regions: tuple[str, ...] = ()) -> np.ndarray:
    """The evidence of an image-only item: its labels as findings
    (:func:`~medseek.train.data.item_findings` with no report), where a label
    ``"<region> <finding>"`` of a named region (``preprocess.regions``, WristMIR's
    ``"distal radius fracture"``) also gives ``<finding>``. Without that, a fractured wrist
    named no lexicon finding and was taught ``normal``."""
    from medseek.text.concepts import concept_names
    from medseek.text.phenotypes import finding_for_label

    from .data import item_findings

    row = item_findings("", labels)
    prefixes = tuple(f"{r.replace('_', ' ').lower()} " for r in regions)
    index = {n: j for j, n in enumerate(concept_names())}
    for lab in labels:
        low = lab.lower()
        for p in prefixes:
            finding = finding_for_label(low[len(p):]) if low.startswith(p) else None
            if finding is not None:
                row[index[finding]] = 1.0
                row[index["normal"]] = 0.0
    return row


def _checked(vec, shape: tuple[int, ...]) -> np.ndarray:
    out = np.asarray(vec, dtype=np.float32)
    if out.shape != shape:
        raise ValueError(f"extractor returned shape {out.shape}, expected {shape} (one 0/1 per "
                         f"medseek.text.concepts.concept_names())")
    return out


def apply_unpaired(ds, cfg: UnpairedConfig, extract: Extractor | None = None):
    """The train set for ``cfg``: ``ds`` unchanged when off (``pairs_kept == 1``); the
    kept pairs only (``use_unpaired`` false); else an :class:`UnpairedDataset`.
    ``extract`` overrides ``cfg.extractor`` (a callable report → finding vector)."""
    if not cfg.active:
        return ds
    split = split_pairing(ds, cfg.pairs_kept, cfg.seed)
    if not cfg.use_unpaired:
        return ds.subset(split.paired)
    if extract is None:
        if cfg.extractor not in EXTRACTORS:
            raise ValueError(f"unpaired.extractor must be one of {sorted(EXTRACTORS)}, got {cfg.extractor!r}")
        extract = EXTRACTORS[cfg.extractor]
    n_unpaired = len(split.image_only) + len(split.report_only)
    repeat = max(1, int(round(cfg.paired_share / (1 - cfg.paired_share) * n_unpaired / len(split.paired))))
    slots = [(j, PAIRED) for _ in range(repeat) for j in split.paired]
    slots += [(j, IMAGE_ONLY) for j in split.image_only] + [(j, REPORT_ONLY) for j in split.report_only]
    return UnpairedDataset(ds, split, tuple(slots), extract)


def check_unpaired_regions(batch: dict, cfg) -> None:
    """Refuse region/organ terms that would read an unpaired row (module doc): organ
    terms always (volumes are not supported), region terms when an image-only or
    report-only row of ``batch`` carries a region caption."""
    if cfg.w_organ > 0:
        raise ValueError("unpaired training supports image datasets only; set w_organ to 0")
    if cfg.w_region <= 0 and cfg.w_region_finding <= 0:
        return
    valid = batch.get("region_valid")
    if valid is None:
        return
    unpaired = batch["pairing"] != PAIRED
    if bool(valid[unpaired].any()):
        raise ValueError("an unpaired row (image-only or report-only) carries a region caption: "
                         "the w_region / w_region_finding terms would align it; only paired items "
                         "may keep their captions (UnpairedDataset drops them)")


def unpaired_finding_loss(model, vis: torch.Tensor, txt: torch.Tensor, findings: torch.Tensor,
                          pairing: torch.Tensor) -> torch.Tensor:
    """Mean BCE of ``model.finding_logits`` over the image embeddings of image-only rows
    and the report embeddings of report-only rows, against their findings; the other
    side of those rows (a dropped report, a zero image) never enters. Zero (with a
    graph) when the batch has no unpaired row."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    img, rep = pairing == IMAGE_ONLY, pairing == REPORT_ONLY
    rows = int(img.sum()) + int(rep.sum())
    if rows == 0:
        return (vis.sum() + txt.sum()) * 0.0
    target = findings.to(vis.dtype)
    total = vis.new_zeros(())
    if img.any():
        total = total + bce(model.finding_logits(vis[img]), target[img], reduction="none").mean(1).sum()
    if rep.any():
        total = total + bce(model.finding_logits(txt[rep]), target[rep], reduction="none").mean(1).sum()
    return total / rows
