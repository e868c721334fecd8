"""The engine's core: Result, errors, Context, the Tree builder, the registry, the executor protocol, serde, hooks."""
