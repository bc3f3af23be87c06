"""Outputs of a job: each a :class:`~bitalloc.targets.base.Target` (capacity for a budget, verified write,
recognising its own finished output).  ``packed``: the packed safetensors directory; ``gguf``: a llama.cpp GGUF."""
