"""Chest radiograph phantom: patient anatomy and its PA / lateral projection.

Images are built as a *density* map (projected attenuation, arbitrary units) on a
normalised grid (x right, y down, both in [0, 1)); :func:`expose` turns density into
a radiograph (bright = dense). In the PA view the patient's right is on the image
left. Anatomy parameters are drawn per patient; findings modify them
(:mod:`medseek.data.synth.cxr_findings`) before drawing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medseek.data.synth import raster

VIEWS = ("PA", "LATERAL")
# (fraction from apex to dome, fraction from midline to the lateral wall) for PA,
# (x, fraction from apex to dome) for the lateral view.
_ZONES_PA = {"apex": (0.06, 0.5), "upper lobe": (0.25, 0.55), "paratracheal": (0.22, 0.12),
             "hilum": (0.4, 0.28), "middle lobe": (0.62, 0.4), "lingula": (0.62, 0.45),
             "retrocardiac": (0.78, 0.18), "lower lobe": (0.75, 0.55), "base": (0.85, 0.55),
             "costophrenic angle": (0.95, 0.9), "": (0.5, 0.55)}
_ZONES_LAT = {"apex": (0.5, 0.06), "upper lobe": (0.48, 0.25), "paratracheal": (0.5, 0.2),
              "hilum": (0.5, 0.4), "middle lobe": (0.33, 0.62), "lingula": (0.34, 0.6),
              "retrocardiac": (0.6, 0.75), "lower lobe": (0.64, 0.75), "base": (0.62, 0.86),
              "costophrenic angle": (0.76, 0.95), "": (0.5, 0.5)}


@dataclass
class Anatomy:
    """Per-patient geometry, in normalised PA image units unless noted."""

    cx: float = 0.5            # midline
    thorax_half_width: float = 0.36
    apex_y: float = 0.15       # lung apices
    dome_right: float = 0.70   # top of the right hemidiaphragm
    dome_left: float = 0.72
    dome_depth: float = 0.07   # how far the dome falls to the costophrenic angle
    ctr: float = 0.45          # cardiothoracic ratio (heart width / thorax width)
    heart_height: float = 0.13
    heart_shift: float = 0.045  # towards the patient's left (image right in PA)
    mediastinum_half_width: float = 0.055
    mediastinum_shift: float = 0.0  # mediastinal shift, + towards the image right
    aortic_knob_r: float = 0.028
    aortic_knob_shift: float = 0.06
    spine_half_width: float = 0.034
    spine_curve: float = 0.0   # scoliosis amplitude
    kyphosis: float = 0.0      # lateral-view spine curvature
    rib_spacing: float = 0.052
    rib_curve: float = 1.3
    rib_width: float = 0.013
    bone_density: float = 0.2
    lung_air: float = 0.36     # density removed by aerated lung
    marking_strength: float = 0.07
    body_half_width: float = 0.45
    rotation: float = 0.0      # radians, patient rotation / tilt
    shift: tuple[float, float] = (0.0, 0.0)
    exposure: float = 1.6
    gamma: float = 1.0
    noise: float = 0.012
    ap_depth: float = 0.30     # lateral view: thorax half-depth
    extra: dict = field(default_factory=dict)

    def dome(self, side: str) -> float:
        return self.dome_right if side == "right" else self.dome_left


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's normal anatomy, pose and exposure."""
    u = rng.uniform
    dome_r = u(0.66, 0.73)
    return Anatomy(
        cx=0.5 + u(-0.015, 0.015),
        thorax_half_width=u(0.33, 0.40),
        apex_y=u(0.12, 0.17),
        dome_right=dome_r,
        dome_left=dome_r + u(0.005, 0.035),
        dome_depth=u(0.055, 0.085),
        ctr=u(0.40, 0.48),
        heart_height=u(0.115, 0.14),
        heart_shift=u(0.03, 0.055),
        mediastinum_half_width=u(0.045, 0.06),
        aortic_knob_r=u(0.022, 0.03),
        aortic_knob_shift=u(0.05, 0.07),
        spine_half_width=u(0.03, 0.038),
        rib_spacing=u(0.048, 0.056),
        rib_curve=u(1.0, 1.6),
        rib_width=u(0.011, 0.015),
        bone_density=u(0.17, 0.24),
        lung_air=u(0.32, 0.40),
        marking_strength=u(0.05, 0.08),
        body_half_width=u(0.42, 0.49),
        rotation=float(rng.normal(0.0, 0.02)),
        shift=(float(u(-0.02, 0.02)), float(u(-0.02, 0.02))),
        exposure=u(1.3, 1.9),
        gamma=u(0.85, 1.15),
        noise=u(0.008, 0.016),
        ap_depth=u(0.27, 0.33),
    )


