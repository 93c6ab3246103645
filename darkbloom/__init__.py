"""Darkbloom: a peer-to-peer inference network of Apple Silicon Macs, with an OpenAI-compatible shim."""

__version__ = "0.1.0"

__all__ = ["__version__"]
