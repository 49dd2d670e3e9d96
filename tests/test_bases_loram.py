"""LoRAM: structured pruning, adapter recovery to full size, and pruning a whole BERT model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.bases.pruning import (
    channel_importance,
    head_importance,
    kept_count,
    prune_bert,
    prune_linear,
    recover_lora,
    select_kept,
    select_lora,
)

D_OUT, D_IN, RANK, SCALE = 64, 48, 4, 2.0


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _kept(n, keep, seed):
    return torch.sort(torch.randperm(n, generator=_gen(seed))[:keep]).values


def test_recover_then_select_is_exact_with_zeros_at_pruned_positions():
    kept_out, kept_in = _kept(D_OUT, 40, 1), _kept(D_IN, 30, 2)
    b_p, a_p = torch.randn(40, RANK, generator=_gen(3)), torch.randn(RANK, 30, generator=_gen(4))
    b, a = recover_lora(b_p, a_p, kept_out, kept_in, D_OUT, D_IN)
    assert b.shape == (D_OUT, RANK) and a.shape == (RANK, D_IN)
    again_b, again_a = select_lora(b, a, kept_out, kept_in)
    assert torch.equal(again_b, b_p) and torch.equal(again_a, a_p)
    pruned_rows = torch.ones(D_OUT, dtype=torch.bool)
    pruned_rows[kept_out] = False
    pruned_cols = torch.ones(D_IN, dtype=torch.bool)
    pruned_cols[kept_in] = False
    assert torch.all(b[pruned_rows] == 0) and torch.all(a[:, pruned_cols] == 0)


def test_recovered_merge_equals_pruned_model_on_kept_coordinates():
    """(W + s B A)[kept_out][:, kept_in] = W^P + s B^P A^P, and W is untouched at pruned coordinates."""
    w = torch.randn(D_OUT, D_IN, generator=_gen(5))
    kept_out, kept_in = _kept(D_OUT, 40, 6), _kept(D_IN, 30, 7)
    layer = nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        layer.weight.copy_(w)
    small = prune_linear(layer, kept_out, kept_in)
    b_p, a_p = torch.randn(40, RANK, generator=_gen(8)), torch.randn(RANK, 30, generator=_gen(9))
    b, a = recover_lora(b_p, a_p, kept_out, kept_in, D_OUT, D_IN)
    merged = w + SCALE * b @ a
    assert torch.allclose(merged[kept_out][:, kept_in], small.weight + SCALE * b_p @ a_p, atol=1e-6)
    touched = torch.zeros(D_OUT, D_IN, dtype=torch.bool)
    touched[kept_out[:, None], kept_in[None, :]] = True
    assert torch.equal(merged[~touched], w[~touched])
    # as functions: the pruned layer on the kept inputs equals the merged full layer on the kept outputs
    x = torch.zeros(3, D_IN)
    x[:, kept_in] = torch.randn(3, 30, generator=_gen(10))
    full = x @ merged.T + layer.bias
    pruned = small(x[:, kept_in]) + SCALE * x[:, kept_in] @ a_p.T @ b_p.T
    assert torch.allclose(full[:, kept_out], pruned, atol=1e-5)


@pytest.mark.parametrize("ratio", (0.25, 0.5, 0.75))
def test_pruned_linear_parameter_count_matches_ratio(ratio):
    layer = nn.Linear(D_IN, D_OUT)
    keep = kept_count(D_OUT, ratio)
    small = prune_linear(layer, kept_out=select_kept(torch.linalg.norm(layer.weight, dim=1), keep))
    assert keep == round((1 - ratio) * D_OUT)
    assert sum(p.numel() for p in small.parameters()) == keep * (D_IN + 1)


def test_select_kept_takes_the_top_scores_in_index_order():
    scores = torch.tensor([0.5, 3.0, 1.0, 3.0, 0.1])
    assert select_kept(scores, 3).tolist() == [1, 2, 3]


def test_importance_is_the_norm_of_the_touching_weights():
    up, down = nn.Linear(6, 4), nn.Linear(4, 6)
    j = 2
    expected = (up.weight[j].square().sum() + up.bias[j] ** 2 + down.weight[:, j].square().sum()).sqrt()
    assert channel_importance(up, down)[j].item() == pytest.approx(expected.item(), rel=1e-6)
    q, k, v, o = (nn.Linear(8, 8) for _ in range(4))
    h, size = 1, 4
    rows = slice(h * size, (h + 1) * size)
    total = sum(l.weight[rows].square().sum() + l.bias[rows].square().sum() for l in (q, k, v))
    total = total + o.weight[:, rows].square().sum()
    assert head_importance(q, k, v, o, num_heads=2)[h].item() == pytest.approx(total.sqrt().item(), rel=1e-6)


@pytest.mark.parametrize("ratio", (0.0, 1.0, -0.1, 1.5))
def test_ratio_outside_open_interval_is_refused(ratio):
    with pytest.raises(ValueError, match="prune ratio"):
        kept_count(10, ratio)
    with pytest.raises(ValueError, match="prune ratio"):
        prune_bert(nn.Module(), ratio)


def _tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertModel(config).eval(), config


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("ratio", (0.25, 0.5))
def test_prune_bert_runs_and_has_the_expected_parameter_count(ratio):
    model, config = _tiny_bert()
    result = prune_bert(model, ratio)
    hidden, heads, size = config.hidden_size, config.num_attention_heads, config.hidden_size // 4
    gone_channels = config.intermediate_size - round((1 - ratio) * config.intermediate_size)
    gone_heads = heads - round((1 - ratio) * heads)
    per_layer = gone_channels * (2 * hidden + 1) + gone_heads * size * (3 * (hidden + 1) + hidden)
    assert _count(result.model) == _count(model) - config.num_hidden_layers * per_layer
    ids = torch.randint(0, 50, (2, 10), generator=_gen(1))
    out = result.model(input_ids=ids).last_hidden_state
    assert out.shape == (2, 10, hidden) and torch.isfinite(out).all()
    assert _count(model) == _count(_tiny_bert()[0])  # the input model is not modified
    rows, _ = result.index_maps["encoder.layer.0.attention.self.query"]
    assert rows.numel() == (heads - gone_heads) * size
    assert result.model.encoder.layer[0].attention.self.num_attention_heads == heads - gone_heads


def test_pruning_dead_channels_and_heads_keeps_the_function():
    """Channels and heads whose weights are all zero score 0, are pruned first, and change nothing."""
    model, config = _tiny_bert()
    size = config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        for layer in model.encoder.layer:
            dead = torch.arange(0, 64, 4)  # 16 of 64 channels: ratio 0.25
            layer.intermediate.dense.weight[dead] = 0
            layer.intermediate.dense.bias[dead] = 0
            layer.output.dense.weight[:, dead] = 0
            head = slice(2 * size, 3 * size)  # 1 of 4 heads
            for proj in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                proj.weight[head] = 0
                proj.bias[head] = 0
            layer.attention.output.dense.weight[:, head] = 0
    result = prune_bert(model, 0.25)
    channels, _ = result.index_maps["encoder.layer.1.intermediate.dense"]
    assert not set(range(0, 64, 4)) & set(channels.tolist())
    rows, _ = result.index_maps["encoder.layer.0.attention.self.value"]
    assert not set(range(2 * size, 3 * size)) & set(rows.tolist())
    ids = torch.randint(0, 50, (2, 10), generator=_gen(2))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    full = model(input_ids=ids, attention_mask=mask).last_hidden_state
    small = result.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(full, small, atol=1e-5)


def test_adapter_trained_on_pruned_bert_recovers_onto_the_full_model():
    """A LoRA on the pruned query, recovered to full size and merged, changes only the kept rows."""
    model, _ = _tiny_bert()
    result = prune_bert(model, 0.5)
    name = "encoder.layer.0.attention.self.query"
    rows, cols = result.index_maps[name]
    small = result.model.get_submodule(name)
    b_p = torch.randn(small.out_features, RANK, generator=_gen(3))
    a_p = torch.randn(RANK, small.in_features, generator=_gen(4))
    full = model.get_submodule(name)
    b, a = recover_lora(b_p, a_p, rows, cols, full.out_features, full.in_features)
    merged = full.weight.detach() + SCALE * b @ a
    assert torch.allclose(merged[rows], small.weight.detach() + SCALE * b_p @ a_p, atol=1e-6)
    others = torch.ones(full.out_features, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(merged[others], full.weight.detach()[others])
