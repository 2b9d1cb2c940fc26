"""Pictures drawn with PIL: labelled detection boxes, and where the poll looked (``predict.py --draw``)."""
from dataclasses import dataclass
from typing import Any, Optional

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from models.pnp import SampledTokens

# Distinct colours, one per category id (cycled).
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
POLLED = (255, 140, 0)     # orange: fine tokens
POOLED = (30, 144, 255)    # blue: the pool's weight on the other positions
PANEL_GAP = 4              # pixels of white between side-by-side panels


@dataclass
class PollGrid:
    """Where the poll looked in one image, on the valid part of its feature grid (``h x w`` cells).

    polled: ``(h, w)`` bool, the positions that became fine tokens.
    pool_mass: ``(h, w)`` the pool's weight on each position, summed over the ``M`` coarse
        tokens and divided by ``M`` (sums to 1 over the positions left to the pool; 0 on
        polled positions, and everywhere when the pool is empty, i.e. ratio 1).
    cell: ``(height, width)`` of one feature cell in pixels of the original image.
    """

    polled: Tensor
    pool_mass: Tensor
    cell: tuple[float, float]


def poll_maps(sampled: SampledTokens, num_positions: int) -> tuple[Tensor, Tensor]:
    """Per image, on the CPU: ``(B, L)`` bool, the positions polled as fine tokens, and ``(B, L)``
    the pool's weight on each position, summed over the ``M`` coarse tokens and divided by ``M``."""
    batch = sampled.poll_index.shape[0]
    polled = torch.zeros(batch, num_positions, dtype=torch.bool, device=sampled.poll_index.device)
    fine_pad = torch.arange(sampled.num_fine, device=polled.device)[None] >= sampled.num_polled[:, None]
    polled.scatter_(1, sampled.poll_index, ~fine_pad)
    mass = sampled.pool_weights.float().sum(1) / sampled.pool_weights.shape[1]
    return polled.cpu(), mass.cpu()


def _font(scale: float) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(10, round(6 * scale)))


def _scaled(image: Image.Image, scale: float) -> Image.Image:
    if scale == 1:
        return image.convert("RGB")
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.Resampling.BICUBIC)


def _caption(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: tuple[int, int, int],
             font: ImageFont.ImageFont, taken: Optional[list[tuple[float, float, float, float]]] = None) -> None:
    """``text`` on a ``colour`` box whose top-left corner is ``xy``, moved down below
    every box of ``taken`` it would cover (then added to ``taken``)."""
    x, y = xy
    left, top, right, bottom = draw.textbbox((x, y), text, font=font)
    for other in sorted(taken or [], key=lambda box: box[1]):
        if left < other[2] and other[0] < right and top < other[3] and other[1] < bottom:
            y += other[3] + 1 - (top - 1)  # padded top just below the padded bottom
            left, top, right, bottom = draw.textbbox((x, y), text, font=font)
    if taken is not None:
        taken.append((left - 1, top - 1, right + 1, bottom + 1))
    draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
    red, green, blue = colour
    dark_text = 0.299 * red + 0.587 * green + 0.114 * blue > 150  # readable on light colours
    draw.text((x, y), text, fill=(0, 0, 0) if dark_text else (255, 255, 255), font=font)


def draw_detections(image: Image.Image, detections: list[dict[str, Any]], scale: float = 1.0) -> Image.Image:
    """A copy of ``image``, enlarged ``scale`` times, with each detection's box and label.

    A detection is a dict with ``bbox`` ``[x, y, width, height]`` in pixels of ``image``,
    ``category_id``, ``category`` (its name) and ``score``; the label reads ``"name 0.93"``,
    inside the box's top-left corner, or below the labels drawn before it that are there.
    """
    canvas = _scaled(image, scale)
    draw = ImageDraw.Draw(canvas)
    font = _font(scale)
    width = max(1, round(scale))
    labels: list[tuple[float, float, float, float]] = []
    for det in detections:
        x, y, w, h = (v * scale for v in det["bbox"])
        colour = PALETTE[det["category_id"] % len(PALETTE)]
        draw.rectangle((x, y, x + w, y + h), outline=colour, width=width)
        _caption(draw, (x + width, y + width), f"{det['category']} {det['score']:.2f}", colour, font, labels)
    return canvas


def draw_poll(image: Image.Image, grid: PollGrid, scale: float = 1.0) -> Image.Image:
    """``image`` in grey, enlarged ``scale`` times, with the poll drawn on its feature cells.

    Polled cells are tinted and outlined orange; every other cell is tinted blue, as opaque as
    its share of the pool's weight relative to the most weighted cell. A caption counts the
    polled cells.
    """
    base = _scaled(image, scale).convert("L").convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    cell_h, cell_w = grid.cell[0] * scale, grid.cell[1] * scale
    top_mass = float(grid.pool_mass.max())
    outline = max(1, round(scale))
    for row, (polled_row, mass_row) in enumerate(zip(grid.polled.tolist(), grid.pool_mass.tolist())):
        for col, (polled, mass) in enumerate(zip(polled_row, mass_row)):
            box = (col * cell_w, row * cell_h, min((col + 1) * cell_w, base.width) - 1,
                   min((row + 1) * cell_h, base.height) - 1)
            if polled:
                draw.rectangle(box, fill=(*POLLED, 90), outline=(*POLLED, 255), width=outline)
            elif top_mass > 0:
                draw.rectangle(box, fill=(*POOLED, round(200 * mass / top_mass)))
    canvas = Image.alpha_composite(base, overlay).convert("RGB")
    caption = f"polled {int(grid.polled.sum())}/{grid.polled.numel()}"
    _caption(ImageDraw.Draw(canvas), (outline, outline), caption, POLLED, _font(scale))
    return canvas


def side_by_side(panels: list[Image.Image]) -> Image.Image:
    """The panels left to right on white, ``PANEL_GAP`` pixels apart, top-aligned."""
    width = sum(p.width for p in panels) + PANEL_GAP * (len(panels) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in panels)), (255, 255, 255))
    left = 0
    for panel in panels:
        canvas.paste(panel, (left, 0))
        left += panel.width + PANEL_GAP
    return canvas
