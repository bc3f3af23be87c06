"""bitalloc: fit a neural network into a byte budget with the least quality loss."""
from __future__ import annotations

__version__ = "0.1.0"
