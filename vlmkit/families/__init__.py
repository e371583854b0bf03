"""Family adapters: the only code that knows a model family's attribute names. Registry by ``config.model_type``."""

from .registry import family_for, supported_families

__all__ = ["family_for", "supported_families"]
