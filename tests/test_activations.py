"""Activation roundings (the llama.cpp CPU rules) and the output noise they add, against direct formulas."""
from __future__ import annotations

import pytest
import torch

from bitalloc.activations import (ROUNDING_NAMES, activation_noise, get_rounding, gram_noise, gram_pays, output_noise,
                                  q8_0_roundtrip, q8_k_roundtrip, residual_gram, roundings_for)
from bitalloc.errors import InputError
from bitalloc.formats import get_format


def test_activation_noise_is_the_squared_output_change_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 256, generator=g) * torch.rand(37, 1, generator=g) * 4
    x[3, 7] = 60.0  # an outlier: its block's other values round coarsely
    w = torch.randn(5, 256, generator=g)
    for name, fn in (("q8_0", q8_0_roundtrip), ("q8_k", q8_k_roundtrip)):
        got = activation_noise(x, w, get_rounding(name))
        want = torch.zeros(5, dtype=torch.float64)
        for t in range(37):
            for j in range(5):
                want[j] += float((x[t].double() - fn(x[t]).double()) @ w[j].double()) ** 2
        assert got.dtype == torch.float64 and got.shape == (5,)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
        assert (got > 0).all()
    # Q8_K keeps one scale per 256 values, Q8_0 one per 32: the outlier costs Q8_K more
    assert activation_noise(x, w, get_rounding("q8_k")).sum() > activation_noise(x, w, get_rounding("q8_0")).sum()


def test_exact_activations_add_no_noise():
    x = torch.zeros(4, 64)
    x[:, ::32] = 127.0
    x[:, 1::32] = -3.0  # exactly representable: amax 127 gives scale 1
    assert torch.equal(activation_noise(x, torch.randn(3, 64), get_rounding("q8_0")), torch.zeros(3, dtype=torch.float64))


def test_rounding_registry_and_which_widths_it_applies_to():
    assert set(ROUNDING_NAMES) == {"q8_0", "q8_k"}
    assert get_rounding("q8_0").applies(576) and not get_rounding("q8_k").applies(576)
    assert get_rounding("q8_k").applies(1536) and not get_rounding("q8_0").applies(0)
    with pytest.raises(InputError, match="unknown activation rounding 'q4'"):
        get_rounding("q4")
    with pytest.raises(InputError, match="not a multiple of 256"):
        q8_k_roundtrip(torch.ones(2, 576))
    assert roundings_for(["q5_k", "q8_0", "int4-g128", "q4_0", "fp16"]) == ["q8_0", "q8_k"]
    assert roundings_for(["int4-g128"]) == []


def test_one_residual_serves_every_weight_reading_the_input():
    g = torch.Generator().manual_seed(2)
    x, w1, w2 = torch.randn(9, 64, generator=g), torch.randn(3, 64, generator=g), torch.randn(5, 64, generator=g)
    rnd = get_rounding("q8_0")
    d = rnd.residual(x)
    assert torch.equal(d, x - q8_0_roundtrip(x))
    for w in (w1, w2):
        assert torch.equal(output_noise(d, w), activation_noise(x, w, rnd))


def test_the_residuals_gram_matrix_gives_the_same_noise_summed_over_batches():
    g = torch.Generator().manual_seed(3)
    rnd = get_rounding("q8_0")
    batches = [torch.randn(n, 64, generator=g) * 3 for n in (7, 12, 5)]
    w = torch.randn(200, 64, generator=g)
    direct = sum(output_noise(rnd.residual(x), w) for x in batches)
    gram = sum(residual_gram(rnd.residual(x)) for x in batches)
    got = gram_noise(gram, w)
    assert got.dtype == torch.float64 and got.shape == (200,)
    torch.testing.assert_close(got, direct, rtol=1e-5, atol=0)
    # the Gram form pays where many more output channels read the input than it has columns, over many tokens
    assert gram_pays(576, 49152, 12288) and gram_pays(576, 960, 12288) and gram_pays(2048, 11264, 6144)
    assert not gram_pays(576, 576, 12288) and not gram_pays(1536, 576, 12288) and not gram_pays(2048, 2560, 6144)
    assert not gram_pays(576, 49152, 300)  # few tokens: the Gram form's fixed out · in² is not repaid


@pytest.mark.parametrize("fmt, rounding", [("q8_0", "q8_0"), ("q4_1", "q8_0"), ("iq4_nl", "q8_0"), ("q5_k", "q8_k"),
                                           ("q2_k", "q8_k"), ("int4-g128", None), ("fp16", None)])
def test_formats_name_the_rounding_of_their_runtime(fmt, rounding):
    assert get_format(fmt).activation_rounding == rounding
