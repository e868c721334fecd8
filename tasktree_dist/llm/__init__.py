"""LLM calls: providers, models and tools (types), per-loop clients, the direct transport and the LLM node."""
