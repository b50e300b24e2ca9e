"""Zero-shot prompts phrased the way chest-radiograph reports are written.

A bare label ("pleural effusion") and its negation ("no pleural effusion") are not what a
text tower trained on reports sees: reports write full sentences ("There is a small
left pleural effusion.", "No pleural effusion."), and a negative is usually stated as a
normal finding ("Heart size is normal."). Each label gets a small ensemble of positive
and negative sentences; :func:`prompt_embeddings` averages the unit embeddings of each
side (CLIP-style prompt ensembling), giving the ``(L, 2, D)`` array that
:func:`medseek.eval.classification.zero_shot_scores` takes.

The generic templates work for any finding name; a few common chest findings add the
phrasings radiologists use for them (written here from radiology usage, not taken from
any corpus).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["POSITIVE_TEMPLATES", "NEGATIVE_TEMPLATES", "report_prompts", "prompt_embeddings"]

POSITIVE_TEMPLATES = ("There is {x}.", "{X} is present.", "Findings consistent with {x}.")
NEGATIVE_TEMPLATES = ("No {x}.", "There is no {x}.", "No evidence of {x}.")

# finding -> (extra positive sentences, extra negative sentences)
_SPECIFIC: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "normal": (("No acute cardiopulmonary abnormality.", "The lungs are clear. Heart size is normal."),
               ("There is an acute cardiopulmonary abnormality.", "Abnormal chest radiograph.")),
    "cardiomegaly": (("The heart is enlarged.", "Cardiomegaly."),
                     ("Heart size is normal.", "The cardiac silhouette is normal in size.")),
    "pleural effusion": (("There is a pleural effusion.", "Blunting of the costophrenic angle from effusion."),
                         ("No pleural effusion.", "The costophrenic angles are sharp.")),
    "pneumothorax": (("There is a pneumothorax.",), ("No pneumothorax.",)),
    "opacity": (("There is an opacity in the lung.", "Patchy airspace opacity."),
                ("No focal airspace opacity.", "The lungs are clear.")),
    "atelectasis": (("Bibasilar atelectasis.", "Subsegmental atelectasis."),
                    ("No atelectasis.", "The lungs are well expanded.")),
    "calcified granuloma": (("There is a calcified granuloma.", "Calcified granuloma in the lung."),
                            ("No calcified granuloma.", "No calcified nodules.")),
    "spine degenerative": (("Degenerative changes of the thoracic spine.",
                            "Degenerative disc disease of the spine."),
                           ("The thoracic spine is unremarkable.", "No degenerative changes of the spine.")),
    "tortuous aorta": (("The aorta is tortuous.", "Tortuosity of the thoracic aorta."),
                       ("The aorta is normal in contour.", "No aortic tortuosity.")),
    "hypoinflation": (("Low lung volumes.", "The lungs are hypoinflated."),
                      ("Normal lung volumes.", "The lungs are well inflated.")),
    "hyperinflation": (("The lungs are hyperinflated.", "Hyperexpanded lungs."),
                       ("Normal lung volumes.", "No hyperinflation.")),
    "aortic atherosclerosis": (("Atherosclerotic calcification of the aorta.",),
                               ("No aortic atherosclerosis.",)),
    "nodule": (("There is a pulmonary nodule.",), ("No pulmonary nodules.",)),
    "pulmonary edema": (("There is pulmonary edema.",), ("No pulmonary edema.",)),
    "catheter": (("A central venous catheter is in place.",), ("No lines or tubes.",)),
}


def report_prompts(label: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Positive and negative report sentences for ``label`` (a finding name).

    >>> pos, neg = report_prompts("pleural effusion")
    >>> pos[0], neg[0]
    ('There is pleural effusion.', 'No pleural effusion.')
    """
    x = " ".join(str(label).replace("_", " ").split()).lower()
    if not x:
        raise ValueError("label must be a non-empty finding name")
    fill = {"x": x, "X": x[0].upper() + x[1:]}
    pos = tuple(t.format(**fill) for t in POSITIVE_TEMPLATES)
    neg = tuple(t.format(**fill) for t in NEGATIVE_TEMPLATES)
    extra_pos, extra_neg = _SPECIFIC.get(x, ((), ()))
    if x == "normal":  # "There is normal." is not a sentence: the specific ones replace them
        return extra_pos, extra_neg
    return pos + extra_pos, neg + extra_neg


def prompt_embeddings(encode: Callable[[list[str]], np.ndarray], labels: Sequence[str]) -> np.ndarray:
    """``(L, 2, D)`` float64: per label, the normalised mean of the unit embeddings of its
    positive (``[l, 0]``) and negative (``[l, 1]``) sentences.

    ``encode`` maps a list of strings to an ``(n, D)`` array (e.g. a model's projected
    text embeddings); all prompts go through it in one call.
    """
    sides = [report_prompts(lab) for lab in labels]
    flat = [s for pos, neg in sides for s in (*pos, *neg)]
    emb = np.asarray(encode(flat), dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != len(flat):
        raise ValueError(f"encode must return ({len(flat)}, D), got shape {emb.shape}")
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    out = np.empty((len(sides), 2, emb.shape[1]))
    at = 0
    for j, (pos, neg) in enumerate(sides):
        for side, group in enumerate((pos, neg)):
            mean = emb[at:at + len(group)].mean(0)
            out[j, side] = mean / max(np.linalg.norm(mean), 1e-12)
            at += len(group)
    return out
