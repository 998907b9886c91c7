"""transformers adapter: a LogitsProcessor for every sampling defense, and a generate() helper."""

from .generate import generate
from .processor import DefenseLogitsProcessor

__all__ = ["DefenseLogitsProcessor", "generate"]
