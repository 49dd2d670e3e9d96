"""NormalFloat blockwise quantization and the frozen quantized linear layer (issue 5, QLoRA / LQ-LoRA)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.adapters.lora import LoRAConfig, LoRALinear
from common.bases.blockwise import (
    NF4,
    BlockQuantConfig,
    code_indices,
    dequantize,
    dequantized_scales,
    pack_codes,
    quantize,
    unpack_codes,
)
from common.bases.codebooks import NF4_CODE, dynamic_code_8bit, max_half_gap, normal_float_code, normal_float_quantiles
from common.bases.quantized_linear import QuantizedLinear

BITS = (2, 3, 4, 8)


def _weight(d_out=64, d_in=48, seed=0):
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed))


def _blocks(flat, size):
    return F.pad(flat, (0, (-flat.numel()) % size)).reshape(-1, size)


def test_nf4_table_is_the_normal_quantile_rule():
    assert torch.allclose(torch.tensor(normal_float_quantiles(4)), torch.tensor(NF4_CODE), atol=1e-6)


@pytest.mark.parametrize("bits", range(2, 9))
def test_normal_float_codebooks(bits):
    code = normal_float_code(bits)
    assert code.numel() == 2**bits
    assert torch.all(code[1:] > code[:-1])
    assert code[0] == -1 and code[-1] == 1 and (code == 0).any()
    # asymmetric: one more positive value than negative ones (QLoRA's NF4 construction)
    assert int((code > 0).sum()) == 2 ** (bits - 1) and int((code < 0).sum()) == 2 ** (bits - 1) - 1


def test_bits_per_param_formula():
    assert round(NF4.bits_per_param, 3) == 4.127  # card (37) test (c)
    assert BlockQuantConfig(4, 64, scale_bits=0).bits_per_param == 4.5
    assert BlockQuantConfig(3, 128, 8, 256).bits_per_param == 3 + 8 / 128 + 32 / (128 * 256)


@pytest.mark.parametrize("config", [NF4, BlockQuantConfig(3, 128, 8, 256), BlockQuantConfig(2, 64, 0)])
def test_measured_storage_matches_formula(config):
    """Stored bytes = formula, plus one fp32 scalar per matrix (the mean of the scales, 0 without DQ)."""
    q = quantize(_weight(256, 1024), config)
    assert q.storage_bits() == pytest.approx(config.bits_per_param + 32 / q.numel, rel=1e-12)


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip(bits):
    count = 101  # odd and not a multiple of 8: exercises the padding
    indices = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(indices, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-count * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, count), indices)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block_size", (64, 128))
def test_round_trip_error_bound_and_nearest_code(bits, block_size):
    """|w - deq(q(w))| <= absmax * half the largest code gap, per block; and deq is the nearest code."""
    w = _weight()
    config = BlockQuantConfig(bits, block_size, scale_bits=0)
    q = quantize(w, config)
    code = normal_float_code(bits)
    blocks = _blocks(w.reshape(-1), block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    error = _blocks((w - dequantize(q)).reshape(-1), block_size).abs()
    assert torch.all(error <= absmax * max_half_gap(code) * (1 + 1e-6))
    brute = code[(blocks / absmax)[..., None].sub(code).abs().argmin(dim=-1)] * absmax
    assert torch.allclose(brute.reshape(-1)[: w.numel()], dequantize(q).reshape(-1), atol=1e-6)


def test_double_quantized_error_bound():
    """With 8-bit scales the bound gains the scale's own error |c - ĉ| (codes have |value| <= 1)."""
    w = _weight(128, 96)
    q = quantize(w, NF4)
    absmax = _blocks(w.reshape(-1), 64).abs().amax(dim=1, keepdim=True)
    approx = dequantized_scales(q)[:, None]
    error = _blocks((w - dequantize(q)).reshape(-1), 64).abs()
    assert torch.all(error <= absmax * max_half_gap(normal_float_code(4)) + (absmax - approx).abs() + 1e-6)
    assert torch.all((absmax - approx).abs() <= 0.02 * absmax)  # the 8-bit scales are close


@pytest.mark.parametrize("config", [BlockQuantConfig(b, 64, s) for b in BITS for s in (0, 8)])
def test_each_block_is_at_most_2_to_the_b_codes_times_one_scale(config):
    w = _weight()
    q = quantize(w, config)
    deq = _blocks(dequantize(q).reshape(-1), config.block_size)
    scale = dequantized_scales(q)[:, None]
    code = normal_float_code(config.bits)
    for row, s in zip(deq, scale):
        assert row.unique().numel() <= 2**config.bits
        assert torch.allclose(row, code[(row / s)[:, None].sub(code).abs().argmin(dim=1)] * s, atol=1e-6)


def test_constant_and_zero_blocks():
    w = torch.zeros(4, 64)
    w[1] = 3.0
    assert torch.equal(dequantize(quantize(w, NF4)), w)


