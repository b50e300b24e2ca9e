"""medseek: medical image retrieval over radiographs, CT/MR volumes and report text."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("medseek")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
