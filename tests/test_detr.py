"""The detector, its criterion and post-processing (models/detr.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

import main
from models.detr import PostProcess, SetCriterion, build
from models.encoder_head import EncoderPredictions
from models.matcher import HungarianMatcher
from util.checkpoint import load_model_weights
from util.errors import UserError
from conftest import HostWaits
from util.misc import NestedTensor, nested_tensor_from_tensor_list


NUM_CLASSES, NUM_QUERIES, HIDDEN, NUM_COARSE = 5, 7, 32, 4
ATOL = 1e-5


def tiny_args(*extra: str):
    return main.parse_args(["--backbone", "resnet18", "--backbone_weights", "none", "--num_classes", str(NUM_CLASSES),
                            "--hidden_dim", str(HIDDEN), "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2",
                            "--dim_feedforward", "64", "--num_queries", str(NUM_QUERIES),
                            "--unsample_abstract_number", str(NUM_COARSE), "--device", "cpu", *extra])


def tiny_build(*extra: str, seed: int = 0):
    torch.manual_seed(seed)
    return build(tiny_args(*extra))


@pytest.fixture(scope="module")
def pnp():
    """PnP-DETR reading stage 3 (stride 16): a 64x64 image gives a 4x4 map of 16 positions."""
    model, criterion, postprocessors = tiny_build("--backbone_last_stage", "3")
    return model.eval(), criterion, postprocessors


def _images(n=2, size=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=gen) for _ in range(n)]


def _assert_outputs_close(a, b, index_a=slice(None), index_b=slice(None)):
    torch.testing.assert_close(a["pred_logits"][index_a], b["pred_logits"][index_b], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(a["pred_boxes"][index_a], b["pred_boxes"][index_b], atol=ATOL, rtol=ATOL)


# ----------------------------------------------------------------------------- forward
def test_forward_output_shapes(pnp):
    model = pnp[0]
    with torch.no_grad():
        out = model(torch.stack(_images()))
    assert out["pred_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES + 1)
    assert out["pred_boxes"].shape == (2, NUM_QUERIES, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == 1  # dec_layers - 1
    assert out["aux_outputs"][0]["pred_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES + 1)
    assert out["aux_outputs"][0]["pred_boxes"].shape == (2, NUM_QUERIES, 4)
    assert out["sample_reg_loss"].shape == ()
    assert 0 < out["sample_reg_loss"].item() < 1
    # Default ratio 1/3: int(16 / 3) = 5 fine tokens, then 4 coarse tokens.
    assert out["sampled"].tokens.shape == (2, 5 + NUM_COARSE, HIDDEN)


def test_tensor_list_and_nested_tensor_inputs_agree(pnp):
    model = pnp[0]
    images = _images()
    batch = torch.stack(images)
    with torch.no_grad():
        from_tensor = model(batch)
        from_list = model(images)
        from_nested = model(NestedTensor(batch, torch.zeros(2, 64, 64, dtype=torch.bool)))
    _assert_outputs_close(from_list, from_tensor)
    _assert_outputs_close(from_nested, from_tensor)


def test_list_of_different_sizes(pnp):
    model = pnp[0]
    big = _images(1)[0]
    small = torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = model([big, small])
        alone = model(big[None])
    assert mixed["pred_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES + 1)
    assert mixed["pred_boxes"].shape == (2, NUM_QUERIES, 4)
    # The small image is padded to 64x64: 3x3 of its 4x4 positions are valid -> int(9/3) = 3 polled.
    assert mixed["sampled"].num_polled.tolist() == [5, 3]
    # The big image has no padding: same result as on its own.
    _assert_outputs_close(mixed, alone, 0, 0)


@pytest.mark.parametrize("ratio,num_fine", [(0.25, 4), (0.5, 8), (1.0, 16), (None, 5)])
def test_sample_ratio_sets_number_of_fine_tokens(pnp, ratio, num_fine):
    model = pnp[0]
    with torch.no_grad():
        out = model(torch.stack(_images()), sample_ratio=ratio)
    assert out["sampled"].num_fine == num_fine
    assert out["sampled"].tokens.shape == (2, num_fine + NUM_COARSE, HIDDEN)


def test_sample_ratio_changes_predictions(pnp):
    model = pnp[0]
    batch = torch.stack(_images())
    with torch.no_grad():
        low, high = model(batch, sample_ratio=0.25), model(batch, sample_ratio=0.75)
    assert not torch.allclose(low["pred_logits"], high["pred_logits"], atol=1e-4)


def test_extract_features_runs_the_backbone_once_for_every_ratio(pnp):
    model = pnp[0]
    batch = torch.stack(_images())
    backbone_calls, transformer_calls = [], []
    model.backbone.register_forward_hook(lambda *_: backbone_calls.append(1))
    model.transformer.register_forward_hook(lambda *_: transformer_calls.append(1))
    with torch.no_grad():
        features = model.extract_features(batch)
        assert features.src.shape == (2, HIDDEN, 4, 4)
        assert features.pos.shape == (2, HIDDEN, 4, 4)
        assert features.mask.shape == (2, 4, 4)
        for ratio in (0.5, 0.8):
            model.predict(features, ratio)
    assert (len(backbone_calls), len(transformer_calls)) == (1, 2)


# ----------------------------------------------------------------------------- variants and keys
def _padded_batch(device: str) -> NestedTensor:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 80, generator=gen), torch.rand(3, 72, 48, generator=gen)]
    return nested_tensor_from_tensor_list(images).to(device)


@pytest.mark.parametrize("flags", [(), ("--no_pnp",), ("--encoder_head", "1")])
def test_forward_never_waits_for_the_device(flags):
    model = tiny_build(*flags)[0].to("meta").train()       # meta stands in for a GPU: no values
    samples = _padded_batch("meta")
    with HostWaits() as waits:
        out = model(samples, 0.5)
    assert waits.found == []
    assert out["pred_boxes"].shape == (2, NUM_QUERIES, 4)


def test_features_count_the_unpadded_positions_on_the_host(pnp):
    model, _, _ = pnp
    with torch.no_grad():
        features = model.extract_features(_padded_batch("cpu"))
    assert features.num_valid.device.type == "cpu"
    assert features.num_valid.tolist() == (~features.mask).flatten(1).sum(1).tolist()


def test_no_pnp_model_has_no_sampler():
    model, criterion, _ = tiny_build("--no_pnp")
    model.eval()
    assert not model.uses_pnp
    assert not any(k.startswith("transformer.sampler") for k in model.state_dict())
    with torch.no_grad():
        out = model(torch.stack(_images()))
    assert "sample_reg_loss" not in out and "sampled" not in out
    assert out["pred_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES + 1)
    assert "sample_reg_loss" not in criterion.weight_dict
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    assert "sample_reg_loss" not in criterion(out, targets)


def _sampler_keys(model):
    prefix = "transformer.sampler."
    return {k[len(prefix):]: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix)}


@pytest.mark.parametrize("flags,expected", [
    ((), {"score_pred_net.0.weight": (HIDDEN, HIDDEN, 1, 1), "score_pred_net.0.bias": (HIDDEN,),
          "score_pred_net.2.weight": (1, HIDDEN, 1, 1), "score_pred_net.2.bias": (1,),
          "k_proj.weight": (NUM_COARSE, HIDDEN), "k_proj.bias": (NUM_COARSE,),
          "v_proj.weight": (HIDDEN, HIDDEN), "v_proj.bias": (HIDDEN,)}),
    (("--kproj_net", "2layer-fc"),
     {"score_pred_net.0.weight": (HIDDEN, HIDDEN, 1, 1), "score_pred_net.0.bias": (HIDDEN,),
      "score_pred_net.2.weight": (1, HIDDEN, 1, 1), "score_pred_net.2.bias": (1,),
      "k_proj.0.weight": (HIDDEN, HIDDEN), "k_proj.0.bias": (HIDDEN,),
      "k_proj.2.weight": (NUM_COARSE, HIDDEN), "k_proj.2.bias": (NUM_COARSE,),
      "v_proj.weight": (HIDDEN, HIDDEN), "v_proj.bias": (HIDDEN,)}),
    (("--score_pred_net", "1layer-fc"),
     {"score_pred_net.weight": (1, HIDDEN, 1, 1), "score_pred_net.bias": (1,),
      "k_proj.weight": (NUM_COARSE, HIDDEN), "k_proj.bias": (NUM_COARSE,),
      "v_proj.weight": (HIDDEN, HIDDEN), "v_proj.bias": (HIDDEN,)}),
    (("--retrofit",),
     {"score_pred_net.0.weight": (HIDDEN, HIDDEN, 1, 1), "score_pred_net.0.bias": (HIDDEN,),
      "score_pred_net.2.weight": (1, HIDDEN, 1, 1), "score_pred_net.2.bias": (1,),
      "k_proj.weight": (NUM_COARSE, HIDDEN), "k_proj.bias": (NUM_COARSE,)}),
], ids=["default", "kproj-2layer", "score-1layer", "retrofit"])
def test_pnp_sampler_state_dict_keys(flags, expected):
    model, _, _ = tiny_build(*flags)
    assert _sampler_keys(model) == expected


def test_detr_checkpoint_key_layout():
    model, _, _ = tiny_build()
    sd = model.state_dict()
    assert sd["query_embed.weight"].shape == (NUM_QUERIES, HIDDEN)
    assert sd["class_embed.weight"].shape == (NUM_CLASSES + 1, HIDDEN)
    assert sd["input_proj.weight"].shape == (HIDDEN, 512, 1, 1)
    assert [sd[f"bbox_embed.layers.{i}.weight"].shape for i in range(3)] == [(HIDDEN, HIDDEN)] * 2 + [(4, HIDDEN)]
    assert "backbone.0.body.conv1.weight" in sd and "backbone.0.body.layer4.1.conv2.weight" in sd
    assert "transformer.encoder.layers.0.self_attn.in_proj_weight" in sd
    assert "transformer.decoder.layers.1.multihead_attn.out_proj.bias" in sd
    assert "transformer.decoder.norm.weight" in sd
    assert "transformer.encoder.norm.weight" not in sd


# ----------------------------------------------------------------------------- retrofit on DETR weights
# The tiny detector at stride 16, and DETR-R50's shape (random weights) at stride 32; each with two
# image sizes, so that the smaller image is padded.
RETROFIT_CONFIGS = {
    "tiny": (["--backbone", "resnet18", "--backbone_last_stage", "3", "--hidden_dim", str(HIDDEN), "--nheads", "4",
              "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64", "--num_queries", str(NUM_QUERIES),
              "--unsample_abstract_number", str(NUM_COARSE)], [(64, 80), (72, 48)]),
    "r50": (["--backbone", "resnet50"], [(128, 96), (96, 64)]),
}


def _detr_and_pnp_on_its_weights(config: str, *pnp_flags: str):
    """A plain DETR (random weights, eval mode, dropout 0), a PnP-DETR built with ``pnp_flags`` that
    loaded its state_dict, and a padded batch of two images."""
    flags, sizes = RETROFIT_CONFIGS[config]
    common = [*flags, "--backbone_weights", "none", "--num_classes", str(NUM_CLASSES), "--dropout", "0.0",
              "--device", "cpu"]
    torch.manual_seed(0)
    detr = build(main.parse_args([*common, "--no_pnp"]))[0].eval()
    pnp = build(main.parse_args([*common, *pnp_flags]))[0].eval()
    load_model_weights(pnp, detr.state_dict(), "detr.pth")
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=gen) for h, w in sizes]
    return detr, pnp, images


@pytest.mark.parametrize("config", list(RETROFIT_CONFIGS))
def test_retrofit_pnp_detr_on_a_detrs_weights_is_that_detr_at_ratio_one(config):
    detr, pnp, images = _detr_and_pnp_on_its_weights(config, "--retrofit")
    with torch.no_grad():
        expected, out = detr(images), pnp(images, sample_ratio=1.0)
    num_polled = out["sampled"].num_polled.tolist()
    assert num_polled[0] != num_polled[1], "the batch must hold padding"
    _assert_outputs_close(out, expected)
    assert len(out["aux_outputs"]) == len(expected["aux_outputs"]) > 0
    for aux, aux_expected in zip(out["aux_outputs"], expected["aux_outputs"]):
        _assert_outputs_close(aux, aux_expected)


def test_papers_sampler_on_a_detrs_weights_is_not_that_detr_at_ratio_one():
    # Control for the test above: without --retrofit the loaded encoder reads other inputs.
    detr, pnp, images = _detr_and_pnp_on_its_weights("tiny")
    with torch.no_grad():
        expected, out = detr(images), pnp(images, sample_ratio=1.0)
    assert not torch.allclose(out["pred_logits"], expected["pred_logits"], atol=1e-3)


def test_build_rejects_a_missing_class_count():
    args = tiny_args()
    args.num_classes = None
    with pytest.raises(UserError, match="--num_classes"):
        build(args)


def test_weight_dict_from_flags():
    _, criterion, _ = tiny_build("--sample_reg_loss", "0.5", "--bbox_loss_coef", "3", "--giou_loss_coef", "4")
    assert criterion.weight_dict == {"loss_ce": 1.0, "loss_bbox": 3.0, "loss_giou": 4.0,
                                     "loss_ce_0": 1.0, "loss_bbox_0": 3.0, "loss_giou_0": 4.0,
                                     "sample_reg_loss": 0.5}


def test_no_aux_loss_flag():
    model, criterion, _ = tiny_build("--no_aux_loss")
    model.eval()
    with torch.no_grad():
        out = model(torch.stack(_images(1)))
    assert "aux_outputs" not in out
    assert not any(k.endswith("_0") for k in criterion.weight_dict)


# ----------------------------------------------------------------------------- criterion
def _criterion(eos_coef=0.1, losses=("labels", "boxes", "cardinality")):
    weight_dict = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    return SetCriterion(NUM_CLASSES, HungarianMatcher(1, 5, 2), weight_dict, eos_coef, list(losses))


class _FixedMatches(torch.nn.Module):
    """Stands in for the Hungarian matcher, whose solver reads the costs on the host."""

    def forward(self, outputs, targets):
        return [(torch.tensor([0, 2]), torch.tensor([1, 0])), (torch.tensor([3]), torch.tensor([0]))]


def test_host_waits_sees_blocking_copies_and_host_indices():
    on_device, index = torch.zeros(4, device="meta"), torch.tensor([0, 2])
    with HostWaits() as waits:
        index.to("meta", non_blocking=True)
        index.to("meta")
        on_device[index]
    assert [found.split(":")[0] for found in waits.found] == ["aten._to_copy.default", "aten.index.Tensor"]


def test_criterion_waits_for_the_device_only_in_the_matcher():
    criterion = _criterion().to("meta")
    criterion.matcher = _FixedMatches()
    outputs = {"pred_logits": torch.randn(2, 4, NUM_CLASSES + 1, device="meta"),
               "pred_boxes": torch.rand(2, 4, 4, device="meta")}
    outputs["aux_outputs"] = [dict(outputs)]
    outputs["encoder_outputs"] = EncoderPredictions(
        logits=torch.randn(2, 3, NUM_CLASSES, device="meta"), deltas=torch.randn(2, 3, 4, device="meta"),
        cell=torch.zeros(2, 3, dtype=torch.int64, device="meta"), valid=torch.ones(2, 3, dtype=torch.bool, device="meta"),
        mask=torch.zeros(2, 2, 2, dtype=torch.bool, device="meta"), stride=32)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.rand(2, 4), "size": torch.tensor([64, 64])},
               {"labels": torch.tensor([3]), "boxes": torch.rand(1, 4), "size": torch.tensor([64, 48])}]
    targets = [{key: value.to("meta") for key, value in t.items()} for t in targets]
    with HostWaits() as waits:
        losses = criterion(outputs, targets)
    assert waits.found == []
    assert {"loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error", "loss_ce_enc",
            "loss_giou_enc"} <= set(losses)


@pytest.mark.gpu
@pytest.mark.parametrize("flags", [(), ("--encoder_head", "1")])
def test_cuda_forward_and_loss_synchronise_only_in_the_matcher(flags):
    model, criterion, _ = tiny_build(*flags)
    model.cuda().train()
    criterion.cuda()
    targets = [{"labels": torch.tensor([1, 2]).cuda(), "boxes": torch.rand(2, 4).cuda(), "size": torch.tensor([64, 80]).cuda()},
               {"labels": torch.tensor([3]).cuda(), "boxes": torch.rand(1, 4).cuda(), "size": torch.tensor([72, 48]).cuda()}]
    samples = _padded_batch("cuda")
    torch.cuda.synchronize()
    solve = criterion.matcher.forward

    def matcher_allowed_to_wait(outputs, targets):
        torch.cuda.set_sync_debug_mode("default")
        try:
            return solve(outputs, targets)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    criterion.matcher.forward = matcher_allowed_to_wait
    torch.cuda.set_sync_debug_mode("error")     # a synchronising call raises
    try:
        losses = criterion(model(samples, 0.5), targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(v).all() for v in losses.values())


def test_perfect_prediction_has_zero_box_losses_and_no_class_error():
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.1, 0.4]])
    targets = [{"labels": torch.tensor([1, 3]), "boxes": boxes}]
    logits = torch.full((1, 3, NUM_CLASSES + 1), -20.0)
    logits[0, 0, 3] = 20.0              # query 0 predicts target 1
    logits[0, 2, 1] = 20.0              # query 2 predicts target 0
    logits[0, 1, NUM_CLASSES] = 20.0    # query 1 predicts no object
    pred_boxes = torch.stack([boxes[1], torch.tensor([0.5, 0.5, 0.9, 0.9]), boxes[0]])[None]
    losses = _criterion()({"pred_logits": logits, "pred_boxes": pred_boxes}, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["class_error"].item() == 0.0
    assert losses["loss_ce"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["cardinality_error"].item() == 0.0


def test_one_query_one_target_hand_computed_losses():
    # pred (0.5, 0.5, 0.2, 0.2) -> xyxy (0.4, 0.4, 0.6, 0.6)
    # target (0.4, 0.55, 0.3, 0.2) -> xyxy (0.25, 0.45, 0.55, 0.65)
    # L1 = 0.1 + 0.05 + 0.1 + 0 = 0.25
    # inter 0.15 * 0.15 = 0.0225, union 0.04 + 0.06 - 0.0225 = 0.0775 -> IoU 9/31
    # enclosing 0.35 * 0.25 = 0.0875 -> GIoU = 9/31 - 0.01/0.0875 = 9/31 - 4/35 = 191/1085
    logits = torch.tensor([[[0.3, -0.2, 1.0, 0.5, -1.0, 0.1]]])
    outputs = {"pred_logits": logits, "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])}
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.55, 0.3, 0.2]])}]
    losses = _criterion()(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.25, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(1 - 191 / 1085, abs=1e-6)
    expected_ce = -F.log_softmax(logits[0, 0], -1)[2].item()
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, abs=1e-6)
    assert losses["class_error"].item() == 0.0   # argmax is class 2


def test_no_object_class_is_weighted_by_eos_coef():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, NUM_CLASSES + 1, generator=gen)
    box = torch.tensor([0.5, 0.5, 0.2, 0.2])
    outputs = {"pred_logits": logits, "pred_boxes": torch.stack([box, torch.tensor([0.1, 0.1, 0.05, 0.05])])[None]}
    targets = [{"labels": torch.tensor([4]), "boxes": box[None]}]
    losses = _criterion(eos_coef=0.1, losses=("labels",))(outputs, targets)
    logp = F.log_softmax(logits[0], -1)
    expected = (-logp[0, 4] - 0.1 * logp[1, NUM_CLASSES]) / (1 + 0.1)
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert set(losses) == {"loss_ce", "class_error"}


def test_box_losses_are_normalised_by_number_of_targets():
    pred = torch.tensor([[[0.5, 0.5, 0.2, 0.2]], [[0.3, 0.3, 0.2, 0.2]]])
    outputs = {"pred_logits": torch.zeros(2, 1, NUM_CLASSES + 1), "pred_boxes": pred}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.2]])},   # L1 0.1
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.5]])}]   # L1 0.3
    losses = _criterion(losses=("boxes",))(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx((0.1 + 0.3) / 2, abs=1e-6)


def test_images_without_targets_give_finite_losses():
    outputs = {"pred_logits": torch.randn(2, 3, NUM_CLASSES + 1), "pred_boxes": torch.rand(2, 3, 4) * 0.5 + 0.1}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = _criterion()(outputs, targets)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert math.isfinite(losses["loss_ce"].item())


def test_aux_losses_use_suffixes_and_match_the_aux_outputs(pnp):
    model, criterion, _ = pnp
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    with torch.no_grad():
        out = model(torch.stack(_images()))
        losses = criterion(out, targets)
        aux_alone = criterion(out["aux_outputs"][0], targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert f"{name}_0" in losses
        assert f"{name}_1" not in losses
        torch.testing.assert_close(losses[f"{name}_0"], aux_alone[name])
    assert all(k in criterion.weight_dict for k in losses if k.startswith("loss") or k == "sample_reg_loss")


def test_sample_reg_loss_passes_through(pnp):
    model, criterion, _ = pnp
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]])}] * 2
    with torch.no_grad():
        out = model(torch.stack(_images()))
        losses = criterion(out, targets)
    assert losses["sample_reg_loss"].item() == out["sample_reg_loss"].item()
    assert criterion.weight_dict["sample_reg_loss"] == pytest.approx(1e-4)


@pytest.mark.parametrize("flags", [(), ("--retrofit",)])
def test_gradients_reach_the_score_network_through_the_detection_loss(flags):
    model, criterion, _ = tiny_build(*flags, seed=1)
    model.train()
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]])},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.6, 0.5, 0.4, 0.3]])}]
    losses = criterion(model(torch.stack(_images()), sample_ratio=0.5), targets)
    # Leave sample_reg_loss out: the gradient must come through the fine tokens (LN(x) * score, or with
    # --retrofit x + x * (score - detached score)).
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k != "sample_reg_loss")
    total.backward()
    for name in ("score_pred_net.0.weight", "score_pred_net.2.weight"):
        grad = model.transformer.sampler.get_parameter(name).grad
        assert grad is not None, name
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- Group DETR (--query_groups)
GROUP_TARGETS = [{"labels": torch.tensor([1, 2, 3]),
                  "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2], [0.5, 0.2, 0.2, 0.1]])},
                 {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
NO_BOXES = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2


def accelerated_build(flag: str, value: float, *extra: str, seed: int = 0):
    """A tiny PnP-DETR with the accelerator ``flag`` (``--query_groups``, ``--dn_groups``,
    ``--encoder_head``) set to ``value`` and no dropout, in training mode."""
    model, criterion, postprocessors = tiny_build(flag, str(value), "--dropout", "0", *extra, seed=seed)
    return model.train(), criterion, postprocessors


def grouped_build(groups: int, *extra: str, seed: int = 0):
    return accelerated_build("--query_groups", groups, *extra, seed=seed)


def test_training_outputs_hold_every_extra_group_and_eval_outputs_none():
    model, _, _ = grouped_build(3)
    images = torch.stack(_images())
    out = model(images, 0.5)
    assert len(out["group_outputs"]) == 2
    for group in [out, *out["group_outputs"]]:
        assert group["pred_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES + 1)
        assert group["pred_boxes"].shape == (2, NUM_QUERIES, 4)
        assert len(group["aux_outputs"]) == 1
    with torch.no_grad():
        evaluated = model.eval()(images, 0.5)
    assert "group_outputs" not in evaluated and evaluated["pred_logits"].shape[1] == NUM_QUERIES


def test_group_0_in_training_computes_the_model_without_groups():
    plain = tiny_build("--dropout", "0")[0].train()
    grouped, _, _ = grouped_build(2)
    load_model_weights(grouped, plain.state_dict(), "plain.pth")
    images = torch.stack(_images())
    with torch.no_grad():
        _assert_outputs_close(grouped(images, 0.5), plain(images, 0.5))


def test_eval_outputs_with_groups_equal_the_model_without_groups():
    plain = tiny_build()[0].eval()
    grouped = grouped_build(3, seed=1)[0].eval()
    notes = load_model_weights(grouped, plain.state_dict(), "plain.pth")
    assert len(notes) == 1 and "start fresh" in notes[0]
    images = torch.stack(_images())
    with torch.no_grad():
        for ratio in (0.3, 0.8):
            _assert_outputs_close(grouped(images, ratio), plain(images, ratio))


def test_eval_mode_runs_no_extra_query():
    model = grouped_build(2)[0].eval()
    model(torch.stack(_images()), 0.5)["pred_boxes"].sum().backward()
    assert model.extra_query_embed.weight.grad is None
    assert model.query_embed.weight.grad is not None


class _RecordingMatcher(HungarianMatcher):
    """The Hungarian matcher, keeping the number of queries and the matches of every call."""

    def __init__(self):
        super().__init__(1, 5, 2)
        self.calls = []

    def forward(self, outputs, targets):
        indices = super().forward(outputs, targets)
        self.calls.append((outputs["pred_logits"].shape[1], indices))
        return indices


def test_each_group_matches_every_target_exactly_once():
    model, criterion, _ = grouped_build(2)
    criterion.matcher = _RecordingMatcher()
    criterion(model(torch.stack(_images()), 0.5), GROUP_TARGETS)
    assert len(criterion.matcher.calls) == 2 * 2, "2 groups x 2 decoder layers"
    for num_queries, indices in criterion.matcher.calls:
        assert num_queries == NUM_QUERIES, "a group is matched on its own queries"
        for (queries, targets), target in zip(indices, GROUP_TARGETS):
            assert sorted(targets.tolist()) == list(range(len(target["labels"])))
            assert len(set(queries.tolist())) == len(queries)


def test_each_extra_groups_terms_are_its_own_detr_loss():
    model, criterion, _ = grouped_build(3)
    with torch.no_grad():
        out = model(torch.stack(_images()), 0.5)
        losses = criterion(out, GROUP_TARGETS)
        for g, group in enumerate(out["group_outputs"], start=1):
            alone = criterion(group, GROUP_TARGETS)
            for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"):
                torch.testing.assert_close(losses[f"{name}_group{g}"], alone[name])
    assert not torch.allclose(losses["loss_ce_group1"], losses["loss_ce"]), "groups alike would prove nothing"
    assert {k for k in losses if "group" in k} <= set(criterion.weight_dict)


def test_weight_dict_repeats_every_detection_term_per_extra_group():
    _, criterion, _ = tiny_build("--query_groups", "3", "--no_aux_loss")
    assert criterion.weight_dict == {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0,
                                     "loss_ce_group1": 1.0, "loss_bbox_group1": 5.0, "loss_giou_group1": 2.0,
                                     "loss_ce_group2": 1.0, "loss_bbox_group2": 5.0, "loss_giou_group2": 2.0,
                                     "sample_reg_loss": 1e-4}


@pytest.mark.parametrize("flags", [(), ("--no_pnp",)])
def test_grouped_losses_of_images_without_boxes_are_finite_and_reach_every_group(flags):
    model, criterion, _ = grouped_build(2, *flags)
    losses = criterion(model(torch.stack(_images()), 0.5), NO_BOXES)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    assert math.isfinite(total.item())
    total.backward()
    grad = model.extra_query_embed.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ----------------------------------------------------------------------------- DN-DETR (--dn_groups)
def denoising_build(groups: int, *extra: str, seed: int = 0):
    return accelerated_build("--dn_groups", groups, *extra, seed=seed)


def test_training_with_targets_adds_the_denoising_outputs_and_eval_none():
    model, _, _ = denoising_build(2)
    images = torch.stack(_images())
    out = model(images, 0.5, GROUP_TARGETS)
    dn = out["dn_outputs"]
    assert dn["pred_logits"].shape == (2, 2 * 3, NUM_CLASSES + 1) and dn["pred_boxes"].shape == (2, 6, 4)
    assert len(dn["aux_outputs"]) == 1 and dn["denoising"].groups == 2
    assert out["pred_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES + 1)
    assert "dn_outputs" not in model(images, 0.5)
    with torch.no_grad():
        assert "dn_outputs" not in model.eval()(images, 0.5, GROUP_TARGETS)


@pytest.mark.parametrize("extra", [(), ("--query_groups", "2"), ("--no_pnp",)])
def test_matching_outputs_in_training_are_those_of_the_model_without_denoising(extra):
    plain = tiny_build("--dropout", "0", *extra)[0].train()
    denoised, _, _ = denoising_build(3, *extra, seed=1)
    notes = load_model_weights(denoised, plain.state_dict(), "plain.pth")
    assert len(notes) == 1 and "start fresh" in notes[0]
    images = torch.stack(_images())
    with torch.no_grad():
        out, expected = denoised(images, 0.5, GROUP_TARGETS), plain(images, 0.5)
    _assert_outputs_close(out, expected)
    for group, expected_group in zip(out.get("group_outputs", []), expected.get("group_outputs", [])):
        _assert_outputs_close(group, expected_group)


def test_denoising_terms_compare_each_query_with_its_own_box_and_ignore_padding():
    model, criterion, _ = denoising_build(2, "--dn_label_noise", "0", "--dn_box_noise", "0")
    with torch.no_grad():
        out = model(torch.stack(_images()), 0.5, GROUP_TARGETS)
        losses = criterion(out, GROUP_TARGETS)
    dn = out["dn_outputs"]
    real = [(0, q) for q in range(6)] + [(1, 0), (1, 3)]
    norm = 4 * 2                                     # 4 target boxes, 2 groups
    logits = torch.stack([dn["pred_logits"][b, q] for b, q in real])
    labels = torch.tensor([1, 2, 3, 1, 2, 3, 4, 4])
    torch.testing.assert_close(losses["loss_ce_dn"], F.cross_entropy(logits, labels, reduction="sum") / norm)
    pred = torch.stack([dn["pred_boxes"][b, q] for b, q in real])
    target = torch.cat([GROUP_TARGETS[0]["boxes"]] * 2 + [GROUP_TARGETS[1]["boxes"]] * 2)
    torch.testing.assert_close(losses["loss_bbox_dn"], F.l1_loss(pred, target, reduction="sum") / norm)
    assert {"loss_ce_0_dn", "loss_bbox_0_dn", "loss_giou_0_dn"} <= set(losses)
    padded = {**dn, "pred_logits": dn["pred_logits"].clone(), "pred_boxes": dn["pred_boxes"].clone()}
    padded["pred_logits"][1, [1, 2, 4, 5]] += 3.0
    padded["pred_boxes"][1, [1, 2, 4, 5]] = 0.9
    again = criterion.loss_denoising(padded, dn["denoising"], torch.tensor(4.0))
    for name in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"):
        torch.testing.assert_close(again[name], losses[name])


def test_weight_dict_gives_the_denoising_terms_the_detection_weights():
    _, criterion, _ = tiny_build("--dn_groups", "2", "--no_aux_loss")
    assert criterion.weight_dict == {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0,
                                     "loss_ce_dn": 1.0, "loss_bbox_dn": 5.0, "loss_giou_dn": 2.0,
                                     "sample_reg_loss": 1e-4}


@pytest.mark.parametrize("flags", [(), ("--no_pnp",)])
def test_denoising_losses_of_images_without_boxes_are_finite_and_reach_the_denoising_queries(flags):
    model, criterion, _ = denoising_build(2, *flags)
    losses = criterion(model(torch.stack(_images()), 0.5, NO_BOXES), NO_BOXES)
    assert losses["loss_bbox_dn"].item() == 0 and losses["loss_ce_dn"].item() == 0
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    assert math.isfinite(total.item())
    total.backward()
    for param in model.denoising.parameters():   # in the graph (DDP needs every parameter used), gradient 0
        assert param.grad is not None and torch.isfinite(param.grad).all()


@pytest.mark.parametrize("flag,value", [("--dn_groups", "-1"), ("--dn_label_noise", "1.5"),
                                        ("--dn_box_noise", "-0.1"), ("--hidden_dim", "36")])
def test_bad_denoising_flags_are_one_line_errors(flag, value):
    from tasks import get_task
    extra = ["--dn_groups", "2"] if flag != "--dn_groups" else []
    args = tiny_args(*extra, flag, value)
    with pytest.raises(UserError, match=flag):
        get_task(args.task).check_args(args)


# ----------------------------------------------------------------------------- Co-DETR's encoder head (--encoder_head)
@pytest.mark.parametrize("extra,tokens", [((), 8), (("--no_pnp",), 16)])
def test_training_adds_the_encoder_heads_predictions_and_eval_none(extra, tokens):
    model, _, _ = accelerated_build("--encoder_head", 1, "--backbone_last_stage", "3", *extra)   # 4x4 cells
    images = torch.stack(_images())
    encoder = model(images, 0.5)["encoder_outputs"]
    assert encoder.logits.shape == (2, tokens, NUM_CLASSES) and encoder.deltas.shape == (2, tokens, 4)
    assert encoder.stride == 16 and encoder.mask.shape == (2, 4, 4)
    with torch.no_grad():
        assert "encoder_outputs" not in model.eval()(images, 0.5)


@pytest.mark.parametrize("extra", [(), ("--no_pnp",), ("--dn_groups", "2", "--query_groups", "2")])
def test_outputs_with_the_encoder_head_are_those_of_the_model_without(extra):
    plain = tiny_build("--dropout", "0", *extra)[0].train()
    headed, _, _ = accelerated_build("--encoder_head", 1, *extra, seed=1)
    notes = load_model_weights(headed, plain.state_dict(), "plain.pth")
    assert len(notes) == 1 and "encoder head" in notes[0] and "start fresh" in notes[0]
    images = torch.stack(_images())
    for mode in ("train", "eval"):
        torch.manual_seed(0)   # the same denoising noise in both models
        with torch.no_grad():
            out = getattr(headed, mode)()(images, 0.5, GROUP_TARGETS)
            torch.manual_seed(0)
            expected = getattr(plain, mode)()(images, 0.5, GROUP_TARGETS)
        _assert_outputs_close(out, expected)


def test_weight_dict_weighs_the_encoder_terms_by_the_flag():
    _, criterion, _ = tiny_build("--encoder_head", "0.5", "--no_aux_loss")
    assert criterion.weight_dict == {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_ce_enc": 1.0,
                                     "loss_bbox_enc": 2.5, "loss_giou_enc": 1.0, "sample_reg_loss": 1e-4}


@pytest.mark.parametrize("targets", [GROUP_TARGETS, NO_BOXES])
def test_encoder_losses_are_finite_and_reach_the_encoder_head(targets):
    model, criterion, _ = accelerated_build("--encoder_head", 1)
    has_boxes = targets is not NO_BOXES
    targets = [{**t, "size": torch.tensor([64, 64])} for t in targets]
    losses = criterion(model(torch.stack(_images()), 0.5), targets)
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    assert math.isfinite(total.item())
    total.backward()
    grad = model.encoder_head.class_embed.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    box_grad = model.encoder_head.box_embed[-1].weight.grad
    assert box_grad is not None and (box_grad.abs().sum() > 0) == has_boxes


@pytest.mark.parametrize("value,extra", [("-1", ()), ("1", ("--masks", "--frozen_weights", "detr.pth"))])
def test_bad_encoder_head_flags_are_one_line_errors(value, extra):
    from tasks import get_task
    args = tiny_args("--encoder_head", value, *extra)
    with pytest.raises(UserError, match="--encoder_head"):
        get_task(args.task).check_args(args)


# ----------------------------------------------------------------------------- post-processing
def test_postprocess_hand_case():
    # Query 0: no-object is the most likely class, class 1 the most likely real class.
    logits = torch.tensor([[[0.0, 2.0, 3.0], [4.0, 1.0, 0.0]]])   # 2 classes + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.1, 0.5, 0.2]]])
    results = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    assert len(results) == 1
    probs = logits.softmax(-1)[0]
    assert results[0]["labels"].tolist() == [1, 0]
    torch.testing.assert_close(results[0]["scores"], torch.stack([probs[0, 1], probs[1, 0]]))
    # (height, width) = (100, 200): x scaled by 200, y by 100.
    torch.testing.assert_close(results[0]["boxes"], torch.tensor([[50.0, 25.0, 150.0, 75.0], [0.0, 0.0, 100.0, 20.0]]))


def test_postprocess_never_predicts_no_object_and_scales_per_image():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 10, NUM_CLASSES + 1, generator=gen)
    logits[..., -1] += 10.0   # no-object dominates everywhere
    boxes = torch.rand(2, 10, 4, generator=gen) * 0.4 + 0.1
    results = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 20], [30, 40]]))
    for res in results:
        assert res["labels"].shape == (10,) and res["scores"].shape == (10,) and res["boxes"].shape == (10, 4)
        assert (res["labels"] < NUM_CLASSES).all()
    # The same normalised boxes in images of (h, w) = (10, 20) and (30, 40): x scales 2x, y 3x.
    boxes[1] = boxes[0]
    results = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 20], [30, 40]]))
    torch.testing.assert_close(results[1]["boxes"], results[0]["boxes"] * torch.tensor([2.0, 3.0, 2.0, 3.0]))
