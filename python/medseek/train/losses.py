"""Training losses, all contrastive terms computed by :mod:`medseek.kernels`.

Terms (each weighted by :class:`LossConfig`; a weight of 0 skips the term entirely):

* ``global``: image/volume ↔ report. ``contrastive = "clip"`` is symmetric InfoNCE
  (``kernels.clip_loss``); ``"siglip"`` the pairwise sigmoid loss
  (``kernels.siglip_loss``). With ``soft_labels`` (PRIMA, seed "Pre-training with
  Risk-integrated Image-Metadata Alignment") the CLIP targets are soft: two cases that
  share findings are partial positives, ``t_ij = y_i·y_j / Σ_j y_i·y_j`` from the
  manifest's multi-hot labels (the kernel's ``labels`` argument).
* ``region``: WristMIR's region ↔ region-caption alignment. Each named bone crop
  (``encode_image_and_regions``, its own ``region_head``) is paired with its caption
  (``Region.text``); all pairs of the batch form one contrastive problem. Many captions
  are word-for-word equal ("distal ulna: no fracture"). For CLIP that is harmless:
  equal texts have equal embeddings, hence equal logits, and the InfoNCE loss and its
  gradient are the same whether duplicates count as positives or not. For SigLIP each
  duplicate pair would be a false negative pushed apart, so the sigmoid targets are
  ``z_ij = +1`` when captions i and j are equal (:func:`grouped_siglip_loss`; torch, as
  ``kernels.siglip_loss`` has no label argument; M ≤ 3·B pairs keep the matrix small).
* ``organ``: SigVLP's chunk-wise alignment. An organ embedding is the overlap-weighted
  mean of the projected chunk embeddings over the organ's z-range
  (:func:`medseek.models.vit3d.organ_embedding`); it is paired with that organ's sentence
  of the report, equal sentences handled as for regions.
* ``finding``: LGDEA's evidence alignment. The findings a report asserts are extracted
  with negation, joined with the item's curated labels that name a finding
  (:func:`medseek.train.data.item_findings`); a linear finding head
  on the unit embedding is trained to predict them from the image embedding and from the
  report embedding alike (:func:`finding_loss`, BCE). This is where the label signal
  enters densely: contrastive pairs only say "this report, not the rest of the batch",
  while every image now also learns which of the lexicon's 46 findings (or "normal")
  its item asserts.
* ``sentence_finding``: the finding head on the embedding of each distinct sentence of
  the batch's reports (text side only), against the findings that sentence asserts
  (:func:`medseek.train.data.sentence_finding_vector`: negation-aware, so "No pleural
  effusion." is a target of all zeros). Report-level targets teach the text head what
  whole reports say; zero-shot prompts are single sentences, often negated, which
  reports rarely are on their own. The ``normal`` axis is left out: a sentence cannot
  say a study is normal.
* ``organ_volume``: each organ sentence of the batch that asserts a lexicon finding
  ("Heart: Cardiomegaly.") against the batch's *whole-volume* embeddings, the space an
  organ-sentence query searches (:func:`organ_volume_loss`). The ``organ`` term aligns a
  sentence with the chunks over its organ only, and mostly with normal sentences
  (five or six of a volume's seven); this term asks the volume embedding to answer
  abnormal sentences. Soft targets as PRIMA's: every volume of the batch that has all
  the sentence's findings is a positive, its own volume always. Computed per process
  (sentences index their volumes locally).
* ``neighbours``: image ↔ image, PRIMA's soft targets without the report
  (:func:`neighbour_loss`). Image→image search ranks an archive by the embedding alone,
  and the report-side terms shape it only through the text: with near-identical normal
  reports that is a weak signal. Here each image of the batch is a query against the
  others (itself left out) with targets ``t_ij ∝ J(y_i, y_j)``, the Jaccard overlap of the
  multi-hot labels: same findings, no extra ones, which is also how the image→image
  nDCG of :mod:`medseek.train.ablation` grades a hit, so this term trains toward the
  metric directly (with the labels a training corpus carries, never the test split's).
  The temperature is fixed (``neighbour_temperature``), not the image ↔ text logit
  scale.
* ``pheno``: PhenoLIP's teacher-guided distillation of an ontology-derived phenotype
  space (:mod:`medseek.train.pheno`, formula there).
* ``gap``: the modality-gap-closing term. The modality-gap seed ("the modality gap is
  present also in medical alignment ... we propose a modality-agnostic framework that
  closes this gap") gives no formula in its abstract; we use the two quantities that
  define the gap in the literature it builds on (Liang et al. 2022, "Mind the Gap";
  Wang & Isola 2020, alignment/uniformity)::

      L_gap = ‖mean_i x_i − mean_i y_i‖²  +  u · log mean_{a≠b} exp(−2‖z_a − z_b‖²)

  where x are image embeddings, y text embeddings (unit vectors), and z runs over the
  union of both sets. The first part pulls the two modality centroids together (the
  ``centroid_distance`` of :func:`medseek.eval.gap.modality_gap`); the second
  (weight ``gap_uniformity``, default 0) spreads the union over the sphere so closing
  the gap cannot collapse the space. Its effect is what ``modality_gap`` measures.

All functions take embeddings already L2-normalised (the projection heads do it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from medseek import kernels

CONTRASTIVE = ("clip", "siglip")


@dataclass(frozen=True)
class LossConfig:
    contrastive: str = "clip"  # "clip" (InfoNCE) or "siglip" (sigmoid)
    soft_labels: bool = False  # PRIMA soft targets from multi-hot labels (clip only)
    w_global: float = 1.0
    w_region: float = 0.0  # WristMIR region ↔ caption
    w_organ: float = 0.0  # SigVLP organ (chunks over z-range) ↔ organ sentence
    w_gap: float = 0.0  # modality-gap closing
    # LGDEA-style evidence: BCE of the model's finding head on image and report embeddings
    # against the item's findings, train.data.item_findings (needs config finding_head: true)
    w_finding: float = 0.0
    # the same at the level of a region (WristMIR bone) or organ (SigVLP): the finding
    # head on each region/organ embedding and on its sentence's embedding, against the
    # findings that sentence asserts (needs w_region or w_organ, and the finding head)
    w_region_finding: float = 0.0
    gap_uniformity: float = 0.0  # weight u of the uniformity part of the gap term
    # PhenoLIP: distil the HPO phenotype space into image/report embeddings against the
    # model's phenotype prompts (medseek.train.pheno; needs the pheno extra)
    w_pheno: float = 0.0
    # LGDEA with unpaired data (medseek.train.unpaired): the finding BCE on the image side
    # of image-only rows and the text side of report-only rows of a batch with "pairing"
    w_finding_unpaired: float = 0.0
    # the finding BCE on each distinct report sentence's text embedding against that
    # sentence's own (negation-aware) findings, normal axis excluded (sentence_finding_loss)
    w_sentence_finding: float = 0.0
    # abnormal organ sentence ↔ whole-volume embeddings with finding-aware soft targets
    # (organ_volume_loss; volumes only)
    w_organ_volume: float = 0.0
    # PRIMA's label-aware soft targets between the *images* of a batch (neighbour_loss):
    # the space an image query searches learns that cases sharing labels are neighbours,
    # graded by the Jaccard overlap of their multi-hot labels
    w_neighbours: float = 0.0
    neighbour_temperature: float = 0.1

    def __post_init__(self) -> None:
        if self.contrastive not in CONTRASTIVE:
            raise ValueError(f"contrastive must be one of {CONTRASTIVE}, got {self.contrastive!r}")
        if self.soft_labels and self.contrastive != "clip":
            raise ValueError("soft_labels needs contrastive='clip' (the sigmoid loss has no soft targets)")
        for name in ("w_global", "w_region", "w_organ", "w_gap", "gap_uniformity", "w_finding",
                     "w_region_finding", "w_pheno", "w_finding_unpaired", "w_sentence_finding",
                     "w_organ_volume", "w_neighbours"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if not isinstance(self.neighbour_temperature, (int, float)) or not self.neighbour_temperature > 0:
            raise ValueError(f"neighbour_temperature must be a number > 0, got {self.neighbour_temperature!r}")


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None, kind: str,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """Paired contrastive loss of ``a`` (B, D) against ``b`` (B, D), row i ↔ row i.

    ``scale`` (1,) is the exponentiated logit scale; ``bias`` (1,) is required for
    ``"siglip"``; ``labels`` (B, L) multi-hot gives soft CLIP targets.
    """
    if kind == "clip":
        return kernels.clip_loss(a, b, scale, labels)
    if kind == "siglip":
        if bias is None:
            raise ValueError("kind='siglip' needs a logit bias; the model was built with loss='clip'")
        if labels is not None:
            raise ValueError("labels (soft targets) are only supported with kind='clip'")
        return kernels.siglip_loss(a, b, scale, bias)
    raise ValueError(f"kind must be one of {CONTRASTIVE}, got {kind!r}")


def neighbour_loss(vis: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-target InfoNCE of the images ``vis`` (B, D), unit norm, against each other:
    row i's softmax over ``j != i`` of ``vis_i · vis_j / temperature`` against
    ``t_ij = J_ij / Σ_k J_ik`` with ``J`` the Jaccard overlap of the multi-hot ``labels``
    (B, L). Rows sharing no label with any other row of the batch have no target and are
    left out; with none left the loss is 0 (kept in the graph)."""
    if vis.shape[0] != labels.shape[0]:
        raise ValueError(f"vis has {vis.shape[0]} rows but labels {labels.shape[0]}")
    y = labels.to(torch.float32)
    inter = y @ y.T  # (B, B)
    union = y.sum(1, keepdim=True) + y.sum(1) - inter
    jac = torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))
    eye = torch.eye(vis.shape[0], dtype=torch.bool, device=vis.device)
    jac = jac.masked_fill(eye, 0.0)
    mass = jac.sum(1)
    keep = mass > 0
    if not keep.any():
        return vis.sum() * 0.0
    logits = (vis.float() @ vis.float().T / temperature).masked_fill(eye, float("-inf"))
    logp = torch.log_softmax(logits, dim=1).masked_fill(eye, 0.0)  # 0·(-inf) would be NaN
    target = jac / mass.clamp_min(1e-12)[:, None]
    return -(target * logp).sum(1)[keep].mean()


