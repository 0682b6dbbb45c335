"""VI-ReID evaluation protocols and vectorised ranking metrics (figures live in `mip_dist.eval.visualize`)."""
from .metrics import PROTOCOLS, pairwise_distance, rank_metrics
from .protocols import PROTOCOL_NAMES, ProtocolError, Setting, build_settings
from .rerank import re_ranking

__all__ = ["PROTOCOLS", "PROTOCOL_NAMES", "ProtocolError", "Setting", "build_settings", "pairwise_distance",
           "rank_metrics", "re_ranking"]
