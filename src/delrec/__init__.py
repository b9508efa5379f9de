"""DELRec: distil sequential patterns from conventional recommenders into LLM-based sequential recommendation."""

__version__ = "0.1.0"
