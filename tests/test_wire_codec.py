"""The quantized wire's codes (ist_accel.wire_codec): unbiased, within a step, the same
whatever order a message lays its elements out in, and sized as the ledger counts them."""

import pytest
import torch

from ist_accel.wire_codec import QUANTIZED, Run, WireCodec, blocks_of, noise, stream_id

KINDS = sorted(QUANTIZED)


@pytest.mark.parametrize("kind", KINDS)
def test_stochastic_rounding_is_unbiased_and_within_a_step(kind):
    codec = WireCodec(kind, 32, seed=3, values=torch.float64)
    x = torch.linspace(-1, 1, 64, dtype=torch.float64) ** 3
    labels = torch.arange(64) // 32
    trials = [codec.roundtrip(x, labels, noise(3, r, 7, torch.arange(64), torch.float64)) for r in range(3000)]
    mean = torch.stack(trials).mean(0)
    amax = torch.stack([x[:32].abs().max(), x[32:].abs().max()])[labels]
    step = amax / codec.top  # int: one code; fp8: at most the largest gap, 32 / 448 of the block's absmax
    widest = step if kind != "fp8" else amax * 32 / 448
    for t in trials[:50]:
        assert ((t - x).abs() <= widest + 1e-12).all()
    # the mean of 3000 draws: within 4 standard errors of an unbiased rounding (at most a step / 2 each)
    assert ((mean - x).abs() <= 4 * widest / 2 / 3000 ** 0.5 + 1e-12).all(), (mean - x).abs().max()
    nearest = codec.roundtrip(x, labels, torch.full((64,), 0.5, dtype=torch.float64))
    assert not torch.equal(nearest, trials[0])  # the numbers do vary the rounding


@pytest.mark.parametrize("kind", KINDS)
def test_a_message_decodes_the_same_whatever_order_its_elements_travel_in(kind):
    """Blocks and random numbers follow each element's global index, so a box laid out in any
    order by a sender decodes to the same values as the reference computes in index order."""
    torch.manual_seed(0)
    codec = WireCodec(kind, 16, seed=1, values=torch.float64)
    index = torch.randperm(1000)[:101]  # 101 elements of a 1000-element tensor, scattered
    x = torch.randn(101, dtype=torch.float64)
    frozen = torch.randn(5, dtype=torch.float64)
    runs = [Run(0, 101, stream_id("w", 0), index), Run(101, 5, stream_id("f", 0), raw=True)]
    payload = torch.empty(codec.payload_size(runs), dtype=torch.uint8)
    codec.encode(torch.cat([x, frozen]), runs, 4, payload)
    got = codec.decode(payload, runs, torch.empty(106, dtype=torch.float64))
    order = torch.argsort(index)  # the reference: the same elements in index order, blocks of 16
    expected = codec.roundtrip(x[order], torch.arange(101) // 16, noise(1, 4, stream_id("w", 0), index[order],
                                                                        torch.float64))
    assert torch.equal(got[:101][order], expected)
    assert torch.equal(got[101:], frozen)  # raw runs travel exactly
    codes = 101 if kind != "int4" else 51
    assert payload.numel() == -(-7 * 4 // 8) * 8 + 5 * 8 + -(-codes // 8) * 8  # scales, raw, codes: padded to 8


def test_blocks_follow_the_rank_of_the_index():
    assert blocks_of(torch.tensor([9, 2, 5, 7]), 2).tolist() == [1, 0, 0, 1]
    assert blocks_of(torch.arange(5), 2).tolist() == [0, 0, 1, 1, 2]


def test_noise_is_a_pure_function_of_its_key():
    index = torch.arange(10_000)
    a = noise(1, 2, 3, index, torch.float64)
    assert torch.equal(a, noise(1, 2, 3, index, torch.float64))
    for other in (noise(1, 3, 3, index, torch.float64), noise(2, 2, 3, index, torch.float64),
                  noise(1, 2, 4, index, torch.float64)):
        assert (a != other).float().mean() > 0.99
    assert 0 <= a.min() and a.max() < 1 and abs(a.mean().item() - 0.5) < 0.01


def test_a_zero_block_and_bad_settings():
    codec = WireCodec("int4", 8, seed=0)
    assert torch.equal(codec.roundtrip(torch.zeros(8), torch.zeros(8, dtype=torch.long), torch.rand(8)), torch.zeros(8))
    with pytest.raises(ValueError, match="one of int8, int4, fp8, got 'int2'"):
        WireCodec("int2", 8, seed=0)
    with pytest.raises(ValueError, match="wire_block must be an int >= 1, got 0"):
        WireCodec("int8", 0, seed=0)
