"""Trust in the shim: live peer statistics, circuit breaker, reputation mix, spot checks, canaries, hedging, node classes."""

__all__: list[str] = []
