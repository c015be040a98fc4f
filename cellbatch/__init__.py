"""cellbatch: convert DM1200 white-blood-cell captures to the DM96 look, in bulk."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cellbatch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
