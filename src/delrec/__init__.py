"""DELRec: distil sequential patterns from conventional recommenders into LLM-based sequential recommendation."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from delrec import Recommender` without importing torch on `import delrec`
    if name in ("Recommender", "RequestError", "Ranking", "RankedItem"):
        from delrec.serving import recommender

        return getattr(recommender, name)
    raise AttributeError(f"module 'delrec' has no attribute {name!r}")