@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("block_size", (64, 128))
def test_equals_bitsandbytes_nf4(double_quant, block_size):
    """Our NF4 bytes and dequantized weights are identical to bitsandbytes' on CPU.

    The dequantized reference is bitsandbytes' portable implementation (its `default` backend, the one its CPU
    kernel falls back to), not the native kernel `dequantize_4bit` picks on a CPU where torch reports AVX512:
    bitsandbytes 0.50.2's AVX512 kernel scales with the wrong block's absmax when a block spans rows (this
    64 x 48 weight at block 64 came back with errors up to 1.41, more than NF4's own error bound allows)."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    w = _weight(64, 48, seed=3)
    ours = quantize(w, BlockQuantConfig(4, block_size, 8 if double_quant else 0, 256))
    packed, state = bnb_functional.quantize_4bit(w, blocksize=block_size, quant_type="nf4",
                                                 compress_statistics=double_quant)
    assert torch.equal(ours.codes, packed.reshape(-1))
    absmax = state.absmax
    if state.nested:  # as bitsandbytes.functional.dequantize_4bit does
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    reference = _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), state.code, block_size, w.shape,
                                         torch.float32)
    assert torch.equal(dequantize(ours), reference)
    assert torch.equal(normal_float_code(4), bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code_8bit(), bnb_functional.create_dynamic_map())


def test_quantized_linear_owns_buffers_only_and_saves_memory():
    dense = nn.Linear(512, 256)
    layer = QuantizedLinear.from_linear(dense, NF4)
    assert list(layer.parameters()) == []
    assert {name for name, _ in layer.named_buffers()} == {"codes", "absmax", "scale_absmax", "scale_offset", "bias"}
    fp32_bytes = dense.weight.numel() * 4 + dense.bias.numel() * 4
    assert layer.storage_bytes() < fp32_bytes / 6  # 4.13 bits instead of 32, plus the fp32 bias
    x = torch.randn(5, 512)
    expected = F.linear(x, dequantize(quantize(dense.weight, NF4)), dense.bias)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    clone = copy.deepcopy(layer)
    assert torch.equal(clone(x), layer(x))


def _lora_pair(config: BlockQuantConfig):
    """The same LoRA (A random, B non-zero) on a quantized base and on its dequantized dense copy."""
    torch.manual_seed(0)
    dense = nn.Linear(48, 64)
    quantized = QuantizedLinear.from_linear(dense, config)
    reference = nn.Linear(48, 64)
    with torch.no_grad():
        reference.weight.copy_(quantized.weight)
        reference.bias.copy_(dense.bias)
    lora_config = LoRAConfig(rank=4, alpha=8.0)
    on_quantized = LoRALinear(quantized, lora_config, "layer")
    on_dense = LoRALinear(reference, lora_config, "layer")
    with torch.no_grad():
        on_quantized.lora_B.weight.normal_(generator=torch.Generator().manual_seed(1))
        on_dense.lora_B.weight.copy_(on_quantized.lora_B.weight)
    return on_quantized, on_dense


@pytest.mark.parametrize("config", [NF4, BlockQuantConfig(3, 64, 0)])
def test_lora_on_quantized_base_equals_lora_on_dequantized_weights(config):
    on_quantized, on_dense = _lora_pair(config)
    x = torch.randn(7, 48)
    out_q, out_d = on_quantized(x), on_dense(x)
    assert torch.allclose(out_q, out_d, atol=1e-5)
    out_q.square().sum().backward()
    out_d.square().sum().backward()
    assert torch.allclose(on_quantized.lora_B.weight.grad, on_dense.lora_B.weight.grad, rtol=1e-4, atol=1e-5)
    assert [n for n, p in on_quantized.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


def test_merging_into_a_quantized_base_is_refused():
    on_quantized, _ = _lora_pair(NF4)
    with pytest.raises(AttributeError):
        on_quantized.merge()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_per_sample_gradients_on_quantized_base():
    """Opacus hooks only the LoRA nn.Linears; per-sample grads equal one-example-at-a-time grads."""
    from opacus import GradSampleModule

    on_quantized, _ = _lora_pair(NF4)
    on_quantized.lora_A.requires_grad_(False)  # FedSVD / FFA: only B trains
    model = GradSampleModule(on_quantized, loss_reduction="sum")
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(2))
    model(x).square().sum().backward()
    per_sample = on_quantized.lora_B.weight.grad_sample
    for i in range(4):
        on_quantized.lora_B.weight.grad = None
        single = on_quantized.lora_B.weight.detach().clone().requires_grad_(True)
        out = on_quantized.base(x[i : i + 1]) + on_quantized.scaling * on_quantized.lora_A(x[i : i + 1]) @ single.T
        (grad,) = torch.autograd.grad(out.square().sum(), single)
        assert torch.allclose(per_sample[i], grad, rtol=1e-4, atol=1e-5)


def test_code_indices_fit_in_b_bits():
    q = quantize(_weight(), BlockQuantConfig(3, 64, 0))
    assert int(code_indices(q).max()) < 8 and q.codes.numel() == -(-64 * 48 * 3 // 8)
