"""linearize: convert a pretrained LLM into a gated linear-recurrent (Liger) model."""

__version__ = "0.1.0"

from .modeling import is_converted, register_auto_classes, teacher  # noqa: E402

register_auto_classes()

__all__ = ["__version__", "teacher", "is_converted"]
