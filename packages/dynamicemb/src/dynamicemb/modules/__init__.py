"""Unsharded nn.Modules over dynamic tables, drop-ins for TorchRec's embedding collections."""

from dynamicemb.modules.common import DynamicEmbModule
from dynamicemb.modules.embedding_bag_collection import DynamicEmbeddingBagCollection
from dynamicemb.modules.embedding_collection import DynamicEmbeddingCollection

__all__ = ["DynamicEmbModule", "DynamicEmbeddingBagCollection", "DynamicEmbeddingCollection"]
