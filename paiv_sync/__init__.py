"""paiv-sync: keep an MVI / PowerAI Vision classification dataset in step with folders."""

from paiv_sync._version import __version__

__all__ = ["__version__"]
