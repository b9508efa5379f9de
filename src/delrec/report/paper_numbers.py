"""The DELRec paper's published ML-100K numbers (Tables II-IV), which the report sets beside a
run's own: the paper's data pipeline and candidate sampling are not ours, so they orient a reader
and are no like-for-like comparison (docs/baselines.md).

Each entry is (HR@1, HR@5, HR@10, NDCG@5, NDCG@10), the order of METRICS.
"""

from __future__ import annotations

METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")
# Tables II, III and IV (DELRec with Flan-T5-XL), by our model names.
PAPER_ML100K = {
    "caser": (0.3250, 0.6640, 0.7713, 0.5034, 0.5564),
    "gru4rec": (0.3162, 0.6495, 0.7568, 0.4824, 0.5430),
    "sasrec": (0.3341, 0.6704, 0.8062, 0.5183, 0.5727),
    "llm2bert4rec": (0.3365, 0.6507, 0.7615, 0.4743, 0.5518),  # Table II's LLM2BERT4Rec, a teacher here
    "kdalrd": (0.3618, 0.6734, 0.8185, 0.5089, 0.5824),  # Table II's KDALRD, a teacher here
    "zero-shot": (0.0938, 0.2441, 0.3437, 0.1711, 0.2121),  # Flan-T5-XL
    "caser-delrec": (0.3664, 0.6804, 0.8215, 0.5108, 0.5843),
    "gru4rec-delrec": (0.3635, 0.6722, 0.8137, 0.5062, 0.5807),
    "sasrec-delrec": (0.3701, 0.6919, 0.8386, 0.5237, 0.5950),
    "sasrec-wo-sp": (0.3020, 0.6211, 0.8057, 0.4450, 0.5646),
    "sasrec-mcp": (0.3106, 0.6357, 0.8141, 0.4603, 0.5712),
    "sasrec-usp": (0.2752, 0.5724, 0.7913, 0.4296, 0.5259),
    "sasrec-wo-dpsm": (0.3020, 0.6211, 0.8057, 0.4450, 0.5646),
    "sasrec-wo-lsr": (0.2814, 0.5843, 0.7845, 0.4223, 0.5314),
    "sasrec-wo-ta": (0.3425, 0.6617, 0.8231, 0.4867, 0.5797),
    "sasrec-wo-rps": (0.3379, 0.6585, 0.8187, 0.4805, 0.5715),
    "sasrec-ulsr": (0.3486, 0.6678, 0.8276, 0.4930, 0.5823),
    "sasrec-udpsm": (0.3513, 0.6726, 0.8324, 0.5013, 0.5906),
}
# The LLM-based baselines of Table II (each with Flan-T5-XL), by the paper's row names
# (delrec.methods: a method's `paper_rows`).
PAPER_TABLE2_ML100K = {
    "LlamaRec": (0.2870, 0.5873, 0.7183, 0.4253, 0.5387),
    "RecRanker": (0.3246, 0.6492, 0.7570, 0.4694, 0.5464),
    "LLMSEQPROMPT": (0.2702, 0.5681, 0.6921, 0.4152, 0.5332),
    "LLMSEQSIM": (0.3397, 0.6532, 0.7690, 0.4728, 0.5521),
    "LLM-TRSR": (0.3169, 0.6356, 0.7533, 0.4637, 0.5476),
    "LLaRA": (0.3523, 0.6753, 0.8089, 0.5016, 0.5632),
}
# the order in which the report names the rows of PAPER_TABLE2_ML100K a run did not compare with
TABLE2_LLM_BASELINES = ("LLaRA", "RecRanker", "LLM-TRSR", "LlamaRec", "LLMSEQPROMPT", "LLMSEQSIM")
# Table II's LLM-based rows that are teachers of delrec.teachers (a run lists them in `teachers:`)
TABLE2_TEACHER_ROWS = {"llm2bert4rec": "LLM2BERT4Rec", "kdalrd": "KDALRD"}
# Table II rows nothing in delrec stands for yet (named in the report, so their absence is visible;
# why: docs/baselines.md): none since KDALRD (teachers/kda.py)
PAPER_TABLE2_NOT_RUN: dict[str, tuple] = {}
