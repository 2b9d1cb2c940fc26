"""The segmentation model (models/segmentation.py): memory back on the grid, mask head, losses,
post-processing, the frozen detector, and the two-stage recipe through main.py."""
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import main
from conftest import HostWaits
from models.detr import build as build_detector
from models.pnp import PollAndPoolSampler, SampledTokens
from models.segmentation import (GridMemory, PostProcessPanoptic, PostProcessSegm, build, dice_loss,
                                 load_frozen_detector, sigmoid_focal_loss)
from util.checkpoint import load_model_weights
from util.errors import UserError
from util.misc import nested_tensor_from_tensor_list

NUM_CLASSES, NUM_QUERIES = 5, 4


def tiny_args(*extra: str):
    return main.parse_args(["--backbone", "resnet18", "--backbone_weights", "none", "--backbone_last_stage", "3",
                            "--num_classes", str(NUM_CLASSES), "--hidden_dim", "32", "--nheads", "4",
                            "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64",
                            "--num_queries", str(NUM_QUERIES), "--unsample_abstract_number", "3",
                            "--device", "cpu", "--masks", *extra])


def _ln(v: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine over the last dimension, written out."""
    mean = v.mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(((v - mean) ** 2).mean(-1, keepdim=True) + 1e-5)


def _sampled(poll_index, num_polled, num_coarse, length) -> SampledTokens:
    """SampledTokens carrying what GridMemory reads (poll_index, num_polled); the rest is filler."""
    batch, num_fine = poll_index.shape
    return SampledTokens(tokens=torch.zeros(batch, num_fine + num_coarse, 1), pos=torch.zeros(batch, 1, 1),
                         key_padding_mask=torch.zeros(batch, num_fine + num_coarse, dtype=torch.bool),
                         poll_index=poll_index, num_polled=num_polled,
                         pool_weights=torch.zeros(batch, num_coarse, length), scores=torch.zeros(batch, length),
                         sample_reg_loss=torch.zeros(()))


# ----------------------------------------------------------------------------- grid memory
def test_grid_memory_hand_computed_case():
    # Two 2x3 images (positions 0..5 row-major), C = 2, M = 2. Image 1 pads its last column
    # (positions 2 and 5) and polls one position: its second fine slot is padding and points
    # at position 1, which was NOT polled and must get the coarse mixture.
    grid_memory = GridMemory(dim=2, num_coarse=2)
    with torch.no_grad():  # every position mixes the coarse memories 1/4 : 3/4
        grid_memory.unpool_proj.weight.zero_()
        grid_memory.unpool_proj.bias.copy_(torch.tensor([0.0, math.log(3.0)]))
    memory = torch.arange(16, dtype=torch.float32).view(2, 4, 2) + 1     # slots: fine, fine, coarse, coarse
    sampled = _sampled(torch.tensor([[4, 0], [3, 1]]), torch.tensor([2, 1]), num_coarse=2, length=6)
    mask = torch.zeros(2, 2, 3, dtype=torch.bool)
    mask[1, :, 2] = True
    grid = grid_memory(memory, sampled, torch.randn(2, 2, 2, 3), mask).flatten(2).transpose(1, 2)  # (B, L, C)

    mix = 0.25 * memory[:, 2] + 0.75 * memory[:, 3]                      # (B, C)
    expected = mix[:, None].repeat(1, 6, 1)
    expected[0, 4], expected[0, 0] = memory[0, 0], memory[0, 1]
    expected[1, 3] = memory[1, 0]
    expected[1, [2, 5]] = 0.0
    torch.testing.assert_close(grid, expected)
    # Polled positions hold exactly the fine memory (no arithmetic on the way).
    assert torch.equal(grid[0, 4], memory[0, 0]) and torch.equal(grid[0, 0], memory[0, 1])
    assert torch.equal(grid[1, 3], memory[1, 0])


def test_grid_memory_other_positions_are_convex_combinations_of_the_coarse_memories():
    torch.manual_seed(0)
    dim, num_coarse = 6, 3
    grid_memory = GridMemory(dim, num_coarse)
    x = torch.randn(1, dim, 2, 4)
    memory = torch.randn(1, 2 + num_coarse, dim)
    sampled = _sampled(torch.tensor([[5, 2]]), torch.tensor([2]), num_coarse, length=8)
    grid = grid_memory(memory, sampled, x, torch.zeros(1, 2, 4, dtype=torch.bool)).flatten(2).transpose(1, 2)[0]

    features = _ln(x.flatten(2).transpose(1, 2)[0])                      # (L, C): the sampler's LN(x)
    weights = (features @ grid_memory.unpool_proj.weight.T + grid_memory.unpool_proj.bias).softmax(-1)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(8))
    others = [p for p in range(8) if p not in (5, 2)]
    torch.testing.assert_close(grid[others], weights[others] @ memory[0, 2:], atol=1e-6, rtol=1e-5)
    # Changing the fine memory leaves the other positions alone.
    changed = memory.clone()
    changed[0, :2] += 100
    grid2 = grid_memory(changed, sampled, x, torch.zeros(1, 2, 4, dtype=torch.bool)).flatten(2).transpose(1, 2)[0]
    assert torch.equal(grid2[others], grid[others])


def test_grid_memory_puts_a_real_samplers_fine_tokens_back_where_they_were_polled():
    torch.manual_seed(1)
    dim, num_coarse = 8, 3
    sampler = PollAndPoolSampler(dim, num_coarse)
    x, pos = torch.randn(2, dim, 4, 5), torch.randn(2, dim, 4, 5)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, 2:] = True                                                    # image 1: 10 valid positions
    sampled = sampler(x, mask, pos, ratio=0.4)                           # N_b = 8 and 4
    memory = torch.randn(2, sampled.num_fine + num_coarse, dim)
    grid = GridMemory(dim, num_coarse)(memory, sampled, x, mask).flatten(2).transpose(1, 2)
    for b in range(2):
        polled = sampled.poll_index[b, : sampled.num_polled[b]].tolist()
        for slot, position in enumerate(polled):
            assert torch.equal(grid[b, position], memory[b, slot])
        rest = [p for p in range(20) if p not in polled]
        assert not any(torch.equal(grid[b, p], memory[b, s]) for p in rest for s in range(sampled.num_fine))
    assert (grid[1, 10:] == 0).all()                                     # padding


def test_grid_memory_gradients_reach_the_projection_and_both_memories():
    grid_memory = GridMemory(dim=4, num_coarse=2)
    memory = torch.randn(1, 3, 4, requires_grad=True)
    sampled = _sampled(torch.tensor([[1]]), torch.tensor([1]), num_coarse=2, length=4)
    grid_memory(memory, sampled, torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool)).square().sum().backward()
    assert memory.grad[0, 0].abs().sum() > 0 and memory.grad[0, 1:].abs().sum() > 0
    assert grid_memory.unpool_proj.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the model
DETR_PANOPTIC_HEAD_KEYS = (
    {f"bbox_attention.{n}.{p}" for n in ("q_linear", "k_linear") for p in ("weight", "bias")}
    | {f"mask_head.{n}.{p}" for n in [f"lay{i}" for i in range(1, 6)] + [f"gn{i}" for i in range(1, 6)]
       + ["out_lay", "adapter1", "adapter2", "adapter3"] for p in ("weight", "bias")})


def test_state_dict_keys_are_detrs_panoptic_keys():
    torch.manual_seed(0)
    model, _, _ = build(tiny_args("--no_pnp"))
    detector, _, _ = build_detector(tiny_args("--no_pnp"))
    keys = set(model.state_dict())
    assert keys == {f"detr.{k}" for k in detector.state_dict()} | DETR_PANOPTIC_HEAD_KEYS
    model.detr.load_state_dict(detector.state_dict())                   # strict: a detector fits `detr`
    pnp_keys = set(build(tiny_args())[0].state_dict())
    assert {k for k in pnp_keys if not k.startswith("detr.")} == DETR_PANOPTIC_HEAD_KEYS | {
        "grid_memory.unpool_proj.weight", "grid_memory.unpool_proj.bias"}


@pytest.mark.parametrize("extra", [(), ("--no_pnp",)])
def test_forward_adds_stride_4_masks(extra):
    torch.manual_seed(0)
    model = build(tiny_args(*extra))[0].eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 48), torch.rand(3, 50, 64)], 0.5)
    assert out["pred_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES + 1)
    assert out["pred_masks"].shape == (2, NUM_QUERIES, 16, 16)
    assert torch.isfinite(out["pred_masks"]).all()


@pytest.mark.parametrize("flag,extra_terms,term", [("--query_groups", "group_outputs", "loss_bbox_group1"),
                                                   ("--dn_groups", "dn_outputs", "loss_bbox_dn"),
                                                   ("--encoder_head", "encoder_outputs", "loss_bbox_enc")])
def test_accelerators_train_masks_of_the_matching_queries_only(flag, extra_terms, term):
    torch.manual_seed(0)
    model, criterion, _ = build(tiny_args(flag, "2", "--dropout", "0"))
    images = [torch.rand(3, 64, 48), torch.rand(3, 50, 64)]
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 8:40, 8:40] = True
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]]), "masks": masks,
                "size": torch.tensor(image.shape[1:])} for image in images]
    out = model.train()(images, 0.5, targets)
    assert out["pred_masks"].shape == (2, NUM_QUERIES, 16, 16)
    extra = out[extra_terms][0] if flag == "--query_groups" else out[extra_terms]
    assert not isinstance(extra, dict) or "pred_masks" not in extra
    losses = criterion(out, targets)
    assert "loss_mask" in losses and term in losses
    assert not any(k.startswith(("loss_mask_", "loss_dice_")) for k in losses)
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        evaluated = model.eval()(images, 0.5, targets)
    assert extra_terms not in evaluated and evaluated["pred_masks"].shape == (2, NUM_QUERIES, 16, 16)


def test_detr_mask_head_checkpoint_loads_into_pnp_with_the_sampler_and_grid_memory_fresh():
    torch.manual_seed(0)
    detr = build(tiny_args("--no_pnp"))[0]
    torch.manual_seed(1)
    pnp = build(tiny_args())[0]
    fresh = {k: v.clone() for k, v in pnp.state_dict().items() if "sampler." in k or k.startswith("grid_memory.")}
    assert any(k.startswith("grid_memory.") for k in fresh) and any(k.startswith("detr.transformer.sampler.") for k in fresh)
    notes = load_model_weights(pnp, detr.state_dict(), "detr_panoptic.pth")
    assert len(notes) == 1 and "detr_panoptic.pth" in notes[0] and "sampler starts fresh" in notes[0]
    for key, value in pnp.state_dict().items():
        expected = fresh[key] if key in fresh else detr.state_dict()[key]
        assert torch.equal(value, expected), key


def test_forward_never_waits_for_the_device():
    model = build(tiny_args())[0].to("meta").train()        # meta stands in for a GPU: no values
    samples = nested_tensor_from_tensor_list([torch.rand(3, 64, 48), torch.rand(3, 50, 64)]).to("meta")
    with HostWaits() as waits:
        out = model(samples, 0.5)
    assert waits.found == []
    assert out["pred_masks"].shape == (2, NUM_QUERIES, 16, 16)


def test_retrofit_pnp_on_a_plain_panoptic_models_weights_is_that_model_at_ratio_one():
    """Every valid position is polled at r = 1, so the memory grid is the plain encoder's memory."""
    torch.manual_seed(0)
    plain = build(tiny_args("--no_pnp", "--dropout", "0.0"))[0].eval()
    pnp = build(tiny_args("--retrofit", "--dropout", "0.0"))[0].eval()
    fresh = pnp.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert all(k.startswith(("detr.transformer.sampler.", "grid_memory.")) for k in fresh)
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 80, generator=gen), torch.rand(3, 72, 48, generator=gen)]  # one padded
    with torch.no_grad():
        expected, out = plain(images), pnp(images, 1.0)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(out[key], expected[key], atol=1e-5, rtol=1e-5)


