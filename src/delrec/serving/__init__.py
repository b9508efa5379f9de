"""A trained model in use: every model of a run by name, the Python API and the HTTP service."""
