"""pgforkpool: a PostgreSQL connection pooler with session semantics, after the Postgres Pro built-in pooler."""

import importlib

# The modules setup.py compiles with mypyc (the pooled backend's hot path).
HOT_MODULES = ("stream", "statements", "client", "server", "context", "scheduler", "session", "pooled")


def build() -> str:
    """Which build runs: "compiled (mypyc)", "pure Python", or a mix if an install went wrong."""
    compiled = [name for name in HOT_MODULES
                if not importlib.import_module(f"pgforkpool.backend.{name}").__file__.endswith(".py")]
    if len(compiled) == len(HOT_MODULES):
        return "compiled (mypyc)"
    if not compiled:
        return "pure Python"
    return f"partly compiled ({', '.join(compiled)})"
