"""RetrievalGR's uniform negatives: looked up once per distinct id, with the values and table gradients of one
lookup per drawn id."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gr_models.configs import PositionEncodingConfig, RetrievalConfig, ShardedEmbeddingConfig, get_hstu_config
from gr_models.model import RetrievalGR


def test_negatives_match_one_lookup_per_drawn_id() -> None:
    torch.manual_seed(0)
    hstu = get_hstu_config(8, 8, 1, 1, position_encoding=PositionEncodingConfig(count_from="start"))
    table = ShardedEmbeddingConfig(feature_names=["item_id"], table_name="item_id_table", vocab_size=11, dim=8)
    model = RetrievalGR(hstu, RetrievalConfig(embedding_configs=[table], num_negatives=16), "cpu")
    weight = dict(model.embedding.static_parameters())["item_id_table"]
    torch.manual_seed(1)
    ids, negatives = model._negatives("item_id", 5)
    assert ids.shape == (5, 16) and negatives.shape == (5, 16, 8)
    assert len(ids.unique()) < ids.numel()  # repeated ids, so the dedup matters
    probe = torch.randn(5, 16, 8)
    (negatives * probe).sum().backward()
    deduplicated = weight.grad.to_dense().clone()
    weight.grad = None
    direct = F.normalize(weight[ids.reshape(-1)], dim=-1, eps=1e-6).reshape(5, 16, 8)
    torch.testing.assert_close(negatives.detach(), direct.detach())
    (direct * probe).sum().backward()
    torch.testing.assert_close(deduplicated, weight.grad.to_dense())
