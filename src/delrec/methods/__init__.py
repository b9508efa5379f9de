"""The methods `delrec` trains and evaluates: DELRec, its ablations (paper Section V-D) and the
LLM-based baselines of the paper's Table II that fit one harness. What a method is and the hooks
it overrides are in delrec.methods.registry; each baseline is one file here; this module
registers them (docs/extending.md adds one)."""

from delrec.methods import delrec, llamarec, llara, llmseqsim, teacher_list
from delrec.methods.registry import (
    CANDIDATE_ORDERS,
    METHODS,
    PROMPTS,
    RANKERS,
    SOFT_PROMPTS,
    STAGE1,
    Method,
    Stage2Extra,
    closest,
    get,
    register,
    stage2_methods,
)

# DELRec and its ablations first, in the paper's order, then the other Table II baselines (their
# order is the report's)
for _method in (*delrec.METHODS, teacher_list.METHOD, llamarec.METHOD, llara.METHOD, llmseqsim.METHOD):
    register(_method)

__all__ = ["CANDIDATE_ORDERS", "METHODS", "PROMPTS", "RANKERS", "SOFT_PROMPTS", "STAGE1", "Method", "Stage2Extra",
           "closest", "get", "register", "stage2_methods"]
