"""GR models: RankingGR, RetrievalGR, the SASRec and DLRM baselines; the MovieLens retrieval protocol."""

from gr_models.model.base import GRModel
from gr_models.model.dlrm import DLRMBaseline
from gr_models.model.ranking_gr import RankingGR
from gr_models.model.retrieval_gr import RetrievalGR
from gr_models.model.retrieval_protocol import RetrievalProtocol, evaluate_retrieval, movielens_splits
from gr_models.model.sasrec import SASRec

__all__ = [
    "DLRMBaseline",
    "GRModel",
    "RankingGR",
    "RetrievalGR",
    "RetrievalProtocol",
    "SASRec",
    "evaluate_retrieval",
    "movielens_splits",
]
