"""How a forward pass is described and driven: per-call token metadata (:mod:`.batch`) and the
attention rule (:mod:`.masks`). KV caches, generation and distributed layouts belong here too."""
from workbench.runtime.batch import ForwardBatch, Keys

__all__ = ["ForwardBatch", "Keys"]
