"""Pictures of detections and of the poll (util/draw.py)."""
import torch
from PIL import Image

from util.draw import PALETTE, PANEL_GAP, PollGrid, draw_detections, draw_poll, side_by_side

GREY = (128, 128, 128)


def _detection(category_id=1, bbox=(10.0, 20.0, 30.0, 20.0)):
    return {"category_id": category_id, "category": "circle", "score": 0.9, "bbox": list(bbox)}


def test_detection_box_is_drawn_in_its_category_colour_where_it_lies():
    picture = draw_detections(Image.new("RGB", (80, 60), GREY), [_detection()])
    assert picture.size == (80, 60)
    assert picture.getpixel((25, 40)) == PALETTE[1]      # bottom edge of the box
    assert picture.getpixel((70, 50)) == GREY            # outside it


def test_detections_scale_with_the_picture():
    picture = draw_detections(Image.new("RGB", (80, 60), GREY), [_detection()], scale=2)
    assert picture.size == (160, 120)
    assert picture.getpixel((50, 80)) == PALETTE[1]      # the same edge, twice as far
    assert picture.getpixel((50, 60)) == GREY            # inside the box, below the label


def test_poll_panel_tints_polled_cells_orange_and_pooled_cells_by_weight():
    grid = PollGrid(polled=torch.tensor([[True, False], [False, False]]),
                    pool_mass=torch.tensor([[0.0, 1.0], [0.0, 0.0]]), cell=(40.0, 40.0))
    picture = draw_poll(Image.new("RGB", (80, 80), (200, 200, 200)), grid)
    red, green, blue = picture.getpixel((20, 30))         # polled cell, below the caption
    assert red > green > blue
    red, green, blue = picture.getpixel((60, 20))         # the pool's whole weight
    assert blue > green > red
    assert picture.getpixel((60, 60)) == (200, 200, 200)  # no weight: left grey


def test_side_by_side_puts_panels_left_to_right_with_a_white_gap():
    left, right = Image.new("RGB", (30, 20), (0, 0, 0)), Image.new("RGB", (40, 25), (0, 0, 255))
    picture = side_by_side([left, right])
    assert picture.size == (30 + PANEL_GAP + 40, 25)
    assert picture.getpixel((29, 0)) == (0, 0, 0)
    assert picture.getpixel((30, 0)) == (255, 255, 255)
    assert picture.getpixel((30 + PANEL_GAP, 24)) == (0, 0, 255)


def test_labels_of_boxes_sharing_a_corner_are_stacked():
    boxes = [_detection(1, (0, 0, 80, 60)), _detection(2, (0, 0, 70, 50))]
    one = draw_detections(Image.new("RGB", (80, 60), GREY), boxes[:1])
    two = draw_detections(Image.new("RGB", (80, 60), GREY), boxes)
    first = [y for y in range(1, 40) if one.getpixel((3, y)) == PALETTE[1]]     # rows of the first label
    second = [y for y in range(1, 40) if two.getpixel((3, y)) == PALETTE[2]]
    assert first and all(two.getpixel((3, y)) == PALETTE[1] for y in first)    # the first label stays
    assert second and min(second) > max(first)                                # the second goes below it
