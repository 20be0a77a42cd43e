"""Runtimes turn a version folder into a `pyserving.servable.Servable`."""
