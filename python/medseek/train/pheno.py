"""PhenoLIP-style phenotype knowledge (seed "PhenoLIP"): an ontology-derived phenotype
space (stage 1) distilled into image-text pretraining by a teacher-guided loss (stage 2).

Stage 1, :func:`build_phenotype_space`
    Every HPO term that medseek's findings map to (:data:`medseek.text.phenotypes.
    PHENOTYPE_MAP`) and its ancestors up to ``depth`` ``is_a`` steps form a small graph.
    Each node's name + synonyms + definition is embedded by the pretrained MiniLM sentence
    encoder (knowledge from the text), then smoothed over the undirected ``is_a`` edges
    (knowledge from the graph): ``h ← normalise((1 − α)·e + α·mean_{n ∈ N(v)} h_n)``,
    ``steps`` times (personalised-PageRank-style propagation, no training), so parent,
    child and sibling phenotypes move together while each keeps its own text. The space
    of the mapped terms is cached as ``pheno_space.npz`` (:func:`phenotype_space`).

Stage 2, :func:`pheno_loss` (``LossConfig.w_pheno``)
    The abstract gives no formula; we distil the teacher's *relational* knowledge. For a
    pair whose report asserts findings with phenotypes ``O``, the teacher's belief that
    phenotype ``p`` is shown is ``t_p = max_{o ∈ O} K[o, p]`` (``K`` the stage-1 cosine),
    ``q = softmax(t / τ_t)``. The student's belief is ``softmax(x · s_p / τ_s)`` of the
    image (and of the report) embedding ``x`` against the model's own embedding ``s_p`` of
    a prompt naming ``p`` ("There is pleural effusion."); the loss is ``KL(q ‖ student)``,
    plus the same KL between rows of ``softmax(K / τ_t)`` and of the prompt-prompt
    similarities (the text side keeps the ontology's geometry). Phenotypes no training
    report names still get teacher mass through their ontology neighbours: that is how
    :func:`write_holdout_corpus`'s held-out phenotypes can be recognised zero-shot.
    Reports asserting no mapped phenotype (normal studies, devices only) are skipped.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

SPACE_FILE = "pheno_space.npz"
ANCESTOR_DEPTH = 2  # is_a steps up from each mapped term kept in the smoothing graph
SMOOTH_ALPHA = 0.5  # weight of the neighbours' mean in one propagation step
SMOOTH_STEPS = 2
TEACHER_TEMPERATURE = 0.1  # τ_t over cosines in [-1, 1]
STUDENT_TEMPERATURE = 0.1  # τ_s over the student's cosines


# ---------------------------------------------------------------------------- stage 1


@dataclass(frozen=True)
class PhenotypeSpace:
    """Unit embeddings of the mapped phenotypes: ``raw`` (text only) and ``smoothed``
    (text + graph), ``(P, 384)`` float32, rows in ``ids`` order."""

    ids: tuple[str, ...]
    names: tuple[str, ...]
    raw: np.ndarray
    smoothed: np.ndarray
    version: str  # the ontology's data-version

    def similarity(self) -> np.ndarray:
        """``(P, P)`` cosine of the smoothed embeddings (the teacher's ``K``)."""
        return self.smoothed @ self.smoothed.T

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, ids=np.array(self.ids), names=np.array(self.names), raw=self.raw,
                 smoothed=self.smoothed, version=np.array(self.version))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PhenotypeSpace":
        z = np.load(Path(path), allow_pickle=False)
        return cls(tuple(str(x) for x in z["ids"]), tuple(str(x) for x in z["names"]), z["raw"],
                   z["smoothed"], str(z["version"]))


def mapped_ids() -> tuple[str, ...]:
    """The distinct HPO ids of the mapping table, in table order."""
    from medseek.text.phenotypes import phenotype_links

    return tuple(dict.fromkeys(r.hpo_id for r in phenotype_links().values() if r.hpo_id))


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def smooth_over_graph(emb: np.ndarray, edges: list[tuple[int, int]], alpha: float = SMOOTH_ALPHA,
                      steps: int = SMOOTH_STEPS) -> np.ndarray:
    """Propagate unit rows ``emb`` (N, D) over undirected ``edges`` (module doc); a node
    without neighbours keeps its embedding."""
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
    n = emb.shape[0]
    adj = np.zeros((n, n), dtype=np.float64)
    for a, b in edges:
        if a != b:
            adj[a, b] = adj[b, a] = 1.0
    deg = adj.sum(1, keepdims=True)
    base = emb.astype(np.float64)
    h = base
    for _ in range(steps):
        nbr = np.divide(adj @ h, deg, out=base.copy(), where=deg > 0)
        h = _normalise((1 - alpha) * base + alpha * nbr)
    return h.astype(np.float32)


