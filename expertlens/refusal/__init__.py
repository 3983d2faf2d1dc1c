"""The refusal study of "Expert-Aware Refusal Steering" (Marbut, Wheeler, Olson 2026) as a library.

Example:
    >>> from expertlens.refusal import RefusalConfig
    >>> RefusalConfig.paper().n_positions
    5
"""

from .claims import claim_verdicts
from .config import PAPER_SOURCES, RefusalConfig
from .controls import PATHWAYS, KLMatch, PathwayResult, match_kl, pathway_ablation, pathway_shares
from .data import ChatTemplateError, RefusalData, format_chat, load_benchmark, load_prompt_file, post_instruction_len
from .directions import candidate_directions, mean_activations
from .evaluate import mean_kl, mean_refusal_score, refusal_rate
from .judges import (
    CLASSES,
    ClassifierJudge,
    DefaultJudge,
    OpenAIJudge,
    completion_logprobs,
    default_judge,
    judge_all,
)
from .methods import (
    ExpertSearch,
    expert_directions,
    expert_output_means,
    expert_search,
    method_a_intervention,
    routing_edit_experts,
)
from .results import Claim, Condition, Deviation, Outcome, Rate, StudyResults
from .routing import RoutingStats, routing_statistics
from .scores import (
    REFUSAL_SUBSTRINGS,
    Judge,
    SubstringJudge,
    is_refusal,
    kl_divergence,
    refusal_score,
    refusal_token_ids,
)
from .selection import Candidate, DirectionSelection, select_direction
from .study import RefusalStudy, run_refusal_study

__all__ = [
    "RefusalConfig",
    "PAPER_SOURCES",
    "CLASSES",
    "DefaultJudge",
    "default_judge",
    "OpenAIJudge",
    "ClassifierJudge",
    "judge_all",
    "completion_logprobs",
    "StudyResults",
    "Condition",
    "Outcome",
    "Rate",
    "Claim",
    "Deviation",
    "claim_verdicts",
    "RefusalStudy",
    "run_refusal_study",
    "RefusalData",
    "ChatTemplateError",
    "format_chat",
    "post_instruction_len",
    "load_prompt_file",
    "load_benchmark",
    "candidate_directions",
    "mean_activations",
    "select_direction",
    "Candidate",
    "DirectionSelection",
    "routing_statistics",
    "RoutingStats",
    "method_a_intervention",
    "routing_edit_experts",
    "expert_directions",
    "expert_output_means",
    "expert_search",
    "ExpertSearch",
    "pathway_ablation",
    "pathway_shares",
    "PathwayResult",
    "PATHWAYS",
    "KLMatch",
    "match_kl",
    "refusal_rate",
    "mean_refusal_score",
    "mean_kl",
    "REFUSAL_SUBSTRINGS",
    "Judge",
    "SubstringJudge",
    "is_refusal",
    "kl_divergence",
    "refusal_score",
    "refusal_token_ids",
]
