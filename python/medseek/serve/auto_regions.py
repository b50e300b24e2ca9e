"""Regions the server finds itself (``ServeConfig.auto_regions``): WristMIR's first stage.

With ``auto_regions`` on, the shipped named-region localiser
(:mod:`medseek.models.localiser`) stands in for a client that drew no box:

* Ingest: an image item sent with no ``regions`` whose body part and view (the
  request's, else its DICOM header's) a shipped localiser covers gets the localiser's
  boxes as its region children, through the same path as client-drawn boxes:
  ``WRIST``/``HAND`` (any view): distal radius, distal ulna, ulnar styloid;
  ``CHEST`` in a ``PA``/``AP`` view (a lateral film or one of unknown view gets none):
  right/left upper, mid and lower zones, right/left costophrenic angles, cardiac
  silhouette. They are marked automatic: their id is
  ``<parent>/region/auto/<name>`` (a client's is ``<parent>/region/<name>``; a region
  name holds no '/', so the two never collide) and ``Item.automatic`` is set on them.
  An item that brings its own ``regions`` keeps exactly those.
* Search: an image query whose ``region`` has a ``name`` but no ``box`` gets the box of
  the localiser whose region set holds that name, found on the query image.

Off by default: the shipped localisers were trained on phantoms (synth-wrist, synth-cxr;
their cards, ``medseek/models/weights/localiser/<name>.json``, give the corpus and test
IoU), and a region child's embedding is only as good as its box.
"""

from __future__ import annotations

import threading

import numpy as np

from .v1 import retrieval_pb2 as pb

#: id segment of the region children the localiser found (``<parent>/region/auto/<name>``)
AUTO_SEGMENT = "/region/auto/"


def auto_child_id(parent_id: str, name: str) -> str:
    return f"{parent_id}{AUTO_SEGMENT}{name}"


def is_automatic(record) -> bool:
    """Whether a stored region child was found by the localiser (its id says so)."""
    return bool(record.parent_id and record.region
                and record.id == auto_child_id(record.parent_id, record.region))


class AutoRegions:
    """The shipped localisers, loaded on first use (one lock: a model is loaded once).
    torch is imported only then, so a server with ``auto_regions`` off never loads it."""

    def __init__(self, available: list[str] | None = None) -> None:
        from medseek.models.localiser import list_localisers

        self.available = list_localisers() if available is None else list(available)
        self._models: dict = {}
        self._lock = threading.Lock()

    def _model(self, name: str):
        from medseek.models.localiser import load_localiser

        with self._lock:
            if name not in self._models:
                self._models[name] = load_localiser(name)
            return self._models[name]

    def covers(self, body_part: str | None, view: str | None = None) -> str | None:
        """The shipped localiser for ``body_part`` in ``view``, None when none ships."""
        from medseek.models.localiser import localiser_for_body_part

        name = localiser_for_body_part(body_part, view)
        return name if name in self.available else None

    def for_region(self, region_name: str) -> str | None:
        """The shipped localiser whose region set holds ``region_name``, else None."""
        from medseek.models.localiser import REGION_SETS

        return next((n for n in self.available if region_name in REGION_SETS.get(n, ())), None)

    def regions_of(self, pixels: np.ndarray, body_part: str | None, view: str | None = None) -> list:
        """``pb.Region`` messages (name and box, pixels of ``pixels``) of every named
        region of the localiser covering ``body_part`` in ``view``; [] when none covers
        it. Blocking (a CPU forward pass): call it off the event loop."""
        from medseek.models.localiser import predict_boxes

        name = self.covers(body_part, view)
        if name is None:
            return []
        model = self._model(name)
        boxes = predict_boxes(model, [pixels])[0]
        return [pb.Region(name=r, box=pb.Box(x0=float(b[0]), y0=float(b[1]), x1=float(b[2]),
                                              y1=float(b[3])))
                for r, b in zip(model.cfg.regions, boxes)]

    def box_of(self, pixels: np.ndarray, region_name: str):
        """The localiser's ``pb.Box`` of ``region_name`` on ``pixels``; None when no
        shipped localiser knows that name. Blocking."""
        from medseek.models.localiser import predict_boxes

        name = self.for_region(region_name)
        if name is None:
            return None
        model = self._model(name)
        b = predict_boxes(model, [pixels])[0][model.cfg.regions.index(region_name)]
        return pb.Box(x0=float(b[0]), y0=float(b[1]), x1=float(b[2]), y1=float(b[3]))


async def locate_query_region(auto: AutoRegions | None, pixels: np.ndarray, region):
    """A query's ``RegionSpec`` with the localiser's box on the query image when it names a
    region but gives no box (and ``auto_regions`` is on); else ``region`` unchanged (a
    name no shipped localiser knows still gets the usual "needs a box" error)."""
    import asyncio
    from dataclasses import replace

    from medseek.search import Box

    if auto is None or region is None or region.box is not None or not region.name:
        return region
    box = await asyncio.to_thread(auto.box_of, pixels, region.name)
    if box is None:
        return region
    return replace(region, box=Box(box.x0, box.y0, box.x1, box.y1))
