"""Named-region boxes of a synth-cxr phantom, read from what was drawn.

The chest localiser (``medseek.models.localiser``, region set ``"chest"``) needs boxes of
the lung zones, the costophrenic angles and the cardiac silhouette. The generator knows
them: the PA canvas keeps each lung's aerated mask (already in image coordinates, pose
included) and the anatomy keeps the heart ellipse it drew. This module only reads those
after drawing; it draws nothing, so adding boxes leaves every rendered pixel unchanged
(``tests/test_localiser.py`` checks it).

Definitions (PA; the patient's right is on the image left):

* ``<side> upper / mid / lower zone``: the lung's bounding box cut into three equal
  heights, apex to the lowest point of its hemidiaphragm (the radiographic zones);
* ``<side> costophrenic angle``: the lateral 40 % of the lung's width over its lowest
  20 % of height, where the dome meets the chest wall;
* ``cardiac silhouette``: the heart's drawn mask (ellipse above the diaphragm).

The lateral view gets the cardiac silhouette only: left and right lungs overlap there.
Boxes are ``[x0, y0, x1, y1]`` in pixel-edge coordinates of the ``size`` px image.
"""

from __future__ import annotations

import numpy as np

from medseek.data.synth import raster

ZONES = ("upper", "mid", "lower")


def _mask_box(mask: np.ndarray, level: float = 0.5) -> tuple[float, float, float, float] | None:
    """Pixel-edge box of the pixels of ``mask`` at or above ``level``; None if none."""
    rows = np.flatnonzero((mask >= level).any(axis=1))
    cols = np.flatnonzero((mask >= level).any(axis=0))
    if rows.size == 0:
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def _heart_mask(canvas) -> np.ndarray:
    """The heart as :func:`medseek.data.synth.cxr_anatomy.draw_pa` draws it (a unit mask)."""
    a = canvas.anatomy
    X, Y = canvas.X, canvas.Y
    if canvas.view == "PA":
        cx, cy, w, h = a.extra["heart"]
        above = np.clip((0.5 * (a.dome_right + a.dome_left) + 0.01 - Y) / 0.01, 0, 1)
        return above * raster.ellipse(X, Y, cx, cy, w, h, angle=-0.25, edge=0.008)
    cx, cy, w, h = a.extra["heart_lateral"]
    dome = 0.5 * (a.dome_right + a.dome_left)
    k = a.dome_depth / (0.8 * a.ap_depth) ** 2
    diaph = dome + k * (X - 0.45) ** 2 + 0.02 * (X > 0.5)
    return np.clip((diaph + 0.01 - Y) / 0.01, 0, 1) * raster.ellipse(X, Y, cx, cy, w, h, angle=0.5)


def lung_boxes(mask: np.ndarray, side: str) -> dict[str, tuple[float, float, float, float]]:
    """Zone and costophrenic-angle boxes of one lung's mask (module docstring)."""
    box = _mask_box(mask)
    if box is None:
        return {}
    x0, y0, x1, y1 = box
    third = (y1 - y0) / 3.0
    out = {f"{side} {zone} zone": (x0, y0 + i * third, x1, y0 + (i + 1) * third)
           for i, zone in enumerate(ZONES)}
    width = 0.4 * (x1 - x0)
    # the right lung is on the image left in PA: its lateral wall is at x0
    cx0, cx1 = (x0, x0 + width) if side == "right" else (x1 - width, x1)
    out[f"{side} costophrenic angle"] = (cx0, y1 - 0.2 * (y1 - y0), cx1, y1)
    return out


def canvas_boxes(canvas) -> dict[str, tuple[float, float, float, float]]:
    """Named boxes of a drawn canvas (PA: lung zones, costophrenic angles, heart;
    lateral: heart), in pixels, read from its masks: nothing is drawn."""
    out: dict[str, tuple[float, float, float, float]] = {}
    if canvas.view == "PA":
        out.update(lung_boxes(canvas.lung_right, "right"))
        out.update(lung_boxes(canvas.lung_left, "left"))
    heart = _mask_box(_heart_mask(canvas))
    if heart is not None:
        out["cardiac silhouette"] = heart
    return {k: tuple(round(v, 1) for v in b) for k, b in out.items()}
