"""cheapproxy: a self-hosted LLM gateway.  The public plugin surface."""

from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["hookimpl", "__version__"]
