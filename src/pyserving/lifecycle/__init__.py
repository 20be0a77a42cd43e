"""Which versions of which models are loaded: model configs, sources, the manager and the loader chain."""