def build_phenotype_space(ontology=None, encoder=None, depth: int = ANCESTOR_DEPTH,
                          alpha: float = SMOOTH_ALPHA, steps: int = SMOOTH_STEPS) -> PhenotypeSpace:
    """Stage 1 (module doc). ``encoder``: anything with ``encode(list[str]) -> (N, D)``
    unit rows (default the pretrained MiniLM, :class:`medseek.models.text_tower.TextEncoder`)."""
    from medseek.text.phenotypes import load_ontology

    onto = ontology if ontology is not None else load_ontology()
    ids = mapped_ids()
    nodes = list(ids)
    for t in ids:
        nodes += sorted(onto.ancestors(t, depth) - set(nodes))
    pos = {t: i for i, t in enumerate(nodes)}
    edges = [(pos[t], pos[p]) for t in nodes for p in onto[t].parents if p in pos]
    if encoder is None:
        from medseek.models.text_tower import TextEncoder

        encoder = TextEncoder()
    raw = _normalise(np.asarray(encoder.encode([onto[t].text() for t in nodes]), dtype=np.float32))
    smoothed = smooth_over_graph(raw, edges, alpha, steps)
    k = len(ids)
    return PhenotypeSpace(ids, tuple(onto[t].name for t in ids), raw[:k], smoothed[:k], onto.version)


def phenotype_space(cache: str | Path | None = None) -> PhenotypeSpace:
    """The stage-1 space, read from ``cache`` (a ``.npz`` file or a run folder holding
    :data:`SPACE_FILE`) when it holds the same phenotypes of the same ontology release,
    else built (and written there when ``cache`` is given)."""
    from medseek.text.phenotypes import load_ontology

    path = None
    if cache is not None:
        path = Path(cache)
        path = path if path.suffix == ".npz" else path / SPACE_FILE
        if path.is_file():
            space = PhenotypeSpace.load(path)
            if space.ids == mapped_ids() and space.version == load_ontology().version:
                return space
    space = build_phenotype_space()
    if path is not None:
        space.save(path)
    return space


# ---------------------------------------------------------------------------- stage 2


def phenotype_prompts(name: str) -> tuple[str, ...]:
    """Positive report-style sentences naming a phenotype (the student's ``s_p``)."""
    from medseek.eval.prompts import report_prompts

    return report_prompts(name)[0]


class PhenoTeacher:
    """The distillation target built from a :class:`PhenotypeSpace`: ``K`` (P, P), the
    finding → phenotype map ``(F, P)`` over ``concept_names()``, and each phenotype's
    prompts."""

    def __init__(self, space: PhenotypeSpace) -> None:
        from medseek.text.concepts import concept_names
        from medseek.text.phenotypes import phenotype_links

        self.space = space
        self.K = torch.from_numpy(space.similarity()).float()
        names = concept_names()
        col = {t: j for j, t in enumerate(space.ids)}
        fmap = torch.zeros(len(names), len(space.ids))
        for i, n in enumerate(names):
            link = phenotype_links().get(n)
            if link is not None and link.hpo_id is not None:
                if link.hpo_id not in col:
                    raise ValueError(f"phenotype space lacks {link.hpo_id} ({n}); rebuild it")
                fmap[i, col[link.hpo_id]] = 1.0
        self.finding_map = fmap
        self.prompts = [phenotype_prompts(n.lower()) for n in space.names]
        self._features: dict[int, tuple] = {}  # id(tower) -> (weakref to it, features)

    def prompt_embeddings(self, model) -> torch.Tensor:
        """``(P, D)`` unit: per phenotype, the normalised mean of the model's embeddings of
        its prompts. A frozen tower's features are computed once per tower; the text head
        (and an unfrozen tower) get the gradient."""
        from .data import load_tokenizer, tokenize
        from .text_features import text_tower_frozen

        flat = [p for ps in self.prompts for p in ps]
        dev = model.logit_scale.scale().device
        frozen = text_tower_frozen(model)
        held = self._features.get(id(model.text)) if frozen else None
        feats = held[1] if held is not None and held[0]() is model.text else None  # not a reused id
        if feats is None:
            ids, mask = tokenize(load_tokenizer(model.cfg.text.max_length), flat)
            if frozen:
                with torch.no_grad():
                    feats = model.text(ids.to(dev), mask.to(dev)).float()
                self._features[id(model.text)] = (weakref.ref(model.text), feats)
        emb = model.text_head(feats.to(dev)) if feats is not None else \
            model.encode_text(ids.to(dev), mask.to(dev))
        counts = [len(ps) for ps in self.prompts]
        groups = torch.split(emb.float(), counts)
        mean = torch.stack([g.mean(0) for g in groups])
        return torch.nn.functional.normalize(mean, dim=-1)