def test_backbone_ending_at_stage_2_gives_a_two_level_mask_head():
    torch.manual_seed(0)
    model = build(tiny_args("--backbone_last_stage", "2"))[0].eval()
    head_keys = {k for k in model.state_dict() if k.startswith("mask_head.adapter")}
    assert head_keys == {f"mask_head.adapter{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert model.mask_head.adapter1.in_channels == 128 and model.mask_head.adapter2.in_channels == 64
    with torch.no_grad():
        out = model([torch.rand(3, 64, 48), torch.rand(3, 50, 64)], 0.5)
    assert out["pred_masks"].shape == (2, NUM_QUERIES, 16, 16)             # stride 4 still
    assert torch.isfinite(out["pred_masks"]).all()


def test_mask_head_checks_the_number_of_fpn_levels():
    model = build(tiny_args())[0]
    features = torch.rand(1, 32, 2, 2)
    bbox_mask = torch.rand(1, NUM_QUERIES, 4, 2, 2)
    with pytest.raises(ValueError, match="3 FPN levels, got 2"):
        model.mask_head(features, bbox_mask, [torch.rand(1, 128, 4, 4), torch.rand(1, 64, 8, 8)])


def _saved_detector(tmp_path, *extra: str):
    """A tiny detector and the path of a checkpoint holding it."""
    torch.manual_seed(0)
    detector = build_detector(tiny_args(*extra))[0]
    path = tmp_path / "detector.pth"
    torch.save({"model": detector.state_dict()}, path)
    return detector, path


def test_frozen_detector_gets_no_gradient_and_stays_in_eval_mode(tmp_path):
    detector, path = _saved_detector(tmp_path)
    model = build(tiny_args("--frozen_weights", str(path)))[0]
    load_frozen_detector(model, str(path))
    for key, value in detector.state_dict().items():
        assert torch.equal(model.detr.state_dict()[key], value), key
    assert not any(p.requires_grad for p in model.detr.parameters())
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"bbox_attention", "mask_head", "grid_memory"}
    model.train()
    assert not model.detr.training and not model.detr.backbone.training and model.mask_head.training


