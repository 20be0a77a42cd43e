"""Runtimes turn a version folder into a `Servable` (registry by `model_platform`); batching wraps one."""
