"""The COCO panoptic PNG id encoding (util/panoptic_png.py)."""
import numpy as np
import pytest

from util.panoptic_png import ids_to_rgb, rgb_to_ids


def test_ids_are_r_plus_256_g_plus_256_squared_b():
    ids = np.array([[0, 1, 255], [256, 65536, 256 ** 3 - 1]])
    rgb = ids_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb.tolist() == [[[0, 0, 0], [1, 0, 0], [255, 0, 0]], [[0, 1, 0], [0, 0, 1], [255, 255, 255]]]
    assert rgb_to_ids(rgb).tolist() == ids.tolist()


def test_round_trip_of_random_ids():
    ids = np.random.default_rng(0).integers(0, 256 ** 3, size=(7, 9))
    assert np.array_equal(rgb_to_ids(ids_to_rgb(ids.astype(np.uint32))), ids)


@pytest.mark.parametrize("bad", [-1, 256 ** 3])
def test_ids_outside_24_bits_are_refused(bad):
    with pytest.raises(ValueError, match="segment ids must be in"):
        ids_to_rgb(np.array([[bad]]))
