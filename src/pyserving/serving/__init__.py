"""The data plane every protocol serves through: resolve a request's model version, then run it."""

from pyserving.lifecycle.manager import State, VersionStatus
from pyserving.serving.dataplane import DataPlane, ModelSpec, MultiInferenceResult, PredictResult, Target

__all__ = ["DataPlane", "ModelSpec", "MultiInferenceResult", "PredictResult", "State", "Target", "VersionStatus"]