def test_frozen_detector_starts_unpool_proj_from_the_pools_k_proj(tmp_path):
    detector, path = _saved_detector(tmp_path)
    model = build(tiny_args("--frozen_weights", str(path)))[0]
    assert not torch.equal(model.grid_memory.unpool_proj.weight, detector.transformer.sampler.k_proj.weight)
    load_frozen_detector(model, str(path))
    assert torch.equal(model.grid_memory.unpool_proj.weight, detector.transformer.sampler.k_proj.weight)
    assert torch.equal(model.grid_memory.unpool_proj.bias, detector.transformer.sampler.k_proj.bias)
    assert model.grid_memory.unpool_proj.weight.requires_grad                # still a parameter of its own


def test_frozen_detector_must_be_complete(tmp_path):
    _, path = _saved_detector(tmp_path, "--no_pnp")
    model = build(tiny_args("--frozen_weights", str(path)))[0]
    with pytest.raises(UserError, match="--frozen_weights.*sampler"):
        load_frozen_detector(model, str(path))
    with pytest.raises(UserError, match="--frozen_weights: .*missing.pth does not exist"):
        load_frozen_detector(model, str(tmp_path / "missing.pth"))


# ----------------------------------------------------------------------------- losses
def test_dice_loss_known_values():
    logits = torch.zeros(2, 4)                                            # p = 1/2 everywhere
    targets = torch.tensor([[1.0, 0, 1, 1], [0, 0, 0, 0]])
    # mask 0: 1 - (2 * 1.5 + 1) / (2 + 3 + 1) = 1/3; mask 1: 1 - 1 / (2 + 0 + 1) = 2/3
    torch.testing.assert_close(dice_loss(logits, targets, 2), torch.tensor(0.5))
    perfect = torch.tensor([[30.0, -30, 30, 30]])
    assert dice_loss(perfect, targets[:1], 1) < 1e-6


