"""Devices and small foreign objects on the chest phantom (catheters, tubes, wires, pacemakers...).

Metal is drawn with a density well above bone, so devices are the brightest objects.
Positions come from the anatomy (subclavian region, trachea, sternum, heart) and the
finding's side and zone.
"""

from __future__ import annotations

import numpy as np

from medseek.data.mesh import Finding
from medseek.data.synth import raster
from medseek.data.synth.cxr_anatomy import Canvas, locate

DEVICES = ("catheter", "tube", "surgical clips", "implanted device", "medical device", "stent",
           "foreign body", "sutures", "breast implants", "cysts", "bullae", "contrast media", "nipple shadow")


def _side(f: Finding, rng) -> list[str]:
    if f.side == "bilateral":
        return ["right", "left"]
    return [f.side or ("right" if rng.random() < 0.5 else "left")]


def draw_device(c: Canvas, f: Finding, rng: np.random.Generator) -> None:
    """Draw one device-like finding onto the canvas."""
    a, X, Y, n, pa = c.anatomy, c.X, c.Y, f.name, c.view == "PA"
    metal = 1.1
    if n == "catheter":
        sign = 1.0 if f.side == "left" else -1.0
        if pa:
            pts = [(a.cx + sign * 0.3, a.apex_y + 0.02), (a.cx + sign * 0.15, a.apex_y + 0.07),
                   (a.cx + sign * 0.03, a.apex_y + 0.16), (a.cx + 0.01, a.extra["heart"][1] - 0.05)]
        else:
            pts = [(0.45, a.apex_y - 0.02), (0.42, a.apex_y + 0.15), (0.38, a.dome_right - 0.15)]
        c.density += 0.5 * raster.polyline(X, Y, pts, 0.006)
    elif n == "tube":
        x0 = a.cx if pa else 0.48
        c.density += 0.5 * raster.segment(X, Y, (x0, 0.0), (x0, a.apex_y + 0.12), 0.008)
        if "abdomen" in f.qualifiers or rng.random() < 0.3:  # enteric tube down to the stomach
            c.density += 0.45 * raster.polyline(X, Y, [(x0 - 0.01, 0.0), (x0 + 0.01, 0.6), (x0 + 0.12, a.dome_left + 0.06)], 0.006)
    elif n == "surgical clips":
        if "abdomen" in f.qualifiers:
            for _ in range(int(rng.integers(2, 5))):
                x, y = a.cx + rng.uniform(-0.25, -0.05), a.dome_right + rng.uniform(0.05, 0.15)
                c.density += metal * raster.segment(X, Y, (x, y), (x + 0.012, y + 0.004), 0.004)
        else:  # median sternotomy wires
            x = a.cx if pa else 0.5 - a.ap_depth + 0.03
            for k in range(int(rng.integers(4, 7))):
                y = a.apex_y + 0.1 + k * 0.045
                ring = raster.ellipse(X, Y, x, y, 0.014, 0.007) - raster.ellipse(X, Y, x, y, 0.009, 0.003)
                c.density += metal * ring
    elif n in ("implanted device", "medical device"):
        sign = -1.0 if f.side == "right" else 1.0
        px, py = (a.cx + sign * 0.27, a.apex_y + 0.07) if pa else (0.5 - a.ap_depth, a.apex_y + 0.08)
        c.density += metal * raster.ellipse(X, Y, px, py, 0.04, 0.028)
        hx, hy = a.extra["heart"][:2] if pa else a.extra["heart_lateral"][:2]
        c.density += 0.6 * raster.polyline(X, Y, [(px, py), (a.cx if pa else 0.45, a.apex_y + 0.15), (hx, hy + 0.05)], 0.005)
    elif n == "stent":
        x, y = locate(c, f.zone or "hilum", f.side or "left")
        stripes = 0.5 + 0.5 * (np.sin(2 * np.pi * (X + Y) / 0.01) > 0)
        c.density += 0.6 * stripes * raster.ellipse(X, Y, x, y, 0.012, 0.03)
    elif n in ("foreign body", "sutures"):
        x, y = locate(c, f.zone, _side(f, rng)[0])
        c.density += metal * raster.segment(X, Y, (x, y), (x + rng.uniform(-0.03, 0.03), y + 0.02), 0.004)
    elif n in ("cysts", "bullae"):  # thin-walled lucencies
        for side in _side(f, rng):
            x, y = locate(c, f.zone or "upper lobe", side)
            r = 0.02 + 0.03 * f.severity
            c.density -= 0.12 * raster.ellipse(X, Y, x, y, r, r) * c.lung
            c.density += 0.06 * (raster.ellipse(X, Y, x, y, r + 0.003, r + 0.003) - raster.ellipse(X, Y, x, y, r, r))
    elif n == "contrast media":
        x, y = (a.cx + 0.55 * a.thorax_half_width, a.dome_left + 0.06) if pa else (0.45, a.dome_left + 0.06)
        c.density += 0.8 * raster.ellipse(X, Y, x, y, 0.04, 0.025)
    elif n == "nipple shadow" and pa:
        for side in ("right", "left") if f.side in ("", "bilateral") else (f.side,):
            sign = -1.0 if side == "right" else 1.0
            c.density += 0.08 * raster.ellipse(X, Y, a.cx + sign * 0.6 * a.thorax_half_width, a.dome(side) - 0.06, 0.012, 0.012)
    elif n == "breast implants":
        for sign in ((-1.0, 1.0) if pa else (-1.0,)):
            x = a.cx + sign * 0.2 if pa else 0.5 - a.ap_depth - 0.02
            c.density += 0.2 * raster.ellipse(X, Y, x, a.dome_right - 0.06, 0.1, 0.07, edge=0.02)