@dataclass
class Canvas:
    """What the drawing passes share: the grid, the density map and useful masks."""

    X: np.ndarray
    Y: np.ndarray
    density: np.ndarray
    lung: np.ndarray           # aerated lung, 0..1
    lung_right: np.ndarray
    lung_left: np.ndarray
    markings: np.ndarray       # vessel texture (before scaling), added at the end
    marking_gain: np.ndarray   # per-pixel multiplier of the markings
    view: str
    anatomy: Anatomy


def pose_grid(X: np.ndarray, Y: np.ndarray, a: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Grid in patient coordinates: undo the patient's rotation and shift."""
    c, s = np.cos(a.rotation), np.sin(a.rotation)
    dx, dy = X - 0.5 - a.shift[0], Y - 0.5 - a.shift[1]
    return (c * dx + s * dy + 0.5).astype(np.float32), (-s * dx + c * dy + 0.5).astype(np.float32)


def diaphragm_y(a: Anatomy, X: np.ndarray, side: str) -> np.ndarray:
    """Height of one hemidiaphragm along x (PA): highest at mid-hemithorax."""
    sign = -1.0 if side == "right" else 1.0
    peak_x = a.cx + sign * 0.45 * a.thorax_half_width
    k = a.dome_depth / (0.55 * a.thorax_half_width) ** 2
    return a.dome(side) + k * (X - peak_x) ** 2


def draw_pa(X: np.ndarray, Y: np.ndarray, a: Anatomy, rng: np.random.Generator) -> Canvas:
    """Normal PA chest: body, lungs, heart, mediastinum, spine, ribs, clavicles."""
    tw, cx = a.thorax_half_width, a.cx
    dens = 0.55 * raster.ellipse(X, Y, cx, 0.62, a.body_half_width, 0.62, edge=0.03)
    # shoulders and neck
    dens += 0.25 * raster.ellipse(X, Y, cx, a.apex_y - 0.02, a.body_half_width + 0.04, 0.09, edge=0.04)
    dens += 0.45 * raster.ellipse(X, Y, cx, 0.02, 0.09, 0.12, edge=0.02)
    lungs = []
    for side, sign in (("right", -1.0), ("left", 1.0)):
        lx = cx + sign * 0.5 * tw
        shape = raster.ellipse(X, Y, lx, 0.5 * (a.apex_y + a.dome(side) + a.dome_depth), 0.52 * tw,
                               0.5 * (a.dome(side) + a.dome_depth - a.apex_y) + 0.02, edge=0.01)
        below = np.clip((diaphragm_y(a, X, side) - Y) / 0.008 + 0.5, 0.0, 1.0)
        medial = np.clip((sign * (X - cx) - a.mediastinum_half_width * 0.8) / 0.01 + 0.5, 0.0, 1.0)
        lungs.append(shape * below * medial)
    lung_r, lung_l = lungs
    lung = np.maximum(lung_r, lung_l)
    # abdomen below the diaphragm is solid soft tissue; the gastric bubble sits under the left dome
    below_r = np.clip((Y - diaphragm_y(a, X, "right")) / 0.01, 0, 1) * (X < cx)
    below_l = np.clip((Y - diaphragm_y(a, X, "left")) / 0.01, 0, 1) * (X >= cx)
    dens += 0.25 * (below_r + below_l) * raster.ellipse(X, Y, cx, 0.6, a.body_half_width, 0.6, edge=0.03)
    dens -= 0.3 * raster.ellipse(X, Y, cx + 0.55 * tw, a.dome_left + 0.05, 0.05, 0.03)
    dens -= a.lung_air * lung
    # mediastinum, aortic knob, heart
    mx = cx + a.mediastinum_shift
    dens += 0.3 * raster.ellipse(X, Y, mx, 0.35, a.mediastinum_half_width, 0.3, edge=0.01)
    dens += 0.3 * raster.ellipse(X, Y, mx + a.aortic_knob_shift, a.apex_y + 0.16, a.aortic_knob_r, a.aortic_knob_r)
    heart_w = a.ctr * tw
    heart_cy = 0.5 * (a.dome_right + a.dome_left) - 0.6 * a.heart_height
    heart_cx = mx + a.heart_shift
    above = np.clip((0.5 * (a.dome_right + a.dome_left) + 0.01 - Y) / 0.01, 0, 1)
    dens += 0.5 * above * raster.ellipse(X, Y, heart_cx, heart_cy, heart_w, a.heart_height, angle=-0.25, edge=0.008)
    a.extra["heart"] = (heart_cx, heart_cy, heart_w, a.heart_height)
    # trachea (air column)
    dens -= 0.25 * raster.segment(X, Y, (cx, 0.0), (mx, a.apex_y + 0.16), 0.022, edge=0.008)
    # spine with vertebral bodies and discs; scoliosis bends it sideways
    spine_x = cx + a.spine_curve * np.sin(np.pi * (Y - 0.1) / 0.8)
    spine = np.clip((a.spine_half_width - np.abs(X - spine_x)) / 0.006 + 0.5, 0, 1)
    discs = 0.75 + 0.25 * (np.cos(2 * np.pi * Y / 0.045) > -0.6)
    dens += a.bone_density * 1.8 * spine * discs
    # posterior ribs: curved bands running laterally and down from the spine
    for side, sign in (("right", -1.0), ("left", 1.0)):
        # ten ribs share one shape, shifted down by rib_spacing: draw them as one periodic band
        x_start, x_end = cx + sign * a.spine_half_width, cx + sign * (tw + 0.03)
        dx = np.abs(X - x_start)
        phase = (Y - (a.apex_y - 0.01) - a.rib_curve * dx ** 2 + 0.02 * dx) / a.rib_spacing
        k = np.round(phase)
        dist = np.abs(phase - k) * a.rib_spacing
        band = np.clip(0.5 - (dist - a.rib_width / 2) / 0.004, 0.0, 1.0) * ((k >= 0) & (k <= 9))
        within = np.clip(0.5 - np.maximum(min(x_start, x_end) - X, X - max(x_start, x_end)) / 0.004, 0.0, 1.0)
        dens += a.bone_density * band * within
        # clavicle
        dens += a.bone_density * 1.4 * raster.segment(
            X, Y, (cx + sign * 0.03, a.apex_y + 0.03), (cx + sign * (tw + 0.02), a.apex_y - 0.04), 0.02)
    markings = _vessel_texture(X, Y, rng, [(cx - 0.12, 0.42), (cx + 0.12, 0.43)])
    return Canvas(X, Y, dens, lung, lung_r, lung_l, markings, np.ones_like(X), "PA", a)


def draw_lateral(X: np.ndarray, Y: np.ndarray, a: Anatomy, rng: np.random.Generator) -> Canvas:
    """Normal left lateral chest: anterior on the image left, spine posterior (right)."""
    d = a.ap_depth
    cxl = 0.5
    dens = 0.7 * raster.ellipse(X, Y, cxl, 0.6, d + 0.1, 0.62, edge=0.03)
    dome = 0.5 * (a.dome_right + a.dome_left)
    k = a.dome_depth / (0.8 * d) ** 2
    diaph = dome + k * (X - (cxl - 0.05)) ** 2 + 0.02 * (X > cxl)
    shape = raster.ellipse(X, Y, cxl, 0.5 * (a.apex_y + dome + a.dome_depth), d, 0.5 * (dome + a.dome_depth - a.apex_y) + 0.03,
                           edge=0.01)
    lung = shape * np.clip((diaph - Y) / 0.008 + 0.5, 0, 1)
    dens -= a.lung_air * 1.4 * lung
    dens += 0.25 * np.clip((Y - diaph) / 0.01, 0, 1) * raster.ellipse(X, Y, cxl, 0.6, d + 0.1, 0.62, edge=0.03)
    heart_w = a.ctr * a.thorax_half_width * 0.85
    heart_c = (cxl - 0.28 * d, dome - 0.55 * a.heart_height)
    dens += 0.5 * np.clip((diaph + 0.01 - Y) / 0.01, 0, 1) * raster.ellipse(
        X, Y, heart_c[0], heart_c[1], heart_w, a.heart_height * 1.1, angle=0.5)
    a.extra["heart_lateral"] = (heart_c[0], heart_c[1], heart_w, a.heart_height * 1.1)
    # trachea and aortic arch
    dens -= 0.12 * raster.segment(X, Y, (cxl - 0.02, 0.0), (cxl + 0.02, a.apex_y + 0.2), 0.024)
    dens += 0.2 * raster.ellipse(X, Y, cxl + 0.02, a.apex_y + 0.14, 0.09, 0.05) * (1 - raster.ellipse(
        X, Y, cxl + 0.02, a.apex_y + 0.15, 0.06, 0.03))
    # spine: vertebral bodies posteriorly with kyphotic curvature
    spine_x = cxl + d * 0.85 + a.kyphosis * np.sin(np.pi * (Y - 0.05) / 0.9)
    body = np.clip((0.04 - np.abs(X - spine_x)) / 0.006 + 0.5, 0, 1)
    discs = 0.7 + 0.3 * (np.cos(2 * np.pi * Y / 0.05) > -0.6)
    dens += a.bone_density * 2.2 * body * discs
    # sternum anteriorly, overlapping posterior ribs
    dens += a.bone_density * 1.5 * raster.segment(X, Y, (cxl - d + 0.01, a.apex_y + 0.05),
                                                  (cxl - d + 0.03, dome - 0.05), 0.018)
    for kk in range(9):
        y0 = a.apex_y + 0.02 + kk * a.rib_spacing
        dens += a.bone_density * 0.6 * raster.segment(X, Y, (spine_x.mean() - 0.02, y0),
                                                      (cxl - 0.05, y0 + 0.1), a.rib_width)
    markings = _vessel_texture(X, Y, rng, [(cxl - 0.02, 0.44)])
    return Canvas(X, Y, dens, lung, lung, lung, markings, np.ones_like(X), "LATERAL", a)


def _vessel_texture(X, Y, rng, hila) -> np.ndarray:
    """Branching-looking vascular markings: ridges of filtered noise, densest at the hila."""
    n = X.shape[0]
    ridges = np.abs(raster.smooth_noise(rng, X.shape, sigma=max(1.5, n / 64)))
    lines = np.clip(1.0 - ridges / 0.25, 0.0, 1.0)  # thin bright lines along the zero crossings
    fall = np.zeros_like(X)
    for hx, hy in hila:
        fall = np.maximum(fall, np.exp(-np.hypot(X - hx, Y - hy) / 0.18))
    return (lines * (0.35 + fall)).astype(np.float32)


def expose(canvas: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Radiograph in [0, 1] from the density map: exposure, gamma, blur and noise."""
    from scipy.ndimage import gaussian_filter

    a = canvas.anatomy
    gain = np.minimum(canvas.marking_gain, 4.0)
    dens = canvas.density + 1.5 * a.marking_strength * canvas.markings * gain * canvas.lung
    img = 1.0 - np.exp(-a.exposure * np.clip(dens, 0.0, None))
    img = img / (1.0 - np.exp(-a.exposure * 2.2))
    img = np.clip(img, 0.0, 1.0) ** a.gamma
    img = gaussian_filter(img, 0.6)
    img = img + a.noise * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def locate(c: Canvas, zone: str, side: str) -> tuple[float, float]:
    """Image position of a lung zone on one side, for the canvas's view."""
    a = c.anatomy
    if c.view == "PA":
        fy, fx = _ZONES_PA.get(zone, _ZONES_PA[""])
        sign = -1.0 if side == "right" else 1.0
        dome = a.dome(side) + 0.5 * a.dome_depth
        return a.cx + sign * fx * a.thorax_half_width, a.apex_y + fy * (dome - a.apex_y)
    x, fy = _ZONES_LAT.get(zone, _ZONES_LAT[""])
    dome = 0.5 * (a.dome_right + a.dome_left) + 0.5 * a.dome_depth
    return 0.5 + (x - 0.5) * a.ap_depth / 0.3, a.apex_y + fy * (dome - a.apex_y)
