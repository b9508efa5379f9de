"""The base layer: atomic files, locks, settings, processes, tracking and the run folder's layout."""