def grouped_siglip_loss(a: torch.Tensor, b: torch.Tensor, group_ids: torch.Tensor,
                        scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Sigmoid loss ``-Σ_ij logsigmoid(z_ij (s·a_i·b_j + bias)) / M`` with ``z_ij = +1``
    when ``group_ids[i] == group_ids[j]`` (equal texts) else -1; with all ids distinct it
    is ``kernels.siglip_loss``. Materialises the (M, M) logits (M is small here)."""
    logits = scale * (a.float() @ b.float().T) + bias  # (M, M)
    z = (group_ids[:, None] == group_ids[None, :]).to(logits.dtype) * 2 - 1
    return -torch.nn.functional.logsigmoid(z * logits).sum() / a.shape[0]


def grouped_pair_loss(a: torch.Tensor, b: torch.Tensor, group_ids: torch.Tensor,
                      scale: torch.Tensor, bias: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Contrastive loss over paired rows where equal ``group_ids`` mark equal texts.

    Used for regions ↔ captions and organs ↔ sentences: ``a``, ``b`` (M, D), ``group_ids``
    (M,) int64. CLIP: ``kernels.clip_loss`` (duplicates need no care, module doc);
    SigLIP: :func:`grouped_siglip_loss`.
    """
    if a.shape != b.shape or a.dim() != 2 or group_ids.shape != (a.shape[0],):
        raise ValueError(
            f"a, b must be (M, D) and group_ids (M,), got {tuple(a.shape)}, {tuple(b.shape)}, "
            f"{tuple(group_ids.shape)}"
        )
    if kind == "siglip":
        if bias is None:
            raise ValueError("kind='siglip' needs a logit bias; the model was built with loss='clip'")
        return grouped_siglip_loss(a, b, group_ids, scale, bias)
    return contrastive_loss(a, b, scale, bias, kind)


def modality_gap_loss(x: torch.Tensor, y: torch.Tensor, uniformity: float = 0.0) -> torch.Tensor:
    """``‖mean(x) − mean(y)‖² + uniformity · log mean exp(−2‖z_a − z_b‖²)`` (module doc)."""
    gap = (x.float().mean(0) - y.float().mean(0)).pow(2).sum()
    if uniformity > 0:
        z = torch.cat([x, y]).float()
        d2 = (2.0 - 2.0 * z @ z.T).clamp_min(0)  # (2B, 2B) ‖a−b‖² of unit vectors; no sqrt,
        # so no NaN gradient where two embeddings coincide (cdist's backward at 0)
        off = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
        gap = gap + uniformity * torch.log(torch.exp(-2.0 * d2[off]).mean())
    return gap


def finding_loss(model, vis: torch.Tensor, txt: torch.Tensor, findings: torch.Tensor) -> torch.Tensor:
    """Mean BCE of ``model.finding_logits`` on image and on report embeddings (B, D)
    against the item's findings ``(B, F)`` 0/1: one evidence space for both modalities.
    """
    target = findings.to(vis.dtype)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    return 0.5 * (bce(model.finding_logits(vis), target) + bce(model.finding_logits(txt), target))


def sentence_finding_loss(model, txt: torch.Tensor, findings: torch.Tensor) -> torch.Tensor:
    """Mean BCE of ``model.finding_logits`` on sentence embeddings ``(M, D)`` against
    their findings ``(M, F)`` 0/1, over every axis but ``normal`` (module doc)."""
    from medseek.text.concepts import NORMAL_AXIS, concept_names

    names = concept_names()
    if findings.shape[-1] != len(names):
        raise ValueError(f"sentence findings must have {len(names)} columns (concept_names()), "
                         f"got {tuple(findings.shape)}")
    keep = [j for j, n in enumerate(names) if n != NORMAL_AXIS]
    logits = model.finding_logits(txt)[:, keep]
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, findings[:, keep].to(logits.dtype))