def test_sigmoid_focal_loss_known_values():
    logits = torch.zeros(1, 2)
    targets = torch.tensor([[1.0, 0.0]])
    # p_t = 1/2, (1 - p_t)^2 = 1/4, BCE = ln 2; alpha_t = 1/4 and 3/4; mean over the 2 pixels.
    expected = (0.25 + 0.75) / 2 * 0.25 * math.log(2)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, 1), torch.tensor(expected))
    torch.testing.assert_close(sigmoid_focal_loss(logits.repeat(3, 1), targets.repeat(3, 1), 3),
                               torch.tensor(expected))


def test_mask_loss_upsamples_the_matched_query_onto_its_target():
    criterion = build(tiny_args())[1]
    pred_masks = torch.zeros(1, NUM_QUERIES, 2, 2)
    pred_masks[0, 1] = torch.tensor([[10.0, -10.0], [10.0, -10.0]])     # stride-4 logits of an 8x8 image
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    target[0, :, :4] = True                                               # left half
    indices = [(torch.tensor([1]), torch.tensor([0]))]
    losses = criterion.loss_masks({"pred_masks": pred_masks}, [{"masks": target}], indices, torch.tensor(1.0))
    # Bilinear x4 (half-pixel centres) of (10, -10) along a row:
    row = torch.tensor([10, 10, 7.5, 2.5, -2.5, -7.5, -10, -10])
    logits, t = row.repeat(8)[None], target.flatten(1).float()
    p = logits.sigmoid()
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    p_t = p * t + (1 - p) * (1 - t)
    focal = ((0.25 * t + 0.75 * (1 - t)) * (1 - p_t) ** 2 * F.binary_cross_entropy_with_logits(
        logits, t, reduction="none")).mean()
    torch.testing.assert_close(losses["loss_dice"], dice)
    torch.testing.assert_close(losses["loss_mask"], focal)
    assert criterion.loss_masks({"pred_logits": None}, [], [], torch.tensor(1.0)) == {}  # aux outputs


