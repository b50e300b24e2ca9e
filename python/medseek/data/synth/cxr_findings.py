"""Findings drawn onto the chest phantom, conditioned on location, side and severity.

Two kinds: *modifiers* change the patient's anatomy before it is drawn (cardiomegaly
widens the heart, hyperinflation lowers and flattens the diaphragm); *overlays* add
density to a drawn :class:`~medseek.data.synth.cxr_anatomy.Canvas` (an effusion fills
a costophrenic angle, a nodule is a small round density). Amplitudes grow with the
MeSH severity, so mild findings are subtle. Findings with no visual model here
(e.g. ``shoulder``) are left out of the picture and listed by :func:`unrendered`.
"""

from __future__ import annotations

import numpy as np

from medseek.data.mesh import Finding
from medseek.data.synth import raster
from medseek.data.synth.cxr_anatomy import Anatomy, Canvas, diaphragm_y, locate
from medseek.data.synth.cxr_devices import DEVICES, draw_device

OPACITIES = {"opacity", "airspace disease", "density", "infiltrate", "consolidation", "pneumonia",
             "lung abnormality", "cavitation", "tuberculosis", "sarcoidosis", "bronchiectasis"}
CALCIFIED = {"calcified granuloma", "calcinosis", "granulomatous disease"}
INFLATION = {"hyperinflation", "emphysema", "copd", "hyperlucent lung", "flattened diaphragm"}
RENDERED = (OPACITIES | CALCIFIED | INFLATION | {
    "cardiomegaly", "pericardial effusion", "hypoinflation", "elevated diaphragm", "diaphragmatic eventration",
    "scoliosis", "kyphosis", "widened mediastinum", "tortuous aorta", "aortic abnormality", "osteopenia",
    "technical quality unsatisfactory", "atelectasis", "volume loss", "scarring", "pleural effusion",
    "blunted costophrenic angle", "pneumothorax", "lucency", "nodule", "mass", "aortic atherosclerosis",
    "fracture", "vertebral deformity", "spine degenerative", "diffuse idiopathic skeletal hyperostosis",
    "spinal fusion", "catheter", "tube", "surgical clips", "implanted device", "medical device", "stent",
    "foreign body", "sutures", "breast implants", "pulmonary congestion", "pulmonary edema",
    "prominent markings", "interstitial markings", "fibrosis", "interstitial lung disease", "hiatal hernia",
    "pleural thickening", "epicardial fat", "subcutaneous emphysema", "pneumoperitoneum", "azygos lobe",
    "pneumonectomy", "cysts", "pulmonary hypertension", "bullae", "contrast media", "nipple shadow",
    "enlarged pulmonary artery", "lymphadenopathy", "mediastinal shift", "cardiac chamber enlargement",
    "aortic aneurysm", "obscured heart border", "bone sclerosis", "cystic fibrosis", "mastectomy",
})


def unrendered(findings: list[Finding]) -> list[str]:
    """Names among ``findings`` that the phantom does not draw."""
    return sorted({f.name for f in findings if f.name not in RENDERED and f.name != "normal"})


def _side(f: Finding, rng: np.random.Generator, default: str | None = None) -> list[str]:
    if f.side == "bilateral":
        return ["right", "left"]
    if f.side:
        return [f.side]
    return [default or ("right" if rng.random() < 0.5 else "left")]


