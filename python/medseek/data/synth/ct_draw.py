"""Chest CT phantom in Hounsfield units, with an organ label map and placed findings.

Volumes are ``(D, H, W)`` = (z, y, x) int16; z index 0 is the most inferior slice,
y runs anterior -> posterior, x runs patient right -> left (LPS voxel axes). The
phantom is defined in millimetres relative to the field of view: the body spans
about 85 % of the in-plane FOV, so small matrices give a child-sized chest.
Organs: body wall with fat, lungs split into lobes by fissure planes, heart, aorta,
liver, kidneys (upper poles), spine and ribs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HU = {"air": -1000, "lung": -860, "fat": -100, "soft": 40, "blood": 40, "myocardium": 45, "liver": 60,
      "kidney": 32, "bone": 700, "marrow": 250, "fluid": 8}
# label values of the organ map
ORGANS = {"body": 1, "right upper lobe": 2, "right middle lobe": 3, "right lower lobe": 4,
          "left upper lobe": 5, "left lower lobe": 6, "heart": 7, "aorta": 8, "liver": 9,
          "kidneys": 10, "spine": 11, "ribs": 12}
LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")


@dataclass
class CTGeometry:
    shape: tuple[int, int, int]       # (D, H, W)
    spacing: tuple[float, float, float]  # (sz, sy, sx) mm

    @property
    def extent(self) -> tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.shape, self.spacing))  # type: ignore[return-value]


def coords(g: CTGeometry):
    """Broadcastable normalised coordinates: z in [0, 1] (inferior->superior), y, x in [-1, 1]."""
    d, h, w = g.shape
    z = ((np.arange(d, dtype=np.float32) + 0.5) / d)[:, None, None]
    y = ((np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1)[None, :, None]
    x = ((np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1)[None, None, :]
    return z, y, x


def draw_ct(g: CTGeometry, p: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume float32, organ label map uint8) for anatomy parameters ``p``.

    ``p`` holds: ``body_rx``, ``body_ry`` (normalised half-axes), ``dome`` (z of the
    diaphragm dome, fraction of the covered height), ``heart_scale``,
    ``apex`` (z of the lung apices), ``lung_hu``.
    """
    z, y, x = coords(g)
    d, h, w = g.shape
    vol = np.full(g.shape, HU["air"], dtype=np.float32)
    lab = np.zeros(g.shape, dtype=np.uint8)
    brx, bry = p["body_rx"], p["body_ry"]
    r_body = (x / brx) ** 2 + ((y - 0.05) / bry) ** 2           # (1, H, W)
    body = np.broadcast_to(r_body <= 1.0, g.shape)
    vol[body] = HU["soft"]
    lab[body] = ORGANS["body"]
    fat = (r_body > 0.8) & (r_body <= 1.0)
    vol[np.broadcast_to(fat, g.shape)] = HU["fat"]
    # lungs: two elliptic cylinders that taper to the apex and sit on the diaphragm domes
    dome, apex = p["dome"], p["apex"]
    taper = np.clip((apex - z) / 0.25, 0.0, 1.0) ** 0.5           # narrows near the apex
    lungs = np.zeros(g.shape, dtype=bool)
    for sign in (-1.0, 1.0):
        cx = sign * 0.42 * brx
        dome_z = dome + (0.03 if sign > 0 else 0.0) - 0.25 * ((x - cx) ** 2 + (y - 0.1) ** 2)
        r = ((x - cx) / (0.36 * brx * np.maximum(taper, 1e-3))) ** 2 + ((y - 0.05) / (0.78 * bry)) ** 2
        lungs |= (r <= 1.0) & (z > dome_z) & (z < apex)
    # lobes by fissures: oblique fissure rises posteriorly; right horizontal fissure
    oblique = z - (dome + 0.15 + 0.35 * (y + 1) / 2)                 # >0 above the oblique fissure
    right = x < 0
    lobe = np.where(right, np.where(oblique < 0, ORGANS["right lower lobe"],
                                    np.where(z < dome + 0.42, ORGANS["right middle lobe"], ORGANS["right upper lobe"])),
                    np.where(oblique < 0, ORGANS["left lower lobe"], ORGANS["left upper lobe"]))
    vol[lungs] = p["lung_hu"]
    lab[lungs] = np.broadcast_to(lobe, g.shape)[lungs]
    # heart: ellipsoid left-anterior above the dome; aorta ascending, arch, descending
    hs = p["heart_scale"]
    hz = dome + 0.14 * hs
    r_heart = ((x - 0.15 * brx) / (0.38 * brx * hs)) ** 2 + ((y + 0.15) / (0.42 * bry * hs)) ** 2 + ((z - hz) / (0.16 * hs)) ** 2
    heart = r_heart <= 1.0
    vol[heart] = HU["myocardium"]
    lab[heart] = ORGANS["heart"]
    p["heart_mask_r"] = r_heart
    arch_z = min(dome + 0.5, apex - 0.08)
    desc = ((x - 0.12 * brx) ** 2 + (y - 0.45 * bry) ** 2 <= (0.075 * brx) ** 2) & (z < arch_z)
    asc = ((x + 0.03) ** 2 + (y + 0.2 * bry) ** 2 <= (0.08 * brx) ** 2) & (z > hz) & (z < arch_z)
    arch = (np.abs(z - arch_z) < 0.03) & ((y > -0.25 * bry) & (y < 0.5 * bry)) & (np.abs(x - 0.05) < 0.09 * brx)
    aorta = desc | asc | arch
    vol[aorta] = HU["blood"]
    lab[aorta] = ORGANS["aorta"]
    # liver (right, under the dome) and upper poles of the kidneys (posterior, low)
    liver = (((x + 0.35 * brx) / (0.6 * brx)) ** 2 + ((y + 0.05) / (0.8 * bry)) ** 2 <= 1.0) & (z < dome - 0.2 * (x + 0.3) ** 2)
    vol[liver & ~lungs] = HU["liver"]
    lab[liver & ~lungs] = ORGANS["liver"]
    for sign in (-1.0, 1.0):
        kid = ((x - sign * 0.35 * brx) / (0.14 * brx)) ** 2 + ((y - 0.55 * bry) / (0.2 * bry)) ** 2 + ((z + 0.02) / 0.12) ** 2 <= 1.0
        vol[kid] = HU["kidney"]
        lab[kid] = ORGANS["kidneys"]
    # spine: vertebral bodies (cortex + marrow) separated by discs, posterior midline
    r_vert = (x / (0.11 * brx)) ** 2 + ((y - 0.72 * bry) / (0.12 * bry)) ** 2
    level = (z * g.extent[0] / 28.0) % 1.0                              # ~28 mm per level
    disc = level < 0.16
    spine = np.broadcast_to(r_vert <= 1.0, g.shape)
    vol[spine] = np.where(np.broadcast_to(disc, g.shape), 80.0, np.where(np.broadcast_to(r_vert > 0.75, g.shape), HU["bone"], HU["marrow"]))[spine]
    lab[spine] = ORGANS["spine"]
    # ribs: oblique, so an axial slice cuts them into short arcs in the chest wall whose
    # angular position drifts with z; the anterior midline is cartilage and sternum
    theta = np.arctan2(y - 0.05, x)                                    # (1, H, W)
    zmm = z * g.extent[0]
    arcs = ((theta * 7.0 / (2 * np.pi) + zmm / 26.0) % 1.0) < 0.22
    wall = (r_body > 0.62) & (r_body < 0.7) & ~((np.abs(x) < 0.18 * brx) & (y < 0))
    ribs = wall & arcs & (z > dome - 0.1) & (z < apex)
    sternum = (np.abs(x) < 0.06 * brx) & (np.abs(y - 0.05 + 0.93 * bry) < 0.035 * bry) & (z > dome) & (z < apex - 0.1)
    ribs = ribs | sternum
    vol[ribs] = HU["bone"]
    lab[ribs] = ORGANS["ribs"]
    # pulmonary vessels: thin high-density blobs inside the lungs
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(g.shape).astype(np.float32), (1.0, 1.2, 1.2))
    vessels = lungs & (field > 2.2 * field.std())
    vol[vessels] = 0.0
    return vol, lab
