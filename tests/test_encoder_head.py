"""Co-DETR's dense head on the encoder's tokens (models/encoder_head.py) and its loss."""
import math

import torch
import torch.nn.functional as F

from models.detr import SetCriterion
from models.encoder_head import (REFERENCE_CELLS, EncoderHead, EncoderPredictions, cell_box_index, decoded_boxes,
                                 reference_boxes)
from models.pnp import PollAndPoolSampler


def _target(boxes_xyxy, labels, size=(32, 32)):
    """Normalised cx, cy, w, h target of pixel xyxy boxes in an image of ``size`` (H, W)."""
    h, w = size
    b = torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4)
    cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                          (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], -1)
    return {"boxes": cxcywh, "labels": torch.tensor(labels, dtype=torch.int64), "size": torch.tensor(size)}


# 4x4 cells of 8 px (centres at 4, 12, 20, 28): box 0 over the left half, box 1 inside it around the
# cell (row 1, col 0); the last column is padding.
TARGET = _target([[0, 0, 16, 32], [0, 8, 8, 16]], [2, 5])
MASK = torch.zeros(1, 4, 4, dtype=torch.bool)
MASK[:, :, 3] = True


def test_each_cell_is_given_the_smallest_box_holding_its_centre():
    expected = torch.tensor([[0, 0, -1, -1],
                             [1, 0, -1, -1],
                             [0, 0, -1, -1],
                             [0, 0, -1, -1]])
    assert torch.equal(cell_box_index([TARGET], MASK, stride=8)[0], expected)


def test_an_image_without_boxes_gives_no_cell_a_box():
    index = cell_box_index([_target([], [])], torch.zeros(1, 2, 3, dtype=torch.bool), stride=16)
    assert torch.equal(index, torch.full((1, 2, 3), -1))


def test_reference_box_is_centred_on_its_cell_in_the_unpadded_image():
    # cell (row 1, col 2) of a map 3 cells wide, stride 8, image 40 px high and 20 px wide
    reference = reference_boxes(torch.tensor([[1 * 3 + 2]]), width=3, stride=8, image_sizes=torch.tensor([[40, 20]]))
    cx, cy = 2.5 * 8 / 20, 1.5 * 8 / 40
    expected = torch.tensor([[[min(cx, 0.99), cy, 0.99, REFERENCE_CELLS * 8 / 40]]])
    torch.testing.assert_close(reference, expected)


def test_zero_deltas_decode_to_the_reference_box():
    reference = torch.tensor([[[0.3, 0.6, 0.2, 0.4]]])
    torch.testing.assert_close(decoded_boxes(torch.zeros(1, 1, 4), reference), reference)


def test_without_a_sampler_every_position_is_a_token_and_padding_is_invalid():
    torch.manual_seed(0)
    head = EncoderHead(16, num_classes=3, stride=8)
    memory = torch.randn(1, 16, 16)
    out = head(memory, None, MASK)
    assert out.logits.shape == (1, 16, 3) and out.deltas.shape == (1, 16, 4)
    assert torch.equal(out.cell[0], torch.arange(16))
    assert torch.equal(out.valid, ~MASK.flatten(1))
    assert torch.equal(out.deltas, torch.zeros(1, 16, 4)), "the box head starts at the reference boxes"
    torch.testing.assert_close(head.class_embed.bias.sigmoid(), torch.full((3,), 0.01)), "the focal-loss prior"


def test_with_a_sampler_the_tokens_are_the_fine_ones_at_their_polled_cells():
    torch.manual_seed(0)
    sampler = PollAndPoolSampler(16, num_coarse=2)
    features, mask = torch.randn(2, 16, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[1, :, 2:] = True                                     # image 1: 8 valid cells, 4 polled, 2 padded slots
    sampled = sampler(features, mask, ratio=0.5)
    memory = torch.randn(2, sampled.tokens.shape[1], 16)
    head = EncoderHead(16, num_classes=3, stride=8)
    out = head(memory, sampled, mask)
    assert out.logits.shape == (2, 8, 3)
    torch.testing.assert_close(out.logits, head.class_embed(memory[:, :8]))
    assert torch.equal(out.cell, sampled.poll_index)
    assert out.valid.sum(1).tolist() == [8, 4]
    assert not mask.flatten(1).gather(1, out.cell)[out.valid].any(), "valid tokens sit on unpadded cells"


def _predictions(logits, deltas, cell, valid=None, mask=MASK, stride=8):
    valid = torch.ones(cell.shape, dtype=torch.bool) if valid is None else valid
    return EncoderPredictions(logits=logits, deltas=deltas, cell=cell, valid=valid, mask=mask, stride=stride)


def test_loss_hand_case_focal_on_every_valid_token_boxes_on_those_with_a_box():
    cells = torch.tensor([[4, 1, 2, 3]])                 # box 1, box 0, no box, padding
    valid = torch.tensor([[True, True, True, False]])
    logits = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(0))
    deltas = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(1))
    losses = SetCriterion.loss_encoder(_predictions(logits, deltas, cells, valid), [TARGET])
    classes = torch.zeros(3, 6)
    classes[0, 5] = classes[1, 2] = 1
    p = logits[0, :3].sigmoid()
    p_t = p * classes + (1 - p) * (1 - classes)
    alpha_t = 0.25 * classes + 0.75 * (1 - classes)
    focal = (alpha_t * -torch.log(p_t) * (1 - p_t) ** 2).sum()
    torch.testing.assert_close(losses["loss_ce_enc"], focal / 2)
    reference = reference_boxes(cells[:, :2], 4, 8, torch.tensor([[32, 32]]))
    pred = decoded_boxes(deltas[:, :2], reference)[0]
    target = TARGET["boxes"][[1, 0]]
    torch.testing.assert_close(losses["loss_bbox_enc"], F.l1_loss(pred, target, reduction="sum") / 2)
    assert 0 < losses["loss_giou_enc"] < 2


def test_boxes_decoded_to_their_targets_have_zero_box_losses():
    cells = torch.tensor([[4, 1]])
    reference = reference_boxes(cells, 4, 8, torch.tensor([[32, 32]]))
    deltas = torch.logit(TARGET["boxes"][[1, 0]][None]) - torch.logit(reference)
    losses = SetCriterion.loss_encoder(_predictions(torch.zeros(1, 2, 6), deltas, cells), [TARGET])
    assert losses["loss_bbox_enc"] < 1e-5 and losses["loss_giou_enc"] < 1e-5


def test_images_without_boxes_give_a_finite_background_loss_and_no_box_loss():
    logits = torch.zeros(1, 3, 6, requires_grad=True)
    deltas = torch.zeros(1, 3, 4, requires_grad=True)
    losses = SetCriterion.loss_encoder(_predictions(logits, deltas, torch.tensor([[0, 1, 2]])), [_target([], [])])
    assert losses["loss_bbox_enc"].item() == 0 and losses["loss_giou_enc"].item() == 0
    assert math.isfinite(losses["loss_ce_enc"].item()) and losses["loss_ce_enc"] > 0
    sum(losses.values()).backward()
    assert logits.grad.abs().sum() > 0 and torch.isfinite(deltas.grad).all()
