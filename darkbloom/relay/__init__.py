"""relay package."""

__all__: list[str] = []
