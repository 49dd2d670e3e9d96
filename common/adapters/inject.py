"""Put an adapter around every target `nn.Linear` of a model."""

from __future__ import annotations

from torch import nn

from common.adapters.registry import get_adapter
from common.config import RunConfig
from common.errors import ConfigError


def inject_adapters(model: nn.Module, config: RunConfig) -> list[str]:
    """Wrap each `nn.Linear` whose last name component is in `target-modules`; return their names.

    Everything else in the model is frozen by the caller; the wrappers' own factors stay trainable.
    """
    kind = get_adapter(config.adapter)
    adapter_config = kind.make_config(config)
    targets = set(config.target_module_names)
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"target-modules {config.target_modules!r} match no linear layer; this model has: {', '.join(linear)}"
        )
    # DiffoRA: every kept module must be one of the candidates (a misspelled one would select nothing)
    unknown = sorted(set(getattr(adapter_config, "modules", ())) - set(names)) if kind.selects_modules else []
    if unknown:
        raise ConfigError(
            f"diffora-modules names {', '.join(unknown)}, not a target module of this model (target-modules "
            f"{config.target_modules!r}); give full dotted names from: {', '.join(names)}"
        )
    for name in names:
        layer = model.get_submodule(name)
        if config.rank > min(layer.in_features, layer.out_features):
            raise ConfigError(
                f"rank = {config.rank} exceeds layer {name} ({layer.out_features} x {layer.in_features}); "
                f"use rank <= {min(layer.in_features, layer.out_features)}"
            )
    for name in names:
        replace_module(model, name, kind.wrap(model.get_submodule(name), adapter_config, name))
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule with dotted name `name` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
