"""Conventional sequential recommenders used as DELRec teachers."""

from delrec.teachers.base import SequentialRecommender, TeacherConfig
from delrec.teachers.bert4rec import BERT4Rec, LLM2BERT4Rec
from delrec.teachers.caser import Caser
from delrec.teachers.gru4rec import GRU4Rec
from delrec.teachers.kda import KDA, KDALRD
from delrec.teachers.sasrec import SASRec

MODELS: dict[str, type[SequentialRecommender]] = {"sasrec": SASRec, "gru4rec": GRU4Rec, "caser": Caser,
                                                  "bert4rec": BERT4Rec, "llm2bert4rec": LLM2BERT4Rec,
                                                  "kda": KDA, "kdalrd": KDALRD}

# The paper's settings (Section V-A3); everything not named there keeps TeacherConfig's default.
PAPER_SETTINGS: dict[str, dict] = {
    # max_epochs: the paper gives none. On ML-100K SASRec's valid NDCG@10 is flat after epoch 12
    # (0.7785 at 12, best 0.7786 at 13; docs/teachers.md), and 12 epochs fit the 3-minute CPU budget.
    "sasrec": dict(dim=100, num_blocks=2, optimizer="adam", lr=1e-3, dropout=0.5, batch_size=128, max_epochs=12),
    "caser": dict(dim=100, num_h_filters=16, optimizer="adam", lr=1e-3, dropout=0.4, batch_size=128),
    "gru4rec": dict(dim=64, optimizer="adagrad", lr=0.01, dropout=0.3, batch_size=50),
    # not teachers in the paper: BERT4Rec's own settings (Sun et al.: 2 blocks, 2 heads, dim 64,
    # dropout 0.1, Adam 1e-3) with SASRec's epoch budget; LLM2BERT4Rec is the same model with
    # LLM-initialised item embeddings (Table II's LLM2BERT4Rec row)
    "bert4rec": dict(dim=64, num_blocks=2, num_heads=2, optimizer="adam", lr=1e-3, dropout=0.1, batch_size=128,
                     max_epochs=20, mask_prob=0.2),
    "llm2bert4rec": dict(dim=64, num_blocks=2, num_heads=2, optimizer="adam", lr=1e-3, dropout=0.1, batch_size=128,
                         max_epochs=20, mask_prob=0.2),
    # Table II's KDALRD and KDA without LRD: the KDA authors' defaults (their KDA.py: emb 64, one
    # relation self-attention layer, one head; the LRD README ran Office with 5 and 4), the LRD
    # README's Adam 1e-3, l2 1e-6, random frequency init and LRD settings (8 latent relations,
    # lamda 10, alpha 0.1), ReChorus's batch 256 and early stop after 5, and at most 30 epochs
    # (their 200 do not fit a CPU; docs/baselines.md has what an ML-100K epoch cost)
    "kda": dict(dim=64, num_layers=1, num_heads=1, optimizer="adam", lr=1e-3, weight_decay=1e-6, dropout=0.0,
                batch_size=256, max_epochs=30, patience=5),
    "kdalrd": dict(dim=64, num_layers=1, num_heads=1, optimizer="adam", lr=1e-3, weight_decay=1e-6, dropout=0.0,
                   batch_size=256, max_epochs=30, patience=5, latent_relations=8, lrd_weight=10.0,
                   relation_entropy_weight=0.1),
}


def display_name(teacher: str) -> str:
    """A teacher as papers and prompts spell it (SASRec, LLM2BERT4Rec, KDALRD); an unregistered name as given."""
    model = MODELS.get(teacher)
    return model.display_name if model is not None and model.display_name else teacher


def default_config(model: str, **overrides) -> TeacherConfig:
    if model not in MODELS:
        raise ValueError(f"unknown teacher {model!r}; choose one of {sorted(MODELS)}")
    settings = {**PAPER_SETTINGS[model], **{k: v for k, v in overrides.items() if v is not None}}
    return TeacherConfig(model=model, **settings)


def build_model(config: TeacherConfig, num_items: int, num_users: int, max_len: int, **inputs) -> SequentialRecommender:
    """`inputs`: what a model reads besides the sequences (KDA: `side=` when trained, `shapes=` when loaded)."""
    if config.model not in MODELS:
        raise ValueError(f"unknown teacher {config.model!r}; choose one of {sorted(MODELS)}")
    return MODELS[config.model](num_items, num_users, max_len, config, **inputs)


__all__ = ["BERT4Rec", "KDA", "KDALRD", "LLM2BERT4Rec", "MODELS", "PAPER_SETTINGS", "SequentialRecommender", "TeacherConfig", "build_model", "default_config", "display_name"]
