"""Checkpoint reading and weight loading (util/checkpoint.py)."""
import argparse
import pathlib

import pytest
import torch

import main
from models.detr import build
from util.checkpoint import PUBLISHED_CHECKPOINTS, load_model_weights, plain_args, read_checkpoint
from util.errors import UserError

SAMPLER = "transformer.sampler."



def tiny_args(*extra: str):
    return main.parse_args(["--backbone", "resnet18", "--backbone_weights", "none", "--num_classes", "5",
                            "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2",
                            "--dim_feedforward", "64", "--num_queries", "7", "--unsample_abstract_number", "4",
                            "--device", "cpu", *extra])


def tiny_model(*extra: str, seed: int = 0):
    torch.manual_seed(seed)
    return build(tiny_args(*extra))[0]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _equal(a, b, keys):
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_detr_state_dict_loads_into_pnp_with_sampler_note():
    detr = tiny_model("--no_pnp", seed=1)
    pnp = tiny_model(seed=2)
    sampler_before = {k: v for k, v in _snapshot(pnp).items() if k.startswith(SAMPLER)}
    notes = load_model_weights(pnp, detr.state_dict(), "detr.pth")
    assert len(notes) == 1
    assert "transformer.sampler" in notes[0] and "detr.pth" in notes[0]
    loaded = pnp.state_dict()
    source = detr.state_dict()
    assert _equal(loaded, source, source.keys())              # every DETR weight is loaded
    assert _equal(loaded, sampler_before, sampler_before.keys())  # the sampler stays as it was
    assert not torch.equal(loaded["query_embed.weight"], tiny_model(seed=2).state_dict()["query_embed.weight"])


def test_pnp_state_dict_round_trips_strictly():
    source = tiny_model(seed=1)
    target = tiny_model(seed=2)
    sd = source.state_dict()
    assert not _equal(target.state_dict(), sd, sd.keys())
    assert load_model_weights(target, sd, "pnp.pth") == []
    assert _equal(target.state_dict(), sd, sd.keys())
    target.load_state_dict(sd, strict=True)  # same key set, nothing left over


def test_other_class_count_drops_class_embed_with_note():
    source = tiny_model("--num_classes", "9", seed=1)
    target = tiny_model(seed=2)
    before = _snapshot(target)
    sd = source.state_dict()
    notes = load_model_weights(target, sd, "coco.pth")
    assert len(notes) == 1
    assert "class_embed" in notes[0] and "10" in notes[0] and "6" in notes[0]
    after = target.state_dict()
    assert after["class_embed.weight"].shape == (6, 32)
    assert torch.equal(after["class_embed.weight"], before["class_embed.weight"])
    assert torch.equal(after["class_embed.bias"], before["class_embed.bias"])
    others = [k for k in sd if not k.startswith("class_embed.")]
    assert _equal(after, sd, others)


@pytest.mark.parametrize("flag,what", [("--dn_groups", "denoising queries"), ("--encoder_head", "encoder head")])
def test_training_only_part_of_another_class_set_starts_fresh_with_a_note_that_says_so(flag, what):
    source = tiny_model(flag, "2", "--num_classes", "9", seed=1)
    notes = load_model_weights(tiny_model(flag, "2", seed=2), source.state_dict(), "coco.pth")
    assert len(notes) == 2 and "class_embed" in notes[0]
    assert what in notes[1] and "another shape" in notes[1] and "start fresh" in notes[1], notes


def test_detr_checkpoint_with_other_class_count_gives_both_notes():
    source = tiny_model("--no_pnp", "--num_classes", "9", seed=1)
    notes = load_model_weights(tiny_model(seed=2), source.state_dict(), "detr-r50.pth")
    assert len(notes) == 2
    assert any("class_embed" in n for n in notes) and any("transformer.sampler" in n for n in notes)


@pytest.mark.parametrize("flags,problem", [(("--hidden_dim", "16"), "shape mismatch"),
                                           (("--enc_layers", "2"), "unexpected"),
                                           (("--dec_layers", "1"), "missing")])
def test_other_architecture_is_a_one_line_user_error(flags, problem):
    source = tiny_model(*flags, seed=1)
    target = tiny_model(seed=2)
    before = _snapshot(target)
    with pytest.raises(UserError) as info:
        load_model_weights(target, source.state_dict(), "/ckpts/other_arch.pth")
    message = str(info.value)
    assert "/ckpts/other_arch.pth" in message
    assert problem in message
    assert "\n" not in message
    assert _equal(target.state_dict(), before, before.keys())  # nothing half-loaded


def _eval_outputs(model):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(images, 0.5)


def test_checkpoint_with_query_groups_loads_into_a_model_without_them_with_a_note():
    grouped = tiny_model("--query_groups", "3", seed=1)
    plain = tiny_model(seed=2)
    notes = load_model_weights(plain, grouped.state_dict(), "grouped.pth")
    assert len(notes) == 1 and "grouped.pth" in notes[0] and "dropped" in notes[0] and "\n" not in notes[0]
    assert "extra_query_embed.weight" not in plain.state_dict()
    expected, loaded = _eval_outputs(grouped), _eval_outputs(plain)
    assert torch.equal(loaded["pred_logits"], expected["pred_logits"])
    assert torch.equal(loaded["pred_boxes"], expected["pred_boxes"])


