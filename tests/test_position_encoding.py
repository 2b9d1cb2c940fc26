"""Sine and learned position encodings (models/position_encoding.py)."""
import argparse
import math

import pytest
import torch

from models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine, build_position_encoding
from util.misc import NestedTensor

FEATS = 8  # channels per axis; the encoding has 2 * FEATS channels


def _unpadded(batch=2, height=5, width=7, channels=3):
    x = torch.rand(batch, channels, height, width)
    return NestedTensor(x, torch.zeros(batch, height, width, dtype=torch.bool))


def _expected_channels(coord: float, feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """The formula written out: channel c is sin (c even) / cos (c odd) of coord / T^(2 floor(c/2) / F)."""
    values = []
    for c in range(feats):
        angle = coord / temperature ** (2 * (c // 2) / feats)
        values.append(math.sin(angle) if c % 2 == 0 else math.cos(angle))
    return torch.tensor(values)


def test_sine_shape_and_dtype():
    pos = PositionEmbeddingSine(FEATS, normalize=True)(_unpadded())
    assert pos.shape == (2, 2 * FEATS, 5, 7)
    assert pos.dtype == torch.float32


def test_sine_normalized_values_at_known_position():
    height, width, row, col = 5, 7, 2, 4
    pos = PositionEmbeddingSine(FEATS, normalize=True)(_unpadded(height=height, width=width))
    # Cumulative coordinate (1-based) scaled so the last valid row/column sits at 2*pi.
    y = (row + 1) / (height + 1e-6) * 2 * math.pi
    x = (col + 1) / (width + 1e-6) * 2 * math.pi
    expected = torch.cat([_expected_channels(y, FEATS), _expected_channels(x, FEATS)])
    torch.testing.assert_close(pos[0, :, row, col], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pos[1, :, row, col], expected, atol=1e-5, rtol=1e-5)


def test_sine_unnormalized_values_use_raw_cumulative_coordinates():
    pos = PositionEmbeddingSine(FEATS, normalize=False)(_unpadded(height=5, width=7))
    expected = torch.cat([_expected_channels(3.0, FEATS), _expected_channels(5.0, FEATS)])
    torch.testing.assert_close(pos[0, :, 2, 4], expected, atol=1e-5, rtol=1e-5)


def test_sine_y_channels_come_first_and_depend_on_row_only():
    pos = PositionEmbeddingSine(FEATS, normalize=True)(_unpadded(height=5, width=7))
    y_part, x_part = pos[0, :FEATS], pos[0, FEATS:]
    # y channels are constant along a row, x channels constant along a column.
    torch.testing.assert_close(y_part, y_part[:, :, :1].expand_as(y_part))
    torch.testing.assert_close(x_part, x_part[:, :1, :].expand_as(x_part))
    assert not torch.allclose(y_part[:, 0, 0], y_part[:, 1, 0])


def test_sine_normalized_ignores_padding_amount():
    torch.manual_seed(0)
    height, width = 5, 7
    image = torch.rand(1, 3, height, width)
    alone = PositionEmbeddingSine(FEATS, normalize=True)(NestedTensor(image, torch.zeros(1, height, width, dtype=torch.bool)))
    padded = torch.zeros(1, 3, 9, 12)
    padded[..., :height, :width] = image
    mask = torch.ones(1, 9, 12, dtype=torch.bool)
    mask[:, :height, :width] = False
    in_batch = PositionEmbeddingSine(FEATS, normalize=True)(NestedTensor(padded, mask))
    assert in_batch.shape == (1, 2 * FEATS, 9, 12)
    torch.testing.assert_close(in_batch[..., :height, :width], alone)


def test_sine_normalized_code_depends_on_valid_extent():
    # Control for the test above: normalisation really depends on the valid extent,
    # so the same position in a larger unpadded image gets a different code.
    small = PositionEmbeddingSine(FEATS, normalize=True)(_unpadded(1, 5, 7))
    large = PositionEmbeddingSine(FEATS, normalize=True)(_unpadded(1, 9, 12))
    assert not torch.allclose(large[..., :5, :7], small)


def test_sine_missing_mask_means_no_padding():
    nested = _unpadded()
    enc = PositionEmbeddingSine(FEATS, normalize=True)
    torch.testing.assert_close(enc(NestedTensor(nested.tensors, None)), enc(nested))


def test_sine_scale_requires_normalize():
    with pytest.raises(ValueError, match="normalize"):
        PositionEmbeddingSine(FEATS, normalize=False, scale=1.0)


def test_learned_shape_and_values_come_from_tables():
    torch.manual_seed(0)
    enc = PositionEmbeddingLearned(FEATS)
    pos = enc(_unpadded(batch=2, height=4, width=6))
    assert pos.shape == (2, 2 * FEATS, 4, 6)
    # First half: column table at x; second half: row table at y.
    torch.testing.assert_close(pos[1, :FEATS, 3, 5], enc.col_embed.weight[5])
    torch.testing.assert_close(pos[1, FEATS:, 3, 5], enc.row_embed.weight[3])
    torch.testing.assert_close(pos[0], pos[1])


def test_learned_state_dict_keys_and_table_size():
    sd = PositionEmbeddingLearned(FEATS).state_dict()
    assert set(sd) == {"row_embed.weight", "col_embed.weight"}
    assert sd["row_embed.weight"].shape == (50, FEATS)


def test_learned_accepts_50_rejects_51_positions():
    enc = PositionEmbeddingLearned(FEATS)
    assert enc(_unpadded(1, 50, 2, channels=1)).shape == (1, 2 * FEATS, 50, 2)
    with pytest.raises(ValueError, match="50"):
        enc(_unpadded(1, 51, 2, channels=1))
    with pytest.raises(ValueError, match="50"):
        enc(_unpadded(1, 2, 51, channels=1))


@pytest.mark.parametrize("name,cls", [("sine", PositionEmbeddingSine), ("v2", PositionEmbeddingSine),
                                      ("learned", PositionEmbeddingLearned), ("v3", PositionEmbeddingLearned)])
def test_build_position_encoding_gives_hidden_dim_channels(name, cls):
    enc = build_position_encoding(argparse.Namespace(hidden_dim=32, position_embedding=name))
    assert isinstance(enc, cls)
    assert enc(_unpadded(1, 3, 4)).shape == (1, 32, 3, 4)
    if cls is PositionEmbeddingSine:
        assert enc.normalize


def test_build_position_encoding_rejects_unknown_name():
    with pytest.raises(ValueError, match="position_embedding"):
        build_position_encoding(argparse.Namespace(hidden_dim=32, position_embedding="rope"))
