"""Pediatric wrist radiograph phantom (PA and lateral) with distal forearm fractures.

Normalised grid, x right, y down. PA: the forearm enters from the bottom, radius on
the image left, ulna on the right, carpals and metacarpals above. A fracture splits a
bone at a level: the distal fragment is drawn shifted (``displacement``, in units of
the bone's half-width) and rotated (``angulation``, degrees) about the fracture point,
and a thin lucent line marks the break. Children (age < 16) show open physes, a
lucent line that a retrieval model must tell from a fracture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medseek.data.synth import raster

REGIONS = ("distal radius", "distal ulna", "ulnar styloid")


@dataclass
class Fracture:
    region: str
    displacement: float = 0.0   # 0..1, fraction of the bone's half-width
    angulation: float = 0.0     # degrees, positive = dorsal tilt
    comminuted: bool = False


@dataclass
class WristAnatomy:
    scale: float = 1.0
    radius_x: float = 0.40
    ulna_x: float = 0.60
    radius_w: float = 0.055      # half-width of the distal radius
    ulna_w: float = 0.035
    articular_y: float = 0.50    # distal articular surface of the radius
    age: int = 10
    bone: float = 0.6
    soft: float = 0.35
    exposure: float = 2.0
    noise: float = 0.012
    fracture_y: dict = field(default_factory=dict)  # region -> y of the fracture line


def sample_wrist(rng: np.random.Generator, age: int) -> WristAnatomy:
    s = 0.85 + 0.01 * min(age, 16)
    return WristAnatomy(
        scale=s,
        radius_x=0.5 - 0.1 * s + rng.uniform(-0.01, 0.01),
        ulna_x=0.5 + 0.1 * s + rng.uniform(-0.01, 0.01),
        radius_w=0.05 * s * rng.uniform(0.95, 1.1),
        ulna_w=0.032 * s * rng.uniform(0.95, 1.1),
        articular_y=rng.uniform(0.47, 0.53),
        age=age,
        bone=rng.uniform(0.5, 0.7),
        soft=rng.uniform(0.3, 0.4),
        exposure=rng.uniform(1.7, 2.3),
        noise=rng.uniform(0.008, 0.016),
    )


def _fragment_coords(X, Y, pivot, dx, angle_deg):
    """Coordinates in which the distal fragment is drawn un-displaced."""
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    px, py = pivot
    x, y = X - px - dx, Y - py
    return c * x + s * y + px, -s * x + c * y + py


def _long_bone(X, Y, x, w, top, frac_y, frac: Fracture | None, physis: bool, bone: float, styloid: bool):
    """Density of a distal radius/ulna: shaft below, flared metaphysis, epiphysis on top."""
    shaft = raster.segment(X, Y, (x, 1.2), (x, frac_y), 1.4 * w, edge=0.006)
    dens = bone * 0.8 * shaft
    dx = ang = 0.0
    if frac is not None:
        dx = frac.displacement * w * (1 if x < 0.5 else -1)
        ang = frac.angulation
    FX, FY = _fragment_coords(X, Y, (x, frac_y), dx, ang)
    distal = raster.ellipse(FX, FY, x, top + 0.045, w, 0.05, edge=0.006) * (FY < frac_y)
    distal = np.maximum(distal, raster.segment(FX, FY, (x, top + 0.05), (x, frac_y + 0.01), 1.4 * w) * (FY <= frac_y))
    if styloid:
        tip_x = x + 0.8 * w
        distal = np.maximum(distal, raster.segment(FX, FY, (tip_x, top + 0.03), (tip_x + 0.004, top - 0.01), 0.014))
    dens += bone * distal
    if physis:  # open growth plate: lucent line under the epiphysis
        dens -= 0.35 * bone * raster.segment(FX, FY, (x - w, top + 0.03), (x + w, top + 0.03), 0.006) * distal
    if frac is not None:
        gap = raster.segment(X, Y, (x - 1.1 * w, frac_y), (x + 1.1 * w, frac_y + 0.01), 0.006, edge=0.003)
        dens -= 0.5 * bone * gap * (shaft + distal > 0.2)
        if frac.comminuted:
            dens += 0.25 * bone * raster.ellipse(X, Y, x, frac_y - 0.01, 0.6 * w, 0.01)
    return dens


def _styloid_fracture(X, Y, a: WristAnatomy, frac: Fracture | None, bone: float, ulna_x: float):
    """Separate fragment at the ulnar styloid tip (drawn when fractured)."""
    if frac is None:
        return 0.0
    tip_x, tip_y = ulna_x + 0.8 * a.ulna_w, a.articular_y + 0.01
    gap = raster.segment(X, Y, (tip_x - 0.012, tip_y + 0.012), (tip_x + 0.012, tip_y + 0.008), 0.005, edge=0.003)
    shift = 0.005 + 0.02 * frac.displacement
    frag = raster.ellipse(X, Y, tip_x + shift, tip_y - 0.012 - shift, 0.007, 0.01)
    return bone * (0.8 * frag - 0.6 * gap)


def draw_wrist(X, Y, a: WristAnatomy, fractures: dict[str, Fracture], view: str) -> np.ndarray:
    """Density map of one wrist view; records fracture levels in ``a.fracture_y``."""
    physis = a.age < 16
    dens = a.soft * raster.ellipse(X, Y, 0.5, 0.6, 0.28 * a.scale, 0.75, edge=0.04)
    fr_r, fr_u, fr_s = (fractures.get(r) for r in REGIONS)
    yr = a.articular_y + 0.06 + (0.03 if fr_r and fr_r.displacement > 0.5 else 0.0)
    yu = a.articular_y + 0.09
    a.fracture_y = {"distal radius": yr, "distal ulna": yu, "ulnar styloid": a.articular_y + 0.01}
    if view == "PA":
        dens += _long_bone(X, Y, a.radius_x, a.radius_w, a.articular_y, yr, fr_r, physis, a.bone, False)
        dens += _long_bone(X, Y, a.ulna_x, a.ulna_w, a.articular_y + 0.015, yu, fr_u, physis, a.bone, fr_s is None)
        dens += _styloid_fracture(X, Y, a, fr_s, a.bone, a.ulna_x)
        # carpal bones (two rows) and metacarpal bases
        for row, y in enumerate((a.articular_y - 0.05, a.articular_y - 0.11)):
            for k in range(4):
                x = 0.5 + (k - 1.5) * 0.06 * a.scale
                ossified = a.age > 3 + 2 * k + row
                if ossified:
                    dens += 0.7 * a.bone * raster.ellipse(X, Y, x, y, 0.026 * a.scale, 0.024 * a.scale, edge=0.006)
        for k in range(5):
            x0 = 0.5 + (k - 2) * 0.065 * a.scale
            dens += 0.8 * a.bone * raster.segment(X, Y, (x0, a.articular_y - 0.15), (x0 + (k - 2) * 0.03, -0.1),
                                                  0.035 * a.scale)
    else:
        # lateral: radius and ulna superimposed; dorsal angulation tilts the distal radius
        dens += _long_bone(X, Y, 0.5, a.radius_w, a.articular_y, yr, fr_r, physis, a.bone, False)
        dens += 0.6 * _long_bone(X, Y, 0.53, a.ulna_w, a.articular_y + 0.015, yu, fr_u, physis, a.bone, False)
        dens += 0.8 * _styloid_fracture(X, Y, a, fr_s, a.bone, 0.53)
        dens += 0.9 * a.bone * raster.ellipse(X, Y, 0.5, a.articular_y - 0.07, 0.05, 0.05)
        dens += 0.8 * a.bone * raster.segment(X, Y, (0.5, a.articular_y - 0.13), (0.48, -0.1), 0.06)
    return dens


@dataclass(frozen=True)
class Pose:
    """Positioning of the wrist on the detector: rotation (rad) about the centre, then shift."""

    angle: float = 0.0
    dx: float = 0.0
    dy: float = 0.0

    def to_patient(self, X, Y):
        """Patient-frame coordinates of image points (the inverse pose)."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        x, y = X - 0.5 - self.dx, Y - 0.5 - self.dy
        return c * x + s * y + 0.5, -s * x + c * y + 0.5

    def to_image(self, x, y):
        """Image coordinates of patient-frame points."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        x, y = np.asarray(x) - 0.5, np.asarray(y) - 0.5
        return c * x - s * y + 0.5 + self.dx, s * x + c * y + 0.5 + self.dy


def sample_pose(rng: np.random.Generator) -> Pose:
    return Pose(angle=float(rng.uniform(-0.14, 0.14)), dx=float(rng.uniform(-0.04, 0.04)),
                dy=float(rng.uniform(-0.03, 0.03)))


def _bone_x(a: WristAnatomy, view: str) -> tuple[float, float]:
    return (a.radius_x, a.ulna_x) if view == "PA" else (0.5, 0.53)


def fracture_points(a: WristAnatomy, view: str, pose: Pose, size: int) -> dict[str, tuple[float, float]]:
    """Pixel position of each region's fracture site (where a fracture line is drawn)."""
    rx, ux = _bone_x(a, view)
    pts = {"distal radius": (rx, a.fracture_y["distal radius"]), "distal ulna": (ux, a.fracture_y["distal ulna"]),
           "ulnar styloid": (ux + 0.8 * a.ulna_w, a.fracture_y["ulnar styloid"])}
    out = {}
    for name, (x, y) in pts.items():
        ix, iy = pose.to_image(x, y)
        out[name] = (round(float(ix) * size, 1), round(float(iy) * size, 1))
    return out


