"""Recovery: train a quantized model back toward the original, in the same file format and the same bytes.

``recover_model(student, teacher, windows, qtensors, RecoverConfig(mode="block+e2e"))`` runs the stages of
:mod:`.train` and returns the recovered QTensors (every stored tensor: same formats, same bytes) and the trained
float values of the fixed tensors.  What is trained is what the file stores (:mod:`.params`); everything is
rounded to the storage precision before it is written, so the file decodes exactly to the recovered model.
"""
from .config import MODES, RecoverConfig
from .run import recover_model, training_windows

__all__ = ["MODES", "RecoverConfig", "recover_model", "training_windows"]