def apply_modifiers(a: Anatomy, findings: list[Finding], rng: np.random.Generator) -> Anatomy:
    """Change anatomy in place for findings that alter size, shape or exposure."""
    for f in findings:
        s, n = f.severity, f.name
        if n == "cardiomegaly":
            a.ctr = max(a.ctr, 0.53 + 0.2 * s)
            a.heart_height *= 1.0 + 0.2 * s
        elif n == "cardiac chamber enlargement":
            a.ctr = max(a.ctr, 0.5 + 0.1 * s)
        elif n == "mediastinal shift":
            a.mediastinum_shift = (-1.0 if f.side == "right" else 1.0) * (0.015 + 0.03 * s)
        elif n == "pericardial effusion":
            a.ctr = max(a.ctr, 0.56 + 0.15 * s)
            a.heart_height *= 1.25
        elif n in INFLATION:
            a.dome_right += 0.03 + 0.05 * s
            a.dome_left += 0.03 + 0.05 * s
            a.dome_depth *= 0.7 - 0.3 * s
            if n != "flattened diaphragm":
                a.lung_air += 0.05 + 0.08 * s
                a.marking_strength *= 0.8
                a.ap_depth += 0.03
        elif n == "hypoinflation":
            a.dome_right -= 0.03 + 0.05 * s
            a.dome_left -= 0.03 + 0.05 * s
            a.marking_strength *= 1.3
        elif n in ("elevated diaphragm", "diaphragmatic eventration"):
            for side in _side(f, rng, "right"):
                if side == "right":
                    a.dome_right -= 0.04 + 0.06 * s
                else:
                    a.dome_left -= 0.04 + 0.06 * s
        elif n == "scoliosis":
            sign = -1.0 if f.side != "left" else 1.0
            a.spine_curve = sign * (0.008 + 0.03 * s)
        elif n == "kyphosis":
            a.kyphosis = 0.015 + 0.03 * s
        elif n == "widened mediastinum":
            a.mediastinum_half_width += 0.015 + 0.025 * s
        elif n in ("tortuous aorta", "aortic abnormality", "aortic aneurysm"):
            s = max(s, 0.9) if n == "aortic aneurysm" else s
            a.aortic_knob_r += 0.004 + 0.01 * s
            a.aortic_knob_shift += 0.01 + 0.015 * s
            a.extra["tortuous"] = s
        elif n == "osteopenia":
            a.bone_density *= 0.75 - 0.2 * s
        elif n == "technical quality unsatisfactory":
            a.noise *= 2.0 + s
            a.exposure *= float(rng.choice([0.65, 1.5]))
            a.rotation += float(rng.choice([-1, 1])) * 0.05
    # several inflation terms in one report (emphysema + COPD + hyperinflation) stack;
    # keep the result inside a plausible chest
    a.dome_right = float(np.clip(a.dome_right, 0.5, 0.82))
    a.dome_left = float(np.clip(a.dome_left, 0.5, 0.84))
    a.dome_depth = max(a.dome_depth, 0.015)
    a.lung_air = min(a.lung_air, 0.55)
    return a


def _blob(c: Canvas, rng, x, y, size, amp, elongate=1.0, angle=0.0):
    tex = 0.65 + 0.35 * np.clip(raster.smooth_noise(rng, c.X.shape, 2.0), -1.5, 1.5)
    c.density += amp * tex * raster.gaussian(c.X, c.Y, x, y, size * elongate, size) * (0.3 + 0.7 * c.lung)


def _effusion(c: Canvas, side: str, height: float, amp: float) -> None:
    a, X, Y = c.anatomy, c.X, c.Y
    if c.view == "PA":
        sign = -1.0 if side == "right" else 1.0
        lat = np.clip(sign * (X - a.cx) / a.thorax_half_width, 0.0, 1.2)
        base = diaphragm_y(a, X, side)
        level = base - height * (0.35 + 0.9 * lat ** 2)   # meniscus climbs the lateral wall
        mask = np.clip((Y - level) / 0.01, 0, 1) * (lat > 0.12) * (Y < base + 0.03)
        lung = c.lung_right if side == "right" else c.lung_left
        c.density += amp * mask * np.maximum(lung, 0.5 * (lat < 1.05))
    else:
        post = np.clip((X - 0.5) / a.ap_depth, 0.0, 1.2)
        level = 0.5 * (a.dome_right + a.dome_left) + a.dome_depth - height * (0.3 + 1.2 * post ** 2)
        c.density += amp * np.clip((Y - level) / 0.01, 0, 1) * (post > 0.2) * c.lung


def _pneumothorax(c: Canvas, side: str, s: float) -> None:
    a, X, Y = c.anatomy, c.X, c.Y
    sign = -1.0 if side == "right" else 1.0
    if c.view == "PA":
        lx, ly = a.cx + sign * 0.45 * a.thorax_half_width, 0.5 * (a.apex_y + a.dome(side))
        rx, ry = 0.5 * a.thorax_half_width, 0.5 * (a.dome(side) - a.apex_y) + 0.02
        lung = c.lung_right if side == "right" else c.lung_left
    else:
        lx, ly, rx, ry, lung = 0.5, 0.5 * (a.apex_y + a.dome_right), a.ap_depth, 0.3, c.lung
    gap = 0.02 + 0.1 * s
    inner = raster.ellipse(X, Y, lx, ly + gap * 0.5, rx - gap, ry - gap)
    region = lung * (1.0 - inner)
    c.density -= 0.07 * region
    c.marking_gain *= 1.0 - region
    line = inner - raster.ellipse(X, Y, lx, ly + gap * 0.5, rx - gap - 0.004, ry - gap - 0.004)
    c.density += 0.18 * line * lung