def boxes(a: WristAnatomy, view: str, size: int, pose: Pose = Pose()) -> dict[str, tuple[float, float, float, float]]:
    """Pixel boxes ``[x0, y0, x1, y1]`` of the three regions in the posed image, clipped to it."""
    rx, ux = _bone_x(a, view)
    top = a.articular_y
    raw = {
        "distal radius": (rx - 1.6 * a.radius_w, top - 0.02, rx + 1.6 * a.radius_w, top + 0.16),
        "distal ulna": (ux - 1.8 * a.ulna_w, top, ux + 1.8 * a.ulna_w, top + 0.17),
        "ulnar styloid": (ux + 0.8 * a.ulna_w - 0.04, top - 0.05, ux + 0.8 * a.ulna_w + 0.045, top + 0.035),
    }
    out = {}
    for name, (x0, y0, x1, y1) in raw.items():
        # the axis-aligned box around the posed (rotated) region
        ix, iy = pose.to_image(np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]))
        px = [min(max(float(v) * size, 0.0), float(size)) for v in (ix.min(), iy.min(), ix.max(), iy.max())]
        out[name] = (round(px[0], 1), round(px[1], 1), round(px[2], 1), round(px[3], 1))
    return out


def expose_wrist(dens: np.ndarray, a: WristAnatomy, rng) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    img = (1.0 - np.exp(-a.exposure * np.clip(dens, 0, None))) / (1.0 - np.exp(-a.exposure * 1.6))
    img = gaussian_filter(np.clip(img, 0, 1), 0.6)
    img = img + a.noise * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)