# ----------------------------------------------------------------------------- post-processing
def _decode(png: bytes) -> np.ndarray:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def test_panoptic_post_processing_hand_made_case():
    is_thing_map = {1: True, 2: True, 7: False}                           # 8 classes + no-object (8)
    q = 7
    logits = torch.full((1, q, 9), -10.0)
    for query, label in enumerate([1, 7, 7, 8, 2, 1, 5]):
        logits[0, query, label] = 10.0
    logits[0, 5] = 0.0
    logits[0, 5, 1] = 1.0                   # query 5: class 1 with probability e / (e + 8) < 0.85
    masks = torch.full((1, q, 2, 2), 50.0)  # queries 3, 5, 6 would own everything if kept
    masks[0, 0] = torch.tensor([[5.0, -5], [-5, -5]])                     # thing: top-left
    masks[0, 1] = torch.tensor([[-5.0, 5], [-5, -5]])                     # stuff 7: top-right
    masks[0, 2] = torch.tensor([[-5.0, -5], [5, 5]])                      # stuff 7 again: bottom
    masks[0, 4] = -10.0                                                   # thing 2: owns no pixel
    outputs = {"pred_logits": logits, "pred_masks": masks}
    result = PostProcessPanoptic(is_thing_map)(outputs, torch.tensor([[8, 8]]), torch.tensor([[16, 16]]))[0]

    ids = _decode(result["png_string"])
    expected = np.full((16, 16), 2)
    expected[:8, :8] = 1
    assert (ids == expected).all()
    assert result["segments_info"] == [
        {"id": 1, "category_id": 1, "isthing": True, "area": 64},
        {"id": 2, "category_id": 7, "isthing": False, "area": 192},
    ]