def _spine_x(c: Canvas, y: float) -> float:
    a = c.anatomy
    if c.view == "PA":
        return a.cx + a.spine_curve * np.sin(np.pi * (y - 0.1) / 0.8)
    return 0.5 + a.ap_depth * 0.85 + a.kyphosis * np.sin(np.pi * (y - 0.05) / 0.9)


def _rib_y(a: Anatomy, k: int, x: float, sign: float) -> float:
    x0 = a.cx + sign * a.spine_half_width
    return a.apex_y - 0.01 + k * a.rib_spacing + a.rib_curve * (x - x0) ** 2 - 0.02 * abs(x - x0)


def _fracture(c: Canvas, f: Finding, rng) -> None:
    a, X, Y = c.anatomy, c.X, c.Y
    healed = f.has("healed")
    quals = " ".join(f.qualifiers)
    if "vertebra" in quals or "spine" in quals or f.name == "vertebral deformity":
        y = a.apex_y + rng.uniform(0.25, 0.6) * (a.dome_right - a.apex_y)
        x = _spine_x(c, y)
        # compressed, sclerotic vertebral body: a flat dense band with a wedge
        c.density += (0.25 + 0.3 * f.severity) * raster.ellipse(X, Y, x, y, 0.045, 0.008 + 0.004 * (1 - f.severity))
        c.density -= 0.15 * raster.ellipse(X, Y, x, y - 0.017, 0.04, 0.004)
        return
    if c.view != "PA":
        return
    for side in _side(f, rng):
        sign = -1.0 if side == "right" else 1.0
        if "clavicle" in quals:
            t = rng.uniform(0.4, 0.7)
            x = a.cx + sign * (0.03 + t * (a.thorax_half_width - 0.01))
            y = a.apex_y + 0.03 - t * 0.07
        else:
            k = int(rng.integers(3, 9))
            x = a.cx + sign * rng.uniform(0.55, 0.9) * a.thorax_half_width
            y = _rib_y(a, k, x, sign)
        # a dark gap across the bone, step-offset fragments, or a callus when healed
        if healed:
            c.density += 0.35 * raster.ellipse(X, Y, x, y, 0.02, 0.014)
        else:
            c.density -= a.bone_density * 1.2 * raster.segment(X, Y, (x - 0.004, y - 0.02), (x + 0.004, y + 0.02), 0.006)
            c.density += 0.5 * a.bone_density * raster.ellipse(X, Y, x + sign * 0.012, y + 0.006, 0.012, 0.006)


