"""Deterministic splits: a global test set for the server, then one partition per client.

Partitioning uses flwr-datasets' partitioners (IID, Dirichlet label skew) on an in-memory
`datasets.Dataset` of row indices, so every party derives the same split from the seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from common.config import RunConfig
from common.data.dataset import TextDataset
from common.data.loading import load_dataset
from common.errors import DataError

MIN_CLIENT_EXAMPLES = 10


@dataclass(frozen=True)
class ClientData:
    train: TextDataset
    test: TextDataset


def split_off(dataset: TextDataset, fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """(rest, held_out) with round(fraction * n) examples held out, by a seeded permutation."""
    order = np.random.default_rng(seed).permutation(len(dataset))
    n_held = max(1, int(round(fraction * len(dataset))))
    return dataset.subset(sorted(order[n_held:])), dataset.subset(sorted(order[:n_held]))


def global_test_set(config: RunConfig) -> TextDataset:
    """The server's held-out test set; no client ever trains on it."""
    return _global_split(config)[1]


def public_split(config: RunConfig) -> TextDataset:
    """The server's public split (`public-examples` examples no client holds), for data-driven inits."""
    if not uses_public_split(config):
        raise DataError(f"adapter {config.adapter!r} with init-data = {config.init_data!r} and layer-sampling = "
                        f"{config.layer_sampling!r} has no public split")
    return _client_pool(config)[1]


def uses_public_split(config: RunConfig) -> bool:
    from common.adapters.registry import reads_init_data

    if config.base_init == "eora":  # EoRA's calibration set (common/bases/eora_init.py)
        return True
    if config.base == "lq_lora" and config.lq_fisher == "public":  # LQ-LoRA's Fisher (common/bases/fisher.py)
        return True
    if config.layer_sampling == "owlore":  # OwLore's outlier ratios (common/layer_sampling.py)
        return True
    return config.init_data == "public" and reads_init_data(config)


def client_data(config: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    """Client `partition_id`'s local train and test data."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    indices = _partition_indices(config, num_partitions)[partition_id]
    pool = _client_pool(config)[0]
    train, test = split_off(pool.subset(indices), config.local_test_fraction, config.seed + 1 + partition_id)
    if config.audit_canaries and partition_id == config.audit_client:  # the privacy audit's client
        from common.privacy.canaries import with_canaries

        train = with_canaries(train, config.audit_canaries, config.seed)
    return ClientData(train=train, test=test)


def _global_split(config: RunConfig) -> tuple[TextDataset, TextDataset]:
    return split_off(load_dataset(config), config.global_test_fraction, config.seed)


def _client_pool(config: RunConfig) -> tuple[TextDataset, TextDataset | None]:
    """(what the clients share out, the server's public split or None)."""
    pool = _global_split(config)[0]
    if not uses_public_split(config):
        return pool, None
    if config.public_examples >= len(pool):
        raise DataError(f"public-examples = {config.public_examples} leaves no training data "
                        f"({len(pool)} examples outside the global test set)")
    return split_off(pool, config.public_examples / len(pool), config.seed + 7919)


@lru_cache(maxsize=8)
def _partition_indices(config: RunConfig, num_partitions: int) -> list[list[int]]:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    pool = _client_pool(config)[0]
    needed = num_partitions * MIN_CLIENT_EXAMPLES / (1 - config.local_test_fraction)
    if len(pool) < needed:
        raise DataError(
            f"{pool.source}: {len(pool)} training examples are too few for {num_partitions} clients "
            f"(need at least {int(np.ceil(needed))}); use fewer clients or more data"
        )
    table = Dataset.from_dict({"label": pool.labels, "row": list(range(len(pool)))})
    if config.partitioner == "iid":
        # IidPartitioner cuts contiguous shards; the pool is ordered (WordNet by category), so shuffle.
        table = table.shuffle(seed=config.seed)
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=config.dirichlet_alpha,
            min_partition_size=MIN_CLIENT_EXAMPLES, self_balancing=False, shuffle=True, seed=config.seed,
        )
    partitioner.dataset = table
    try:
        return [partitioner.load_partition(pid)["row"] for pid in range(num_partitions)]
    except ValueError as err:
        raise DataError(f"{pool.source}: cannot partition into {num_partitions} clients: {err}") from None
