"""Loaders that turn public datasets, in their published on-disk layouts, into manifests.

Each ``load_X(root, ...) -> list[ManifestRecord]`` reads only metadata and text (no
pixels), gives paths relative to ``root`` (write the manifest into ``root``, or
rewrite paths when writing it elsewhere), and handles a listed file that is not on
disk by ``on_missing``: ``"error"`` (default, raises :class:`FileNotFoundError`
naming the row), ``"skip"`` (drops the row) or ``"keep"`` (keeps it, so that
:func:`medseek.data.manifest.validate_manifest` reports it).
"""

from medseek.data.loaders.chexpert import load_chexpert
from medseek.data.loaders.ct_rate import load_ct_rate
from medseek.data.loaders.mimic_cxr import load_mimic_cxr
from medseek.data.loaders.openi import load_openi
from medseek.data.loaders.roco import load_roco

__all__ = ["load_chexpert", "load_ct_rate", "load_mimic_cxr", "load_openi", "load_roco"]
