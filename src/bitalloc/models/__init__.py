"""Model loading, the architecture table, the model view and the rescaled reference model."""
from bitalloc.models.archs import ARCHS, ArchSpec, arch_for, supported_types
from bitalloc.models.rescale import load_reference, rescale_llama_
from bitalloc.models.sources import default_model_path, load_model
from bitalloc.models.view import Block, FixedTensor, ModelView, TensorRef

__all__ = [
    "ARCHS", "ArchSpec", "Block", "FixedTensor", "ModelView", "TensorRef", "arch_for", "default_model_path",
    "load_model", "load_reference", "rescale_llama_", "supported_types",
]
