"""Attention, encoder/decoder layers and the transformer (models/transformer.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.denoising import Denoising
from models.pnp import PollAndPoolSampler
from models.transformer import (MultiheadAttention, Transformer, TransformerDecoder, TransformerDecoderLayer,
                                TransformerEncoderLayer, build_transformer, denoising_attention_mask,
                                group_attention_mask)
from util.flags import parse_args


D, HEADS, FFN = 16, 4, 32
ATOL = 1e-5

ATTN_KEYS = {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}
FFN_NORM_KEYS = {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
                 "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"}
ENCODER_LAYER_KEYS = {f"self_attn.{k}" for k in ATTN_KEYS} | FFN_NORM_KEYS
DECODER_LAYER_KEYS = (ENCODER_LAYER_KEYS | {f"multihead_attn.{k}" for k in ATTN_KEYS}
                      | {"norm3.weight", "norm3.bias"})


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter (biases and LayerNorm affine included) a non-default value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


def _torch_mha(ours: MultiheadAttention) -> nn.MultiheadAttention:
    theirs = nn.MultiheadAttention(ours.embed_dim, ours.num_heads, batch_first=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs.eval()


def _ln(x, norm):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def _ffn(x, layer):
    return F.linear(F.relu(F.linear(x, layer.linear1.weight, layer.linear1.bias)), layer.linear2.weight, layer.linear2.bias)


# ----------------------------------------------------------------------------- attention
def test_mha_state_dict_loads_strictly_into_torch_mha():
    ours = MultiheadAttention(D, HEADS)
    assert set(ours.state_dict()) == ATTN_KEYS
    assert set(nn.MultiheadAttention(D, HEADS, batch_first=True).state_dict()) == ATTN_KEYS
    theirs = _torch_mha(ours)
    torch.testing.assert_close(theirs.in_proj_weight, ours.in_proj_weight)


@pytest.mark.parametrize("with_mask", [False, True])
def test_mha_equals_torch_mha(with_mask):
    torch.manual_seed(0)
    ours = _randomize(MultiheadAttention(D, HEADS, dropout=0.1)).eval()
    theirs = _torch_mha(ours)
    query, key, value = torch.randn(2, 3, D), torch.randn(2, 5, D), torch.randn(2, 5, D)
    mask = None
    if with_mask:
        mask = torch.zeros(2, 5, dtype=torch.bool)
        mask[1, 3:] = True
        mask[0, 0] = True
    with torch.no_grad():
        out = ours(query, key, value, key_padding_mask=mask)
        ref = theirs(query, key, value, key_padding_mask=mask, need_weights=False)[0]
    assert out.shape == (2, 3, D)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("with_mask", [False, True])
def test_mha_self_attention_equals_torch_mha(with_mask):
    # query is key: q and k come from one product of the stacked weights
    torch.manual_seed(0)
    ours = _randomize(MultiheadAttention(D, HEADS)).eval()
    theirs = _torch_mha(ours)
    x, value = torch.randn(2, 5, D), torch.randn(2, 5, D)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2]) if with_mask else None
    with torch.no_grad():
        out = ours(x, x, value, key_padding_mask=mask)
        ref = theirs(x, x, value, key_padding_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)


def test_mha_attn_mask_with_key_padding_equals_torch_mha():
    torch.manual_seed(0)
    ours = _randomize(MultiheadAttention(D, HEADS)).eval()
    theirs = _torch_mha(ours)
    query, key, value = torch.randn(2, 4, D), torch.randn(2, 5, D), torch.randn(2, 5, D)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 4] = True
    allowed = torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    allowed[:, 0] = True  # every query keeps a key
    with torch.no_grad():
        out = ours(query, key, value, key_padding_mask=padding, attn_mask=allowed)
        ref = theirs(query, key, value, key_padding_mask=padding, attn_mask=~allowed, need_weights=False)[0]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)


def test_mha_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(10, 4)


# ----------------------------------------------------------------------------- key names
def test_encoder_layer_keys_match_detr():
    layer = TransformerEncoderLayer(D, HEADS, FFN)
    assert set(layer.state_dict()) == ENCODER_LAYER_KEYS
    torch_layer = nn.TransformerEncoderLayer(D, HEADS, FFN, batch_first=True)
    assert set(torch_layer.state_dict()) == ENCODER_LAYER_KEYS


def test_decoder_layer_keys_match_detr():
    layer = TransformerDecoderLayer(D, HEADS, FFN)
    assert set(layer.state_dict()) == DECODER_LAYER_KEYS
    assert set(nn.TransformerDecoderLayer(D, HEADS, FFN, batch_first=True).state_dict()) == DECODER_LAYER_KEYS


@pytest.mark.parametrize("pre_norm", [False, True])
def test_transformer_keys(pre_norm):
    model = Transformer(D, HEADS, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=FFN,
                        normalize_before=pre_norm, return_intermediate_dec=True)
    keys = set(model.state_dict())
    expected = ({f"encoder.layers.{i}.{k}" for i in range(2) for k in ENCODER_LAYER_KEYS}
                | {f"decoder.layers.{i}.{k}" for i in range(2) for k in DECODER_LAYER_KEYS}
                | {"decoder.norm.weight", "decoder.norm.bias"})
    if pre_norm:
        expected |= {"encoder.norm.weight", "encoder.norm.bias"}
    assert keys == expected


def test_transformer_with_sampler_keeps_sampler_init():
    torch.manual_seed(0)
    sampler = PollAndPoolSampler(D, num_coarse=4)
    before = {k: v.clone() for k, v in sampler.state_dict().items()}
    model = Transformer(D, HEADS, 1, 1, FFN, sampler=sampler)
    after = model.state_dict()
    assert {k for k in after if k.startswith("sampler.")} == {f"sampler.{k}" for k in before}
    for k, v in before.items():
        assert torch.equal(after[f"sampler.{k}"], v), k


# ----------------------------------------------------------------------------- layer math
@pytest.mark.parametrize("pre_norm", [False, True])
def test_encoder_layer_equals_reference_math(pre_norm):
    torch.manual_seed(1)
    layer = _randomize(TransformerEncoderLayer(D, HEADS, FFN, dropout=0.1, normalize_before=pre_norm), 1).eval()
    mha = _torch_mha(layer.self_attn)
    src, pos = torch.randn(2, 6, D), torch.randn(2, 6, D)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 4:] = True
    with torch.no_grad():
        out = layer(src, mask, pos)
        if pre_norm:
            x = _ln(src, layer.norm1)
            src2 = src + mha(x + pos, x + pos, x, key_padding_mask=mask, need_weights=False)[0]
            ref = src2 + _ffn(_ln(src2, layer.norm2), layer)
        else:
            x = _ln(src + mha(src + pos, src + pos, src, key_padding_mask=mask, need_weights=False)[0], layer.norm1)
            ref = _ln(x + _ffn(x, layer), layer.norm2)
    assert out.shape == (2, 6, D)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_encoder_layer_without_pos_equals_torch_layer(pre_norm):
    layer = _randomize(TransformerEncoderLayer(D, HEADS, FFN, normalize_before=pre_norm), 2).eval()
    theirs = nn.TransformerEncoderLayer(D, HEADS, FFN, dropout=0.1, batch_first=True, norm_first=pre_norm)
    theirs.load_state_dict(layer.state_dict(), strict=True)
    theirs.eval()
    src = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(layer(src), theirs(src), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_decoder_layer_equals_reference_math(pre_norm):
    torch.manual_seed(2)
    layer = _randomize(TransformerDecoderLayer(D, HEADS, FFN, normalize_before=pre_norm), 3).eval()
    self_mha, cross_mha = _torch_mha(layer.self_attn), _torch_mha(layer.multihead_attn)
    tgt, query_pos = torch.randn(2, 3, D), torch.randn(2, 3, D)
    memory, pos = torch.randn(2, 6, D), torch.randn(2, 6, D)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 2:] = True

    def attn(mha, q, k, v, m=None):
        return mha(q, k, v, key_padding_mask=m, need_weights=False)[0]

    with torch.no_grad():
        out = layer(tgt, memory, mask, pos, query_pos)
        if pre_norm:
            x = _ln(tgt, layer.norm1)
            t = tgt + attn(self_mha, x + query_pos, x + query_pos, x)
            x = _ln(t, layer.norm2)
            t = t + attn(cross_mha, x + query_pos, memory + pos, memory, mask)
            ref = t + _ffn(_ln(t, layer.norm3), layer)
        else:
            t = _ln(tgt + attn(self_mha, tgt + query_pos, tgt + query_pos, tgt), layer.norm1)
            t = _ln(t + attn(cross_mha, t + query_pos, memory + pos, memory, mask), layer.norm2)
            ref = _ln(t + _ffn(t, layer), layer.norm3)
    assert out.shape == (2, 3, D)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)


def test_dropout_is_active_in_train_mode_only():
    torch.manual_seed(3)
    layer = TransformerEncoderLayer(D, HEADS, FFN, dropout=0.5)
    src = torch.randn(1, 5, D)
    layer.eval()
    torch.testing.assert_close(layer(src), layer(src))
    layer.train()
    assert not torch.allclose(layer(src), layer(src))


# ----------------------------------------------------------------------------- decoder stack
def test_decoder_returns_every_normed_layer_output():
    torch.manual_seed(4)
    layer = TransformerDecoderLayer(D, HEADS, FFN)
    norm = _randomize(nn.LayerNorm(D), 4)
    decoder = TransformerDecoder(layer, 3, norm, return_intermediate=True).eval()
    last_only = TransformerDecoder(layer, 3, nn.LayerNorm(D), return_intermediate=False).eval()
    last_only.load_state_dict(decoder.state_dict(), strict=True)
    tgt, memory = torch.zeros(2, 4, D), torch.randn(2, 6, D)
    query_pos, pos = torch.randn(2, 4, D), torch.randn(2, 6, D)
    with torch.no_grad():
        hs = decoder(tgt, memory, None, pos, query_pos)
        final = last_only(tgt, memory, None, pos, query_pos)
        first = decoder.norm(decoder.layers[0](tgt, memory, None, pos, query_pos))
    assert hs.shape == (3, 2, 4, D)
    assert final.shape == (1, 2, 4, D)
    torch.testing.assert_close(hs[-1], final[0], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(hs[0], first, atol=ATOL, rtol=ATOL)


def _transformer(seed=5, **kwargs):
    torch.manual_seed(seed)
    return Transformer(D, HEADS, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=FFN,
                       return_intermediate_dec=True, **kwargs).eval()


def _inputs(seed=6):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(2, D, 3, 4, generator=gen)
    pos = torch.randn(2, D, 3, 4, generator=gen)
    query = torch.randn(5, D, generator=gen)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[0, :, 3] = True   # image 0: last column is padding
    mask[0, 2, :] = True   # and the last row
    return src, mask, query, pos


def test_transformer_output_shapes_without_sampler():
    model = _transformer()
    src, mask, query, pos = _inputs()
    with torch.no_grad():
        hs, memory, sampled = model(src, mask, query, pos)
    assert hs.shape == (2, 2, 5, D)
    assert memory.shape == (2, 12, D)
    assert sampled is None


def test_transformer_with_sampler_encodes_fine_plus_coarse_tokens():
    torch.manual_seed(0)
    model = _transformer(sampler=PollAndPoolSampler(D, num_coarse=3))
    src, _, query, pos = _inputs()
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    with torch.no_grad():
        hs, memory, sampled = model(src, mask, query, pos, sample_ratio=0.5)
    assert hs.shape == (2, 2, 5, D)
    assert memory.shape == (2, 6 + 3, D)  # int(12 * 0.5) fine + 3 coarse
    assert sampled.tokens.shape == (2, 9, D)


def test_group_attention_mask_is_block_diagonal():
    expected = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(group_attention_mask(2, 3, torch.device("cpu")), expected)


def _grouped_hs(model, query, groups):
    src, mask, _, pos = _inputs()
    with torch.no_grad():
        return model(src, mask, query, pos, query_groups=groups)[0]


@pytest.mark.parametrize("changed,kept", [(slice(5, 10), slice(0, 5)), (slice(0, 5), slice(5, 10))])
def test_a_query_group_never_sees_another_groups_queries(changed, kept):
    model = _transformer().train()  # dropout 0.1: seeded alike for both passes
    query = torch.randn(10, D, generator=torch.Generator().manual_seed(7))
    other = query.clone()
    other[changed] += 1.0
    torch.manual_seed(0)
    hs = _grouped_hs(model, query, 2)
    torch.manual_seed(0)
    hs_other = _grouped_hs(model, other, 2)
    torch.testing.assert_close(hs_other[:, :, kept], hs[:, :, kept], atol=ATOL, rtol=ATOL)
    assert not torch.allclose(hs_other[:, :, changed], hs[:, :, changed], atol=1e-3)


def test_queries_of_one_group_see_each_other():
    model = _transformer()
    query = torch.randn(10, D, generator=torch.Generator().manual_seed(7))
    other = query.clone()
    other[5:] += 1.0
    hs, hs_other = _grouped_hs(model, query, 1), _grouped_hs(model, other, 1)
    assert not torch.allclose(hs_other[:, :, :5], hs[:, :, :5], atol=1e-3), "one group: every query attends to all"


def test_denoising_attention_mask_hides_the_denoising_queries_from_the_matching_ones():
    matching = group_attention_mask(2, 2, torch.device("cpu"))
    allowed = denoising_attention_mask(matching, 4, group_size=3, groups=2, device=torch.device("cpu"))
    assert allowed.shape == (10, 10)
    assert torch.equal(allowed[:4, :4], matching)
    assert not allowed[:4, 4:].any(), "a matching query never sees a denoising query"
    assert allowed[4:, :4].all(), "a denoising query sees the matching queries"
    assert torch.equal(allowed[4:, 4:], group_attention_mask(3, 2, torch.device("cpu")))
    assert denoising_attention_mask(None, 4, 3, 2, torch.device("cpu"))[:4, :4].all()


def _denoising(seed: int, groups: int = 2, size: int = 3) -> Denoising:
    gen = torch.Generator().manual_seed(seed)
    shape = (2, groups * size)
    return Denoising(content=torch.randn(*shape, D, generator=gen), pos=torch.randn(*shape, D, generator=gen),
                     labels=torch.zeros(shape, dtype=torch.int64), boxes=torch.full((*shape, 4), 0.5),
                     valid=torch.ones(shape, dtype=torch.bool), group_size=size, groups=groups)


@pytest.mark.parametrize("groups", [1, 2])
def test_matching_queries_compute_the_same_with_or_without_denoising_queries(groups):
    model = _transformer()
    src, mask, _, pos = _inputs()
    query = torch.randn(5 * groups, D, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        plain = model(src, mask, query, pos, query_groups=groups)[0]
        first = model(src, mask, query, pos, query_groups=groups, denoising=_denoising(1))[0]
        second = model(src, mask, query, pos, query_groups=groups, denoising=_denoising(2))[0]
    assert first.shape == (2, 2, 5 * groups + 6, D)
    torch.testing.assert_close(first[:, :, :5 * groups], plain, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(second[:, :, :5 * groups], plain, atol=ATOL, rtol=ATOL)
    assert not torch.allclose(first[:, :, 5 * groups:], second[:, :, 5 * groups:], atol=1e-3)


def test_a_denoising_group_never_sees_another_group():
    model = _transformer()
    src, mask, query, pos = _inputs()
    dn, other = _denoising(1), _denoising(1)
    other.content[:, 3:] += 1.0
    other.pos[:, 3:] += 1.0
    with torch.no_grad():
        hs = model(src, mask, query, pos, denoising=dn)[0]
        hs_other = model(src, mask, query, pos, denoising=other)[0]
    torch.testing.assert_close(hs_other[:, :, :5 + 3], hs[:, :, :5 + 3], atol=ATOL, rtol=ATOL)
    assert not torch.allclose(hs_other[:, :, 5 + 3:], hs[:, :, 5 + 3:], atol=1e-3)


def test_encoder_inputs_are_every_position_or_the_samplers_tokens():
    src, mask, _, pos = _inputs()
    tokens, token_pos, padding, sampled = _transformer().encoder_inputs(src, mask, pos)
    assert sampled is None
    torch.testing.assert_close(tokens[1, 4], src[1, :, 1, 0])            # position (y=1, x=0), row-major
    torch.testing.assert_close(token_pos[1, 4], pos[1, :, 1, 0])
    assert torch.equal(padding, mask.flatten(1))
    torch.manual_seed(0)
    model = _transformer(sampler=PollAndPoolSampler(D, num_coarse=3))
    with torch.no_grad():
        tokens, token_pos, padding, sampled = model.encoder_inputs(src, mask, pos, 0.5)
    assert tokens is sampled.tokens and token_pos is sampled.pos and padding is sampled.key_padding_mask


def test_padded_positions_do_not_influence_output():
    model = _transformer()
    src, mask, query, pos = _inputs()
    src2, pos2 = src.clone(), pos.clone()
    src2[0][:, mask[0]] = 100.0 * torch.randn(D, int(mask[0].sum()))
    pos2[0][:, mask[0]] = -50.0
    with torch.no_grad():
        hs, memory, _ = model(src, mask, query, pos)
        hs2, memory2, _ = model(src2, mask, query, pos2)
    torch.testing.assert_close(hs2, hs, atol=ATOL, rtol=ATOL)
    valid = ~mask.flatten(1)
    torch.testing.assert_close(memory2[valid], memory[valid], atol=ATOL, rtol=ATOL)


def test_valid_positions_do_influence_output():
    # Control for the test above: the same change at a valid position changes the output.
    model = _transformer()
    src, mask, query, pos = _inputs()
    src2 = src.clone()
    src2[0, :, 0, 0] = 100.0
    with torch.no_grad():
        hs = model(src, mask, query, pos)[0]
        hs2 = model(src2, mask, query, pos)[0]
    assert not torch.allclose(hs2[:, 0], hs[:, 0], atol=1e-3)
    torch.testing.assert_close(hs2[:, 1], hs[:, 1], atol=ATOL, rtol=ATOL)  # image 1 is independent


def test_build_transformer_takes_retrofit_from_the_flags_and_the_papers_sampler_without_it():
    assert build_transformer(parse_args(["--retrofit"])).sampler.retrofit
    stored_before_the_flag = parse_args([])
    del stored_before_the_flag.retrofit
    assert not build_transformer(stored_before_the_flag).sampler.retrofit