_installed: dict[str, PhenoTeacher] = {}


def install_teacher(space: PhenotypeSpace) -> PhenoTeacher:
    """Make ``space`` the teacher :func:`pheno_loss` uses in this process (the benchmark
    installs the one cached in its run folder)."""
    _installed["teacher"] = PhenoTeacher(space)
    return _installed["teacher"]


def current_teacher() -> PhenoTeacher:
    """The installed teacher, else one built once from the installed ontology."""
    if "teacher" not in _installed:
        install_teacher(phenotype_space())
    return _installed["teacher"]


def _kl_rows(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``KL(target ‖ softmax(logits))``."""
    logp = torch.log_softmax(logits, dim=-1)
    return (target * (target.clamp_min(1e-12).log() - logp)).sum(-1).mean()


def teacher_targets(findings: torch.Tensor, teacher: PhenoTeacher) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, keep)``: teacher distributions ``(M, P)`` for the ``M`` rows of ``findings``
    (B, F) that assert a mapped phenotype, and the bool mask ``keep`` (B,) of those rows."""
    fmap = teacher.finding_map.to(findings.device)
    K = teacher.K.to(findings.device)
    observed = (findings.float() @ fmap) > 0  # (B, P)
    keep = observed.any(1)
    t = torch.where(observed[keep][:, :, None], K[None], torch.full_like(K[None], -2.0)).amax(1)
    return torch.softmax(t / TEACHER_TEMPERATURE, dim=-1), keep


def pheno_loss(model, vis: torch.Tensor, txt: torch.Tensor, findings: torch.Tensor,
               teacher: PhenoTeacher | None = None) -> torch.Tensor:
    """Stage-2 distillation (module doc) for image ``vis`` and report ``txt`` embeddings
    (B, D), unit rows, and the items' findings ``(B, F)``."""
    teacher = teacher if teacher is not None else current_teacher()
    if findings.shape[-1] != teacher.finding_map.shape[0]:
        raise ValueError(f"findings must have {teacher.finding_map.shape[0]} columns "
                         f"(concept_names()), got {tuple(findings.shape)}")
    s = teacher.prompt_embeddings(model)  # (P, D)
    K = teacher.K.to(s.device)
    rel = _kl_rows(torch.softmax(K / TEACHER_TEMPERATURE, -1), s @ s.T / STUDENT_TEMPERATURE)
    q, keep = teacher_targets(findings, teacher)
    if not bool(keep.any()):
        return rel
    img = _kl_rows(q, vis.float()[keep] @ s.T / STUDENT_TEMPERATURE)
    rep = _kl_rows(q, txt.float()[keep] @ s.T / STUDENT_TEMPERATURE)
    return 0.5 * (img + rep) + rel


# ---------------------------------------------------------------------------- held-out phenotypes

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def holdout_terms(findings: list[str]) -> tuple[set[str], list[re.Pattern]]:
    """For held-out lexicon ``findings``: every lexicon finding sharing their HPO terms
    (the same phenotype in other words), and the patterns that spot any of them in text
    (the lexicon's wordings plus the HPO names and synonyms)."""
    from medseek.text.lexicon import FINDINGS
    from medseek.text.phenotypes import load_ontology, phenotype_links

    links = phenotype_links()
    bad = [f for f in findings if f not in links or links[f].hpo_id is None]
    if bad:
        raise ValueError(f"held-out findings must be lexicon findings with an HPO term, got {bad}")
    ids = {links[f].hpo_id for f in findings}
    names = {f for f, r in links.items() if r.hpo_id in ids}
    onto = load_ontology()
    pats = [f.regex for f in FINDINGS if f.name in names]
    pats += [re.compile(r"\b" + re.escape(n.lower()) + r"\b") for t in ids for n in onto.names_of(t)]
    return names, pats


def mask_report(report: str, patterns: list[re.Pattern]) -> str:
    """``report`` without the sentences any of ``patterns`` matches (negated ones too:
    "No pleural effusion." also names the phenotype)."""
    kept = [s for s in _SENTENCE.split(report) if not any(p.search(s.lower()) for p in patterns)]
    return " ".join(kept)


def write_holdout_corpus(src: str | Path, dst: str | Path, findings: list[str]) -> dict:
    """A copy of the manifest at ``src`` whose train and val reports lose every sentence
    naming a held-out phenotype and whose records lose the labels naming one; the test
    split is unchanged. Image paths become absolute (no pixels are copied). Returns (and
    writes to ``dst/holdout.json``) what was held out and how much text went."""
    from medseek.data.manifest import read_manifest, write_manifest
    from medseek.text.phenotypes import finding_for_label

    src = Path(src)
    src_manifest = src / "manifest.parquet" if src.is_dir() else src
    names, pats = holdout_terms(findings)
    out, masked, dropped = [], 0, 0
    for r in read_manifest(src_manifest):
        path = str((src_manifest.parent / r.path).resolve()) if r.path else r.path
        if r.split in ("train", "val"):
            report = mask_report(r.report, pats) if r.report else r.report
            labels = tuple(lab for lab in r.labels if finding_for_label(lab) not in names)
            masked += int(report != r.report)
            dropped += len(r.labels) - len(labels)
            r = replace(r, report=report, labels=labels)
        out.append(replace(r, path=path))
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    write_manifest(out, dst / "manifest.parquet")
    info = {"held_out": sorted(findings), "held_out_findings": sorted(names),
            "reports_masked": masked, "labels_dropped": dropped, "source": str(src_manifest)}
    (dst / "holdout.json").write_text(json.dumps(info, indent=1))
    return info


# ---------------------------------------------------------------------------- evaluation


def hpo_prompt_sets(label: str, use: str = "name") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Positive and negative prompts for corpus ``label`` from its HPO term alone.

    ``use="name"``: the term's name, synonyms and definition (held-out phenotypes);
    ``use="synonyms"``: only the term's name and synonyms that differ from the label
    word (synonym robustness). Empty tuples when the label has no term or no such words.
    """
    from medseek.eval.prompts import report_prompts
    from medseek.text.phenotypes import finding_for_label, load_ontology, phenotype_links

    finding = finding_for_label(label)
    link = phenotype_links().get(finding) if finding else None
    if link is None or link.hpo_id is None:
        return (), ()
    term = load_ontology()[link.hpo_id]
    words = [w.lower() for w in (term.name, *term.synonyms)]
    if use == "synonyms":
        words = [w for w in words if w not in (label.lower(), (finding or "").lower())]
    elif use != "name":
        raise ValueError(f"use must be 'name' or 'synonyms', got {use!r}")
    words = list(dict.fromkeys(words))
    pos = [p for w in words for p in report_prompts(w)[0]]
    neg = [p for w in words for p in report_prompts(w)[1]]
    if use == "name" and term.definition and words:
        pos.append(term.definition)
    return tuple(pos), tuple(neg)


def prompt_bank(encode, prompt_sets: list[tuple[tuple[str, ...], tuple[str, ...]]]) -> np.ndarray:
    """``(L, 2, D)`` as :func:`medseek.eval.prompts.prompt_embeddings`, from explicit
    positive/negative sentence sets."""
    flat = [s for pos, neg in prompt_sets for s in (*pos, *neg)]
    if any(not pos or not neg for pos, neg in prompt_sets):
        raise ValueError("every prompt set needs positive and negative sentences")
    e = _normalise(np.asarray(encode(flat), dtype=np.float64))
    out, i = [], 0
    for pos, neg in prompt_sets:
        p, n = e[i:i + len(pos)].mean(0), e[i + len(pos):i + len(pos) + len(neg)].mean(0)
        i += len(pos) + len(neg)
        out.append(np.stack([p, n]))
    return _normalise(np.stack(out))


def zero_shot_with(encode, v: np.ndarray, ds, labels: list[str], prompt_sets, n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """Mean zero-shot AUROC over ``labels`` of ``ds`` with the given prompt sets (one per
    label), patient-bootstrap CI (:mod:`medseek.train.ablation`), plus per-label AUROC."""
    import math

    from medseek.eval.classification import auroc, zero_shot_scores

    from .ablation import _cluster_stat_ci, _patients

    if not labels:
        return {"value": None, "labels": []}
    zs = zero_shot_scores(v, prompt_bank(encode, prompt_sets))
    y = ds.label_matrix()
    col = [list(ds.label_names).index(lab) for lab in labels]

    def mean_auc(rows: np.ndarray) -> float:
        vals = [auroc(zs[rows, k], y[rows, j]) for k, j in enumerate(col)]
        vals = [a for a in vals if not math.isnan(a)]
        return float(np.mean(vals)) if vals else float("nan")

    out = _cluster_stat_ci(mean_auc, _patients(ds), n_boot, seed)
    out["labels"] = list(labels)
    out["per_label"] = {lab: auroc(zs[:, k], y[:, j]) for k, (lab, j) in enumerate(zip(labels, col))}
    return out

