"""Layer sampling (LISA, OwLore) as a wrapper around a strategy: `with_layer_sampling(FedAvgLoRA)`.

Each round the server draws the layers to train (`common/layer_sampling.py`: from the run seed and the round,
weighted as the run's sampler says), sends them as the instruction's `train-layers`, and expects back exactly
the tensors of those layers plus the ones of no layer (the head). The wrapped strategy averages those keys;
the other layers keep their global values, because `aggregate_payloads` starts from the global state. The
draw is a pure function of (seed, round, weights) and the weights are recomputed from the same model and
public split, so a resumed run draws what the uninterrupted one would: nothing to checkpoint.
"""

from __future__ import annotations

from common.layer_sampling import drawn_layers, layer_index, layer_weights, layers_of
from common.logs import get_logger
from server.strategies.base import LoRAStrategy

log = get_logger("server")


class LayerSampling:
    """Mixin: put before a LoRAStrategy in the bases (see `with_layer_sampling`)."""

    def init_layer_sampling(self, config) -> None:
        """The run's sampler settings; the draw weights are computed on first use (`layers_for`)."""
        self.sampling_config = config
        self.layer_ids: list[int] | None = None
        self.layer_draw_weights: list[float] = []
        self.round_layers: tuple[int, ...] | None = None  # the current round's layers (None: before round 1)

    @classmethod
    def from_config(cls, config, run_dir: str):
        strategy = super().from_config(config, run_dir)
        strategy.init_layer_sampling(config)
        return strategy

    def layers_for(self, server_round: int) -> tuple[int, ...]:
        config = self.sampling_config
        if self.layer_ids is None:
            self.layer_ids = layers_of(self.global_arrays)
            self.layer_draw_weights = layer_weights(config, self.layer_ids)
            log.info("layer sampling (%s): %d of layers %s each round, draw weights %s", config.layer_sampling,
                     config.layers_per_round, self.layer_ids, [round(w, 4) for w in self.layer_draw_weights])
        return drawn_layers(self.layer_ids, self.layer_draw_weights, config.layers_per_round, self.seed,
                            server_round)

    def train_messages(self, server_round, nodes, config):
        self.round_layers = self.layers_for(server_round)
        config["train-layers"] = ",".join(map(str, self.round_layers))
        log.info("round %d: training layers %s (%s)", server_round, list(self.round_layers),
                 self.sampling_config.layer_sampling)
        return super().train_messages(server_round, nodes, config)

    def uplink_keys(self) -> set[str]:
        keys = super().uplink_keys()
        if self.round_layers is None:
            return keys
        return {k for k in keys if layer_index(k) is None or layer_index(k) in self.round_layers}


def with_layer_sampling(cls: type[LoRAStrategy]) -> type[LoRAStrategy]:
    """`cls` whose rounds train only the sampled layers."""
    return type(f"LayerSampling{cls.__name__}", (LayerSampling, cls), {})


__all__ = ["LayerSampling", "with_layer_sampling"]