def organ_volume_loss(sent: torch.Tensor, owner: torch.Tensor, sent_findings: torch.Tensor,
                      vis: torch.Tensor, vis_findings: torch.Tensor,
                      scale: torch.Tensor) -> torch.Tensor:
    """Soft-target InfoNCE of organ sentences ``sent`` (M, D) over volumes ``vis`` (B, D).

    ``owner`` (M,) is each sentence's volume row; ``sent_findings`` (M, F) and
    ``vis_findings`` (B, F) are 0/1 over :func:`medseek.text.concepts.concept_names`.
    Only sentences asserting a finding other than ``normal`` take part (a normal
    phrasing fits most volumes and names none); their target spreads evenly over their
    own volume and every volume holding all their findings. Returns a 0-d tensor (0
    with a gradient when no sentence takes part)."""
    from medseek.text.concepts import NORMAL_AXIS, concept_names

    m, b = sent.shape[0], vis.shape[0]
    if owner.shape != (m,) or sent_findings.shape[0] != m or vis_findings.shape[0] != b:
        raise ValueError(f"need sent (M, D), owner (M,), sent_findings (M, F), vis (B, D), "
                         f"vis_findings (B, F); got {tuple(sent.shape)}, {tuple(owner.shape)}, "
                         f"{tuple(sent_findings.shape)}, {tuple(vis.shape)}, {tuple(vis_findings.shape)}")
    if m and (owner.min() < 0 or owner.max() >= b):
        raise ValueError(f"owner rows must be in [0, {b}), got {owner.min()}..{owner.max()}")
    keep = [j for j, n in enumerate(concept_names()) if n != NORMAL_AXIS]
    sf, vf = sent_findings[:, keep] > 0, vis_findings[:, keep] > 0
    asserts = sf.any(1)
    if not bool(asserts.any()):
        return vis.sum() * 0.0
    sf, owner, sent = sf[asserts], owner[asserts], sent[asserts]
    target = (~sf[:, None, :] | vf[None, :, :]).all(-1).float()  # (M', B) volume has them all
    target[torch.arange(len(owner)), owner] = 1.0
    target = target / target.sum(1, keepdim=True)
    logits = scale * (sent.float() @ vis.float().T)
    return -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()


