"""p2p package."""

__all__: list[str] = []
