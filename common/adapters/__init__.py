"""Adapter variants (LoRA family), injected into a model by name through the registry."""

from common.adapters.inject import inject_adapters
from common.adapters.registry import ADAPTERS, get_adapter

__all__ = ["ADAPTERS", "get_adapter", "inject_adapters"]
