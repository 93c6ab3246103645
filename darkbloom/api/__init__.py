"""The OpenAI-compatible API shim: HTTP app, router, infer client, hosted-mode keys.

Daemons: `open_shim(config, network)` / `run_shim(config, network, task_status=...)` from
`darkbloom.api.shim`; the app alone: `create_app(backend, ...)` / `serve(api_config, backend,
task_status=...)` from `darkbloom.api.app`. Import submodules directly; this package keeps
its import light (the CLI imports `darkbloom.api.commands` to build --help).
"""

__all__ = ["app", "backend", "client", "commands", "errors", "format", "keys", "limits", "metrics", "network",
           "openapi", "requests", "router", "shim", "sse", "timeline"]