def draw_overlays(c: Canvas, findings: list[Finding], rngs: list[np.random.Generator]) -> None:
    """Draw every overlay finding onto the canvas (one RNG per finding, same in both views)."""
    a, X, Y = c.anatomy, c.X, c.Y
    for f, rng in zip(findings, rngs):
        n, s = f.name, f.severity
        if n in OPACITIES or n == "mass" or n == "nodule":
            sides = _side(f, rng)
            count = int(rng.integers(2, 4)) if {"patchy", "multiple", "scattered"} & set(f.qualifiers) else 1
            diffuse = {"interstitial", "diffuse", "reticular"} & set(f.qualifiers)
            for side in sides:
                for _ in range(count):
                    x, y = locate(c, f.zone, side)
                    x, y = x + rng.normal(0, 0.02), y + rng.normal(0, 0.02)
                    if n == "nodule":
                        c.density += (0.14 + 0.1 * s) * raster.ellipse(X, Y, x, y, 0.008 + 0.012 * s, 0.008 + 0.012 * s)
                    elif n == "mass":
                        r = 0.03 + 0.04 * s
                        c.density += 0.25 * raster.ellipse(X, Y, x, y, r, r * rng.uniform(0.8, 1.1), edge=0.01)
                    elif diffuse:
                        c.marking_gain *= 1.0 + (1.0 + 2.0 * s) * raster.gaussian(X, Y, x, y, 0.15, 0.2)
                    else:
                        streaky = "streaky" in f.qualifiers or "linear" in f.qualifiers
                        amp = (0.05 + 0.2 * s) * (1.3 if n == "consolidation" else 1.0)
                        _blob(c, rng, x, y, 0.03 + 0.04 * s, amp, elongate=3.0 if streaky else 1.3)
        elif n in CALCIFIED:
            many = {"multiple", "scattered"} & set(f.qualifiers) or n == "granulomatous disease"
            hilar = "hilum" in f.qualifiers or "lymph nodes" in f.qualifiers or "mediastinum" in f.qualifiers
            for side in _side(f, rng):
                for _ in range(int(rng.integers(3, 8)) if many else 1):
                    x, y = locate(c, "hilum" if hilar else (f.zone or str(rng.choice(["upper lobe", "middle lobe", "lower lobe"]))), side)
                    x, y = x + rng.normal(0, 0.04 if many else 0.015), y + rng.normal(0, 0.04 if many else 0.015)
                    r = rng.uniform(0.004, 0.008)
                    c.density += rng.uniform(0.3, 0.45) * raster.ellipse(X, Y, x, y, r, r, edge=0.003)
        elif n == "aortic atherosclerosis":
            kx, ky = (a.cx + a.aortic_knob_shift, a.apex_y + 0.16) if c.view == "PA" else (0.52, a.apex_y + 0.12)
            r = a.aortic_knob_r + 0.002
            arc = raster.ellipse(X, Y, kx, ky, r, r) - raster.ellipse(X, Y, kx, ky, r - 0.004, r - 0.004)
            c.density += (0.3 + 0.3 * s) * arc * (Y < ky)
        elif n in ("atelectasis", "volume loss", "scarring"):
            for side in _side(f, rng):
                x, y = locate(c, f.zone or "base", side)
                pieces = 1 if n != "scarring" else 3
                for _ in range(pieces):
                    dx, dy = rng.uniform(0.04, 0.09), rng.normal(0, 0.012)
                    x0 = x + rng.normal(0, 0.015)
                    c.density += (0.07 + 0.15 * s) * raster.segment(X, Y, (x0 - dx, y - dy), (x0 + dx, y + dy),
                                                                      0.006 + 0.01 * s, edge=0.008) * (0.3 + 0.7 * c.lung)
        elif n in ("pleural effusion", "blunted costophrenic angle"):
            h = 0.02 if n == "blunted costophrenic angle" else 0.03 + 0.14 * s
            for side in _side(f, rng, "right"):
                _effusion(c, side, h, 0.9 * a.lung_air)
        elif n in ("pneumothorax", "lucency"):
            for side in _side(f, rng):
                _pneumothorax(c, side, s if n == "pneumothorax" else 0.15)
        elif n == "pneumonectomy" and c.view == "PA":
            lung = c.lung_right if f.side != "left" else c.lung_left
            c.density += 0.95 * a.lung_air * lung
        elif n in ("fracture", "vertebral deformity"):
            _fracture(c, f, rng)
        elif n in ("spine degenerative", "diffuse idiopathic skeletal hyperostosis"):
            for _ in range(int(2 + 6 * s)):
                y = a.apex_y + rng.uniform(0.1, 0.95) * (a.dome_right - a.apex_y)
                x = _spine_x(c, y) + float(rng.choice([-1, 1])) * (a.spine_half_width + 0.004)
                c.density += (0.3 + 0.2 * s) * raster.ellipse(X, Y, x, y, 0.007, 0.004)
        elif n == "spinal fusion":
            for off in (-0.02, 0.02):
                y0 = a.apex_y + rng.uniform(0.0, 0.3)
                xs = _spine_x(c, y0) + off
                c.density += 1.0 * raster.segment(X, Y, (xs, y0), (xs, y0 + 0.2), 0.006)
        elif n in DEVICES:
            draw_device(c, f, rng)
        elif n in ("pulmonary congestion", "pulmonary edema", "pulmonary hypertension"):
            hila = [locate(c, "hilum", sd) for sd in ("right", "left")]
            for hx, hy in hila:
                c.density += (0.05 + 0.15 * s) * raster.gaussian(X, Y, hx, hy, 0.08, 0.1) * c.lung
                c.marking_gain *= 1.0 + (0.5 + s) * raster.gaussian(X, Y, hx, hy, 0.12, 0.15)
            if n == "pulmonary edema" and c.view == "PA":  # Kerley B lines at the lateral bases
                for sd, sign in (("right", -1.0), ("left", 1.0)):
                    for k in range(4):
                        y = a.dome(sd) - 0.02 - 0.015 * k
                        x = a.cx + sign * (a.thorax_half_width - 0.01)
                        c.density += 0.15 * raster.segment(X, Y, (x, y), (x - sign * 0.025, y), 0.003) * c.lung
        elif n in ("prominent markings", "interstitial markings", "fibrosis", "interstitial lung disease",
                   "cystic fibrosis"):
            gain = 1.0 + (0.8 + 1.5 * s)
            if n in ("fibrosis", "interstitial lung disease", "cystic fibrosis"):
                gain *= 1.5
                c.density += 0.025 * np.clip(raster.smooth_noise(rng, X.shape, 1.5), 0, None) * c.lung * (Y > 0.45)
            c.marking_gain *= gain
        elif n in ("enlarged pulmonary artery", "lymphadenopathy"):
            sides = ["right", "left"] if f.side in ("", "bilateral") else [f.side]
            for side in sides:
                x, y = locate(c, "paratracheal" if "paratracheal" in f.qualifiers else "hilum", side)
                r = 0.02 + 0.025 * s
                c.density += 0.18 * raster.ellipse(X, Y, x, y, r, 1.3 * r, edge=0.01)
        elif n == "obscured heart border":
            side = f.side if f.side in ("right", "left") else "left"
            x, y = locate(c, "middle lobe" if side == "right" else "lingula", side)
            _blob(c, rng, x, y, 0.05, 0.12 + 0.1 * s, elongate=1.2)
        elif n == "bone sclerosis":
            y = a.apex_y + rng.uniform(0.2, 0.8) * (a.dome_right - a.apex_y)
            c.density += 0.3 * raster.ellipse(X, Y, _spine_x(c, y), y, 0.025, 0.012)
        elif n == "mastectomy" and c.view == "PA":
            sign = -1.0 if f.side == "right" else 1.0
            c.density -= 0.06 * raster.ellipse(X, Y, a.cx + sign * 0.7 * a.thorax_half_width, a.dome(f.side or "left") - 0.05,
                                               0.15, 0.1, edge=0.04)
        elif n == "hiatal hernia":
            x, y = (a.cx + 0.03, a.dome_left - 0.05) if c.view == "PA" else (0.58, a.dome_left - 0.06)
            r = 0.035 + 0.03 * s
            c.density += 0.3 * raster.ellipse(X, Y, x, y, r, r * 0.8) * (Y > y)
            c.density -= 0.2 * raster.ellipse(X, Y, x, y, r, r * 0.8) * (Y <= y)
        elif n == "pleural thickening":
            for side in _side(f, rng):
                sign = -1.0 if side == "right" else 1.0
                x = a.cx + sign * a.thorax_half_width * 0.98
                c.density += 0.3 * raster.segment(X, Y, (x, a.apex_y + 0.05), (x, a.dome(side)), 0.012 + 0.01 * s)
        elif n == "epicardial fat":
            hx, hy, hw, hh = a.extra["heart"]
            c.density += 0.15 * raster.ellipse(X, Y, hx + hw * 0.9, hy + hh * 0.6, 0.03, 0.03)
        elif n == "subcutaneous emphysema":
            for side in _side(f, rng):
                sign = -1.0 if side == "right" else 1.0
                x = a.cx + sign * (a.thorax_half_width + 0.05)
                c.density -= 0.2 * np.clip(raster.smooth_noise(rng, X.shape, 1.0), 0, None) * raster.ellipse(X, Y, x, 0.45, 0.03, 0.2)
        elif n == "pneumoperitoneum" and c.view == "PA":
            ybase = diaphragm_y(a, X, "right")
            c.density -= 0.35 * np.clip(1 - np.abs(Y - ybase - 0.012) / 0.008, 0, 1) * (X < a.cx - 0.05) * (X > a.cx - a.thorax_half_width)
        elif n == "azygos lobe" and c.view == "PA":
            x = a.cx - 0.06
            c.density += 0.2 * raster.curve_band(X, Y, lambda xx: a.apex_y + 0.1 - 3 * (xx - x) ** 2, x - 0.06, x, 0.004)
        elif n in ("tortuous aorta", "aortic abnormality") and c.view == "PA":
            x0 = a.cx + a.aortic_knob_shift
            y0 = a.apex_y + 0.16
            amp = 0.01 + 0.03 * s
            c.density += 0.2 * raster.curve_band(
                Y.T, X.T, lambda yy: x0 - 0.01 + amp * np.sin(np.pi * (yy - y0) / 0.3), y0, a.dome_left - 0.05, 0.04
            ).T
