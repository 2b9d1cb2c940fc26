"""Box conversions and overlaps (util/box_ops.py)."""
import torch
import torchvision

from util.box_ops import (box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou,
                          masks_to_boxes, paired_generalized_box_iou)


def test_cxcywh_to_xyxy_hand_case():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [10.0, 20.0, 4.0, 6.0]])
    expected = torch.tensor([[0.4, 0.3, 0.6, 0.7], [8.0, 17.0, 12.0, 23.0]])
    out = box_cxcywh_to_xyxy(boxes)
    assert out.shape == (2, 4)
    torch.testing.assert_close(out, expected)


def test_xyxy_to_cxcywh_hand_case():
    boxes = torch.tensor([[8.0, 17.0, 12.0, 23.0]])
    torch.testing.assert_close(box_xyxy_to_cxcywh(boxes), torch.tensor([[10.0, 20.0, 4.0, 6.0]]))


def test_conversions_round_trip_with_batch_dims():
    torch.manual_seed(0)
    cxcywh = torch.rand(3, 5, 4) * 0.5 + 0.1
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert xyxy.shape == (3, 5, 4)
    assert (xyxy[..., 2:] >= xyxy[..., :2]).all()
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)


def test_box_area():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.5, 2.0]])
    torch.testing.assert_close(box_area(boxes), torch.tensor([6.0, 0.5]))


def test_box_iou_identical_boxes_is_one():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 2.0, 4.0, 7.0]])
    iou, union = box_iou(boxes, boxes)
    assert iou.shape == (2, 2)
    torch.testing.assert_close(iou.diagonal(), torch.ones(2))
    torch.testing.assert_close(union.diagonal(), torch.tensor([4.0, 15.0]))


def test_box_iou_partial_overlap_hand_case():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0]])
    iou, union = box_iou(a, b)
    assert iou.shape == (1, 2) and union.shape == (1, 2)
    # intersection 1, union 4 + 4 - 1 = 7; the second box is disjoint (union 4 + 1).
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 0.0]]))
    torch.testing.assert_close(union, torch.tensor([[7.0, 5.0]]))


def test_generalized_box_iou_identical_is_one():
    boxes = torch.tensor([[0.1, 0.2, 0.4, 0.9], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(generalized_box_iou(boxes, boxes).diagonal(), torch.ones(2))


def test_generalized_box_iou_disjoint_hand_case():
    # A = [0,0,1,1], B = [2,0,3,1]: IoU 0, union 2, enclosing box [0,0,3,1] of area 3.
    # GIoU = 0 - (3 - 2) / 3 = -1/3.
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    giou = generalized_box_iou(a, b)
    assert giou.shape == (1, 1)
    torch.testing.assert_close(giou, torch.tensor([[-1 / 3]]))


def test_generalized_box_iou_overlap_hand_case_and_matrix_shape():
    # A = [0,0,2,2], B = [1,1,3,3]: IoU 1/7, enclosing 9, union 7 -> 1/7 - 2/9 = -5/63.
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 3.0, 3.0]])
    giou = generalized_box_iou(a, b)
    assert giou.shape == (2, 3)
    # [0,0,3,3] contains both: GIoU = IoU = 4/9.
    expected = torch.tensor([[-5 / 63, 1.0, 4 / 9], [1.0, -5 / 63, 4 / 9]])
    torch.testing.assert_close(giou, expected)


def test_generalized_box_iou_matches_torchvision():
    torch.manual_seed(1)
    a = box_cxcywh_to_xyxy(torch.rand(4, 4) * 0.5 + 0.1)
    b = box_cxcywh_to_xyxy(torch.rand(3, 4) * 0.5 + 0.1)
    torch.testing.assert_close(generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b))


def test_paired_generalized_box_iou_is_the_diagonal_of_the_matrix_with_batch_dims():
    torch.manual_seed(2)
    a = box_cxcywh_to_xyxy(torch.rand(2, 3, 4) * 0.5 + 0.1)
    b = box_cxcywh_to_xyxy(torch.rand(2, 3, 4) * 0.5 + 0.1)
    b[0, 0] = torch.tensor([0.9, 0.9, 1.0, 1.0])       # disjoint from its counterpart: negative
    paired = paired_generalized_box_iou(a, b)
    assert paired.shape == (2, 3) and paired[0, 0] < 0
    expected = torch.diag(generalized_box_iou(a.reshape(6, 4), b.reshape(6, 4))).reshape(2, 3)
    torch.testing.assert_close(paired, expected)


def test_masks_to_boxes_hand_masks_with_empty_mask():
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1:4, 2:5] = True      # rows 1..3, cols 2..4
    masks[0, 2, 2] = False         # a hole does not change the box
    masks[1, 4, 0] = True          # a single pixel
    # masks[2] stays empty
    boxes = masks_to_boxes(masks)
    assert boxes.shape == (3, 4)
    expected = torch.tensor([[2.0, 1.0, 4.0, 3.0], [0.0, 4.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(boxes, expected)


def test_masks_to_boxes_accepts_uint8_and_matches_torchvision():
    torch.manual_seed(2)
    masks = (torch.rand(4, 7, 9) > 0.7).to(torch.uint8)
    masks[:, 3, 4] = 1  # none empty
    torch.testing.assert_close(masks_to_boxes(masks), torchvision.ops.masks_to_boxes(masks.bool()))


def test_masks_to_boxes_no_masks():
    boxes = masks_to_boxes(torch.zeros(0, 4, 4, dtype=torch.bool))
    assert boxes.shape == (0, 4)
