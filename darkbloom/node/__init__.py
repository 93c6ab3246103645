"""The operator's node daemon: serving, controls, status."""

__all__: list[str] = []