Gather = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _encode_text(model, batch: dict, prefix: str) -> torch.Tensor:
    """Projected text embeddings of ``batch[prefix + "input_ids"]``; when the batch holds
    ``prefix + "text_features"`` (a frozen tower's cached output, see
    :mod:`medseek.train.text_features`) only the head runs."""
    feats = batch.get(f"{prefix}text_features")
    if feats is not None:
        return model.text_head(feats)
    return model.encode_text(batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"])


def encode_batch(model, batch: dict, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Run the towers the configured terms need; returns the embeddings by name.

    Keys: ``visual`` (B, D), ``text`` (B, D), and, when the term is on, ``region`` /
    ``region_text`` / ``region_group`` (M pairs) or ``organ`` / ``organ_text`` /
    ``organ_group``.
    """
    out: dict[str, torch.Tensor] = {}
    out["text"] = _encode_text(model, batch, "")
    if getattr(cfg, "w_sentence_finding", 0.0) > 0 and "sentence_findings" in batch:
        out["sentence_text"] = _encode_text(model, batch, "sentence_")  # (M, D)
    if model.modality == "image":
        if cfg.w_region > 0:
            glob, regions = model.encode_image_and_regions(batch["images"], batch["boxes"])
            valid = batch["region_valid"]  # (B, R) bool: the region has a caption
            out["region"] = regions[valid]  # (M, D)
            out["region_text"] = _encode_text(model, batch, "region_")  # (M, D)
            out["region_group"] = batch["region_group"]
        else:
            glob = model.encode_image(batch["images"])
        out["visual"] = glob
        return out
    chunks = model.visual.encode_chunks(batch["tokens"], batch["positions"], batch["valid_mask"])
    from medseek.models.vit3d import group_chunks, organ_embedding

    grouped, mask = group_chunks(chunks, batch["chunk_counts"])
    out["visual"] = model.visual_head(model.visual.pool_chunks(grouped, mask))
    if getattr(cfg, "w_organ_volume", 0.0) > 0 and batch["organs"]:
        # a sentence can sit on several regions of its volume (organ and finding): once each
        first: dict[tuple[int, int], int] = {}
        for k, ((b, _, _), g) in enumerate(zip(batch["organs"], batch["organ_group"].tolist())):
            first.setdefault((b, g if g >= 0 else -1 - k), k)
        rows = list(first.values())
        texts = _encode_text(model, batch, "organ_")
        out["organ_volume_text"] = texts[rows]
        out["organ_volume_owner"] = torch.tensor([batch["organs"][k][0] for k in rows], dtype=torch.long)
        out["organ_volume_findings"] = batch["organ_findings"][rows]
    if cfg.w_organ > 0 and batch["organs"]:
        chunk_embs = model.visual_head(chunks)  # (C, D): chunks share the volume space
        starts = torch.cumsum(torch.tensor([0, *batch["chunk_counts"]]), 0).tolist()
        organ = []
        for b, z0, z1 in batch["organs"]:
            s, e = starts[b], starts[b + 1]
            organ.append(organ_embedding(chunk_embs[s:e], batch["z_start"][s:e], batch["depth"],
                                         z0, z1, valid=batch["valid"][s:e]))
        out["organ"] = torch.stack(organ)  # (M, D)
        out["organ_text"] = _encode_text(model, batch, "organ_")
        out["organ_group"] = batch["organ_group"]
    return out


def combine_losses(model, emb: dict[str, torch.Tensor], batch: dict, cfg: LossConfig,
                   gather: Gather = _identity) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the configured terms over (gathered) embeddings.

    ``gather`` concatenates a tensor over data-parallel ranks (identity in one process),
    so every rank computes the loss of the global batch.
    """
    scale = model.logit_scale.scale()
    bias = model.logit_scale.bias
    parts: dict[str, torch.Tensor] = {}
    vis, txt = gather(emb["visual"]), gather(emb["text"])
    findings = gather(batch["findings"]) if "findings" in batch else None
    pairing = gather(batch["pairing"]) if batch.get("pairing") is not None else None
    imaged = (vis, gather(batch["labels"])) if cfg.w_neighbours > 0 else None
    if pairing is not None:  # unpaired evidence alignment: only the pairs are pairs
        from .unpaired import PAIRED, check_unpaired_regions, unpaired_finding_loss

        check_unpaired_regions(batch, cfg)

        if cfg.w_finding_unpaired > 0:
            parts["finding_unpaired"] = unpaired_finding_loss(model, vis, txt, findings, pairing)
        if imaged is not None:
            from .unpaired import REPORT_ONLY

            imaged = (vis[pairing != REPORT_ONLY], imaged[1][pairing != REPORT_ONLY])
        keep = pairing == PAIRED
        vis, txt = vis[keep], txt[keep]
        findings = findings[keep] if findings is not None else None
    has_pairs = vis.shape[0] > 0
    if cfg.w_global > 0 and has_pairs:
        labels = gather(batch["labels"]) if cfg.soft_labels else None
        if labels is not None and pairing is not None:
            labels = labels[pairing == PAIRED]
        parts["global"] = contrastive_loss(vis, txt, scale, bias, cfg.contrastive, labels)
    for key, weight in (("region", cfg.w_region), ("organ", cfg.w_organ)):
        if weight > 0 and key in emb:
            parts[key] = grouped_pair_loss(gather(emb[key]), gather(emb[f"{key}_text"]),
                                           gather(emb[f"{key}_group"]), scale, bias, cfg.contrastive)
    if cfg.w_gap > 0 and has_pairs:
        parts["gap"] = modality_gap_loss(vis, txt, cfg.gap_uniformity)
    if cfg.w_finding > 0 and has_pairs:
        parts["finding"] = finding_loss(model, vis, txt, findings)
    if cfg.w_region_finding > 0:
        key = "region" if "region" in emb else "organ"
        if key in emb and emb[key].shape[0] > 0:
            parts["region_finding"] = finding_loss(model, gather(emb[key]), gather(emb[f"{key}_text"]),
                                                   gather(batch[f"{key}_findings"]))
    if cfg.w_sentence_finding > 0 and "sentence_text" in emb:
        sent = gather(emb["sentence_text"])
        if sent.shape[0] > 0:
            parts["sentence_finding"] = sentence_finding_loss(model, sent, gather(batch["sentence_findings"]))
    if cfg.w_organ_volume > 0 and "organ_volume_text" in emb and findings is not None:
        # local: the sentences' owner rows index this process's volumes
        parts["organ_volume"] = organ_volume_loss(emb["organ_volume_text"], emb["organ_volume_owner"],
                                                  emb["organ_volume_findings"], emb["visual"],
                                                  batch["findings"], scale)
    if cfg.w_neighbours > 0:
        # every row with a real image: the pairs and, unpaired, the image-only rows (their
        # labels are theirs; a report-only row's image is zeros)
        nb_vis, nb_labels = imaged
        if nb_vis.shape[0] > 1:
            parts["neighbours"] = neighbour_loss(nb_vis, nb_labels, cfg.neighbour_temperature)
    if cfg.w_pheno > 0 and has_pairs:
        from .pheno import pheno_loss

        parts["pheno"] = pheno_loss(model, vis, txt, findings)
    weights = {"global": cfg.w_global, "region": cfg.w_region, "organ": cfg.w_organ,
               "gap": cfg.w_gap, "finding": cfg.w_finding, "region_finding": cfg.w_region_finding,
               "pheno": cfg.w_pheno, "finding_unpaired": cfg.w_finding_unpaired,
               "sentence_finding": cfg.w_sentence_finding,
               "organ_volume": cfg.w_organ_volume, "neighbours": cfg.w_neighbours}
    if not parts:
        raise ValueError("no loss term is active: every weight is 0 or its inputs are missing")
    total = sum(weights[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}