def test_panoptic_post_processing_of_an_image_without_segments_is_void():
    outputs = {"pred_logits": torch.zeros(1, 3, 4), "pred_masks": torch.zeros(1, 3, 2, 3)}
    outputs["pred_logits"][..., -1] = 10.0
    result = PostProcessPanoptic({1: True})(outputs, torch.tensor([[8, 10]]), torch.tensor([[5, 7]]))[0]
    assert result["segments_info"] == []
    assert (_decode(result["png_string"]) == 0).all() and _decode(result["png_string"]).shape == (5, 7)


def test_segm_post_processing_masks_at_the_original_size():
    masks = torch.full((1, 2, 2, 2), -10.0)
    masks[0, 1, 0, 0] = 10.0                                              # top-left 4x4 of an 8x8 input
    results = PostProcessSegm()([{}], {"pred_masks": masks}, torch.tensor([[8, 8]]), torch.tensor([[16, 16]]))
    out = results[0]["masks"]
    assert out.shape == (2, 16, 16) and out.dtype == torch.bool
    assert not out[0].any()
    assert out[1, :5, :5].all() and not out[1, 8:].any() and not out[1, :, 8:].any()  # top-left quarter


# ----------------------------------------------------------------------------- main.py, two stages
def test_two_stage_recipe_through_main(synthetic_panoptic_root, tmp_path):
    from conftest import TINY_FLAGS

    flags = TINY_FLAGS + ["--dataset_file", "coco_panoptic", "--coco_path", synthetic_panoptic_root,
                          "--coco_panoptic_path", synthetic_panoptic_root, "--eval_size", "48"]
    detector, masks = tmp_path / "detector", tmp_path / "masks"
    assert main.run(flags + ["--output_dir", str(detector), "--epochs", "1", "--eval_every", "0",
                             "--eval_ratios", "0.5"]) == 0
    frozen = str(detector / "checkpoint.pth")
    assert main.run(flags + ["--masks", "--frozen_weights", frozen, "--output_dir", str(masks), "--epochs", "1",
                             "--eval_ratios", "0.4", "0.9"]) == 0
    log = json.loads((masks / "log.txt").read_text())
    for ratio in ("0.4", "0.9"):
        for group in ("PQ_all", "PQ_th", "PQ_st"):
            assert set(log[f"test_ratio_{ratio}_{group}"]) == {"pq", "sq", "rq", "n"}
        assert log[f"test_ratio_{ratio}_PQ_th"]["n"] > 0 and log[f"test_ratio_{ratio}_PQ_st"]["n"] > 0
    stage1 = torch.load(frozen, weights_only=True)["model"]
    stage2 = torch.load(masks / "checkpoint.pth", weights_only=True)["model"]
    assert all(torch.equal(v, stage2[f"detr.{k}"]) for k, v in stage1.items())  # BatchNorm statistics too

    # Evaluating (or resuming) a stage-2 run does not need the stage-1 file any more.
    gone = str(tmp_path / "gone.pth")
    assert main.run(flags + ["--masks", "--frozen_weights", gone, "--output_dir", str(masks), "--eval",
                             "--eval_ratios", "0.4"]) == 0
    row = json.loads((masks / "eval.json").read_text())[0]
    assert row["ratio"] == 0.4
    assert {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"} <= set(row)
    assert row["PQ"] == pytest.approx(log["test_ratio_0.4_PQ_all"]["pq"], abs=1e-12)


@pytest.mark.parametrize("name", ["panoptic_pnp_detr_r50_detector", "panoptic_pnp_detr_r50_masks",
                                  "panoptic_demo_detector", "panoptic_demo_masks"])
def test_panoptic_presets_parse(name):
    args = main.parse_args(["--config", f"configs/{name}.yaml"])
    assert args.dataset_file == "coco_panoptic" and args.output_dir
    assert args.masks == name.endswith("_masks") and (args.frozen_weights is not None) == args.masks
