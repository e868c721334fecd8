"""The fluent builder (`Tree`): above the node kinds it builds, so nodes and the core never import it."""

from .tree import Tree

__all__ = ["Tree"]
