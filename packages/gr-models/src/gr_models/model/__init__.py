"""GR models: RankingGR, RetrievalGR and the SASRec baseline."""

from gr_models.model.base import GRModel
from gr_models.model.ranking_gr import RankingGR
from gr_models.model.retrieval_gr import RetrievalGR
from gr_models.model.sasrec import SASRec

__all__ = ["GRModel", "RankingGR", "RetrievalGR", "SASRec"]
