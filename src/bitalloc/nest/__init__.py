"""One artifact, any size: a model nested once (``bitalloc nest``), any budget extracted from it in seconds with no
calibration (``bitalloc extract``, ``bitalloc.load(ART, budget=B)``).

:mod:`.codes` (nested integer codes and their joint GPTQ rounding, bit-planes), :mod:`.artifact` (the directory:
strict, partial, verified reads), :mod:`.build` (``nest_model``), :mod:`.extract` (allocation from the stored
errors, packed directory, GGUF), :mod:`.gguf` (exact GGUF types of the depths, the GGUF template).
"""
from .artifact import Artifact, is_artifact
from .build import artifact_bytes, nest_model
from .extract import Extracted, extract, extract_gguf, extract_packed

__all__ = ["Artifact", "Extracted", "artifact_bytes", "extract", "extract_gguf", "extract_packed", "is_artifact",
           "nest_model"]