@pytest.mark.parametrize("source_flags", [(), ("--query_groups", "2")])
def test_model_with_query_groups_keeps_fresh_extra_groups_from_a_checkpoint_without_as_many(source_flags):
    source = tiny_model(*source_flags, seed=1)
    grouped = tiny_model("--query_groups", "3", seed=2)
    fresh = grouped.extra_query_embed.weight.detach().clone()
    notes = load_model_weights(grouped, source.state_dict(), "plain.pth")
    assert len(notes) == 1 and "plain.pth" in notes[0] and "start fresh" in notes[0]
    assert ("another shape" in notes[0]) == bool(source_flags), notes[0]
    assert torch.equal(grouped.extra_query_embed.weight, fresh)
    assert torch.equal(grouped.query_embed.weight, source.query_embed.weight)


@pytest.mark.parametrize("flags,what,prefix", [(("--dn_groups", "3"), "denoising queries", "denoising."),
                                               (("--encoder_head", "1"), "encoder head", "encoder_head.")])
def test_checkpoint_with_a_training_only_part_loads_into_a_model_without_it_with_a_note(flags, what, prefix):
    trained = tiny_model(*flags, seed=1)
    plain = tiny_model(seed=2)
    notes = load_model_weights(plain, trained.state_dict(), "trained.pth")
    assert len(notes) == 1 and "trained.pth" in notes[0] and what in notes[0]
    assert "dropped" in notes[0] and "\n" not in notes[0]
    assert not any(k.startswith(prefix) for k in plain.state_dict())
    expected, loaded = _eval_outputs(trained), _eval_outputs(plain)
    assert torch.equal(loaded["pred_logits"], expected["pred_logits"])
    assert torch.equal(loaded["pred_boxes"], expected["pred_boxes"])


def test_model_with_denoising_queries_keeps_them_fresh_from_a_checkpoint_without():
    denoised = tiny_model("--dn_groups", "2", seed=2)
    fresh = {k: v.clone() for k, v in denoised.denoising.state_dict().items()}
    notes = load_model_weights(denoised, tiny_model(seed=1).state_dict(), "plain.pth")
    assert len(notes) == 1 and "plain.pth" in notes[0] and "--dn_groups" in notes[0] and "start fresh" in notes[0]
    for key, value in denoised.denoising.state_dict().items():
        assert torch.equal(value, fresh[key]), key


def test_pnp_checkpoint_into_plain_detr_is_a_user_error():
    with pytest.raises(UserError, match="unexpected transformer.sampler"):
        load_model_weights(tiny_model("--no_pnp"), tiny_model(seed=1).state_dict(), "pnp.pth")


def test_read_checkpoint_missing_file(tmp_path):
    path = tmp_path / "missing.pth"
    with pytest.raises(UserError, match="--resume") as info:
        read_checkpoint(str(path))
    assert str(path) in str(info.value)


def test_read_checkpoint_garbage_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(UserError, match="--resume") as info:
        read_checkpoint(str(path))
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_read_checkpoint_rejects_a_bare_state_dict(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="'model'"):
        read_checkpoint(str(path))


def test_checkpoint_with_plain_args_loads_weights_only(tmp_path):
    args = tiny_args()
    args.device = torch.device("cpu")             # a non-plain value, as main may hold
    args.output_dir = pathlib.Path(tmp_path)
    model = tiny_model()
    plain = plain_args(args)
    assert plain["device"] == "cpu" and plain["output_dir"] == str(tmp_path)
    assert plain["num_classes"] == 5 and plain["hidden_dim"] == 32
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "args": plain}, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["args"] == plain
    assert torch.equal(loaded["model"]["query_embed.weight"], model.state_dict()["query_embed.weight"])
    assert read_checkpoint(str(path))["epoch"] == 3


def test_plain_args_converts_every_value_to_plain_types():
    args = argparse.Namespace(a=1, b=0.5, c="x", d=None, e=True, f=(1, torch.device("cpu")), g=pathlib.Path("/p"))
    plain = plain_args(args)
    assert plain == {"a": 1, "b": 0.5, "c": "x", "d": None, "e": True, "f": [1, "cpu"], "g": "/p"}


def test_checkpoint_with_namespace_args_is_readable(tmp_path):
    # Official DETR / PnP-DETR checkpoints pickle an argparse.Namespace.
    args = argparse.Namespace(num_classes=91, hidden_dim=256, dilation=False, lr=1e-4)
    model = tiny_model("--no_pnp")
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "args": args, "epoch": 499}, path)
    checkpoint = read_checkpoint(str(path))
    assert isinstance(checkpoint["args"], argparse.Namespace)
    assert vars(checkpoint["args"]) == vars(args)
    assert torch.equal(checkpoint["model"]["class_embed.bias"], model.state_dict()["class_embed.bias"])


def test_batchnorm_and_frozen_batchnorm_checkpoints_load_into_each_other():
    """A from-scratch (BatchNorm2d) checkpoint differs from a FrozenBatchNorm2d one only by
    ``num_batches_tracked``; either loads into the other kind with the statistics intact."""
    frozen = tiny_model("--backbone_weights", "imagenet")
    trainable = tiny_model("--backbone_weights", "none")
    with torch.no_grad():
        trainable.backbone[0].body["bn1"].running_mean.fill_(0.25)
    load_model_weights(frozen, trainable.state_dict(), "scratch.pth")
    assert torch.all(frozen.backbone[0].body["bn1"].running_mean == 0.25)
    load_model_weights(trainable, frozen.state_dict(), "frozen.pth")


def test_a_published_name_downloads_its_url_and_offline_names_the_flag(monkeypatch):
    asked = []

    def offline(url, **kwargs):
        asked.append(url)
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match=r"^--finetune https://dl\.fbaipublicfiles\.com/detr/detr-r50-.*give a local file"):
        read_checkpoint("detr_r50", flag="--finetune")
    assert asked == [PUBLISHED_CHECKPOINTS["detr_r50"]]
