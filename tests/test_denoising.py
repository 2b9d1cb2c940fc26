"""models/denoising.py: DN-DETR's denoising queries (``--dn_groups``)."""
import math

import pytest
import torch

from models.denoising import DenoisingQueries, box_sine_embedding, noised_boxes

TARGETS = [{"labels": torch.tensor([1, 2, 3]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2], [0.5, 0.2, 0.2, 0.1]])},
           {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
EMPTY = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2


def test_box_sine_embedding_holds_each_coordinates_sines_then_cosines():
    boxes = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    embedding = box_sine_embedding(boxes, dim=4, temperature=100.0)
    assert embedding.shape == (1, 16)
    # Coordinate 2 (w = 0.3): frequencies 2 pi / 100^0 and 2 pi / 100^(2/4) = 2 pi / 10.
    angles = torch.tensor([0.3 * 2 * math.pi, 0.3 * 2 * math.pi / 10])
    torch.testing.assert_close(embedding[0, 8:12], torch.cat([angles.sin(), angles.cos()]))


def test_zero_box_noise_keeps_the_boxes():
    boxes = torch.rand(5, 4)
    assert torch.equal(noised_boxes(boxes, 0.0), boxes)


def test_box_noise_moves_centres_by_at_most_half_its_scale_and_scales_sizes_within_it():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.1]]).repeat(1000, 1)    # far from the border: no clamping
    noised = noised_boxes(boxes, 0.4)
    shift = (noised[:, :2] - boxes[:, :2]).abs() / boxes[:, 2:]
    scale = noised[:, 2:] / boxes[:, 2:]
    assert shift.max() <= 0.2 + 1e-6 and shift.max() > 0.18
    assert scale.min() >= 0.6 - 1e-6 and scale.max() <= 1.4 + 1e-6
    assert scale.min() < 0.62 and scale.max() > 1.38


def test_noised_boxes_stay_in_the_image():
    torch.manual_seed(0)
    noised = noised_boxes(torch.tensor([[0.02, 0.98, 0.04, 0.04]]).repeat(100, 1), 1.0)
    assert noised.min() >= 0 and noised.max() <= 1


def test_each_group_holds_every_target_box_once_and_pads_to_the_largest_image():
    queries = DenoisingQueries(num_classes=5, hidden_dim=16, groups=3)
    dn = queries(TARGETS)
    assert (dn.group_size, dn.groups) == (3, 3)
    assert dn.content.shape == dn.pos.shape == (2, 9, 16)
    assert dn.labels.tolist() == [[1, 2, 3] * 3, [4, 0, 0] * 3]
    assert dn.valid.tolist() == [[True] * 9, [True, False, False] * 3]
    for g in range(3):
        assert torch.equal(dn.boxes[0, 3 * g:3 * g + 3], TARGETS[0]["boxes"])
        assert torch.equal(dn.boxes[1, 3 * g], TARGETS[1]["boxes"][0])


def test_images_without_boxes_give_one_padding_slot_per_group():
    dn = DenoisingQueries(num_classes=5, hidden_dim=16, groups=2)(EMPTY)
    assert dn.group_size == 1 and dn.content.shape == (2, 2, 16)
    assert not dn.valid.any()


def test_without_label_noise_the_content_is_the_class_embedding():
    queries = DenoisingQueries(num_classes=5, hidden_dim=16, groups=2, label_noise=0.0)
    dn = queries(TARGETS)
    torch.testing.assert_close(dn.content, queries.label_embed(dn.labels))


def test_label_noise_flips_about_its_share_of_the_classes():
    torch.manual_seed(0)
    queries = DenoisingQueries(num_classes=50, hidden_dim=16, groups=200, label_noise=0.5)
    dn = queries(TARGETS)
    kept = (dn.content == queries.label_embed(dn.labels)).all(-1)[dn.valid].float().mean().item()
    # A flip draws any of the 50 classes, its own too: 0.5 + 0.5 / 50 kept on average.
    assert abs(kept - 0.51) < 0.05


def test_positions_follow_the_noised_boxes():
    queries = DenoisingQueries(num_classes=5, hidden_dim=16, groups=2, box_noise=0.0)
    dn = queries(TARGETS)
    torch.testing.assert_close(dn.pos, queries.box_embed(box_sine_embedding(dn.boxes, 4)))
    noisy = DenoisingQueries(num_classes=5, hidden_dim=16, groups=2, box_noise=0.4)
    noisy.load_state_dict(queries.state_dict())
    assert not torch.allclose(noisy(TARGETS).pos, dn.pos)


def test_hidden_dim_not_divisible_by_8_is_refused():
    with pytest.raises(ValueError, match="divisible by 8"):
        DenoisingQueries(num_classes=5, hidden_dim=12, groups=2)
