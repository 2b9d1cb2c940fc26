"""main.py end to end: train, evaluate, resume, presets and one-line errors."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import main
from tasks import check_task_flags, get_task
from conftest import TINY_CLASSIFICATION_FLAGS, TINY_FLAGS, assert_one_line_error
from datasets import build_dataset
from datasets.coco_eval import STAT_NAMES
from models import build_model
from util.checkpoint import load_model_weights

ROOT = Path(__file__).resolve().parent.parent


def _run(argv, capsys):
    code = main.run(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_log_has_one_json_object_per_epoch_with_ratio_keys(trained):
    out, _ = trained
    lines = (out / "log.txt").read_text().splitlines()
    assert len(lines) == 2
    logs = [json.loads(line) for line in lines]
    assert [log["epoch"] for log in logs] == [0, 1]
    for log in logs:
        assert log["n_parameters"] > 0 and "train_loss" in log and "train_loss_ce" in log
        assert log["train_images_per_s"] > 0
        for ratio in ("0.4", "0.9"):
            assert len(log[f"test_ratio_{ratio}_coco_eval_bbox"]) == 12
            assert f"test_ratio_{ratio}_loss" in log


def test_checkpoint_is_readable_with_weights_only(trained):
    out, _ = trained
    checkpoint = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"model", "optimizer", "lr_scheduler", "epoch", "args"}
    assert checkpoint["epoch"] == 1
    assert isinstance(checkpoint["args"], dict) and checkpoint["args"]["num_classes"] == 7
    assert any(k.startswith("transformer.sampler.score_pred_net") for k in checkpoint["model"])
    assert not list(out.glob("*.tmp")), "a temporary checkpoint file was left behind"


def test_eval_writes_one_row_per_ratio_with_named_stats(trained, capsys):
    out, _ = trained
    rows = json.loads((out / "eval.json").read_text())
    assert [row["ratio"] for row in rows] == [0.3, 1.0]
    for row in rows:
        assert set(row) == {"ratio", *STAT_NAMES, "gflops", "gflops_transformer", "images_per_s"}
        assert all(-1.0 <= row[name] <= 1.0 for name in STAT_NAMES)


def test_eval_at_a_ratio_reproduces_the_training_evaluation(trained, capsys):
    out, flags = trained
    code, _, _ = _run(flags + ["--eval", "--eval_ratios", "0.4"], capsys)
    assert code == 0
    row = json.loads((out / "eval.json").read_text())[0]
    last_epoch = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert row["AP"] == pytest.approx(last_epoch["test_ratio_0.4_coco_eval_bbox"][0], abs=1e-9)


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, tiny_flags):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main.run(tiny_flags + ["--output_dir", str(straight), "--epochs", "2", "--eval_every", "0"]) == 0
    assert main.run(tiny_flags + ["--output_dir", str(split), "--epochs", "1", "--eval_every", "0"]) == 0
    assert main.run(tiny_flags + ["--output_dir", str(split), "--epochs", "2", "--eval_every", "0"]) == 0
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(split / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert len((split / "log.txt").read_text().splitlines()) == 2


def test_weight_average_decay_warms_up_over_the_steps_counted_from_epoch_0():
    model = torch.nn.Linear(1, 1, bias=False)
    average = main.build_weight_average(main.parse_args(["--ema_decay", "0.99"]), model)
    with torch.no_grad():
        model.weight.fill_(2.0)
        main.average_steps(average, model, epoch=0, steps_per_epoch=3)(0)  # the first step: a copy
        assert average.module.weight.item() == pytest.approx(2.0)
        model.weight.fill_(6.0)
        main.average_steps(average, model, epoch=1, steps_per_epoch=3)(0)  # the 4th step: decay 1 - 4^(-2/3)
        decay = 1 - 4 ** (-2 / 3)
        assert average.module.weight.item() == pytest.approx(decay * 2.0 + (1 - decay) * 6.0)
    assert main.build_weight_average(main.parse_args([]), model) is None
    assert main.build_weight_average(main.parse_args(["--ema_decay", "0.99", "--eval"]), model) is None


def test_ema_checkpoint_holds_the_average_and_resumes_as_an_uninterrupted_run(tmp_path, tiny_flags, capsys):
    straight, split, half, plain = (tmp_path / name for name in ("straight", "split", "half", "plain"))
    flags = tiny_flags + ["--eval_every", "0", "--eval_ratios", "0.5"]
    assert main.run(flags + ["--output_dir", str(straight), "--epochs", "2", "--ema_decay", "0.9"]) == 0
    assert main.run(flags + ["--output_dir", str(split), "--epochs", "1", "--ema_decay", "0.9"]) == 0
    half.mkdir()
    shutil.copy(split / "checkpoint.pth", half / "checkpoint.pth")
    assert main.run(flags + ["--output_dir", str(split), "--epochs", "2", "--ema_decay", "0.9"]) == 0
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(split / "checkpoint.pth", weights_only=True)
    assert set(a) == {"model", "trained_model", "optimizer", "lr_scheduler", "epoch", "args"}
    for key in ("model", "trained_model"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    for name in ("class_embed.weight", "backbone.0.body.bn1.running_mean"):  # a weight and a BatchNorm statistic
        assert not torch.equal(a["model"][name], a["trained_model"][name]), name
    # The average never feeds back into training: a run without it trains the same weights, and one
    # resumed without --ema_decay goes on from the trained weights.
    assert main.run(flags + ["--output_dir", str(plain), "--epochs", "2"]) == 0
    code, out, _ = _run(flags + ["--output_dir", str(half), "--epochs", "2"], capsys)
    assert code == 0 and "moving average" in out and "trained weights" in out
    c = torch.load(plain / "checkpoint.pth", weights_only=True)["model"]
    d = torch.load(half / "checkpoint.pth", weights_only=True)
    assert "trained_model" not in d
    for name, value in c.items():
        assert torch.equal(value, a["trained_model"][name]), name
        assert torch.equal(value, d["model"][name]), name


def test_training_evaluates_the_average_it_saves(tmp_path, tiny_flags, monkeypatch):
    evaluated = []
    run_evaluation = main.run_evaluation

    def record(task, args, model, *rest):
        evaluated.append({name: value.clone() for name, value in model.state_dict().items()})
        return run_evaluation(task, args, model, *rest)

    monkeypatch.setattr(main, "run_evaluation", record)
    flags = tiny_flags + ["--output_dir", str(tmp_path), "--eval_ratios", "0.5", "--epochs", "1", "--ema_decay", "0.9"]
    assert main.run(flags) == 0
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    (weights,) = evaluated
    for name, value in checkpoint["model"].items():
        assert torch.equal(value, weights[name]), name
    assert not torch.equal(weights["class_embed.weight"], checkpoint["trained_model"]["class_embed.weight"])


def test_plain_detr_trains_and_logs_unprefixed_keys(tmp_path, tiny_flags):
    assert main.run(tiny_flags + ["--no_pnp", "--output_dir", str(tmp_path), "--epochs", "1"]) == 0
    log = json.loads((tmp_path / "log.txt").read_text())
    assert len(log["test_coco_eval_bbox"]) == 12
    assert not any(k.startswith("test_ratio_") for k in log)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert not any(k.startswith("transformer.sampler") for k in checkpoint["model"])


def test_every_accelerator_trains_a_checkpoint_that_a_plain_eval_scores_alike(tmp_path, tiny_flags, capsys):
    trained_dir, evaluated_dir = tmp_path / "accelerated", tmp_path / "plain"
    accelerators = ["--query_groups", "3", "--dn_groups", "2", "--encoder_head", "1"]
    code, out, _ = _run(tiny_flags + ["--output_dir", str(trained_dir), "--epochs", "1", *accelerators,
                                      "--mosaic", "0.5", "--eval_ratios", "0.5"], capsys)
    assert code == 0, out[-2000:]
    log = json.loads((trained_dir / "log.txt").read_text())
    assert "train_loss" in log and "train_loss_bbox_dn" in log and "train_loss_giou_enc" in log
    assert len(log["test_ratio_0.5_coco_eval_bbox"]) == 12
    checkpoint = torch.load(trained_dir / "checkpoint.pth", weights_only=True)
    assert checkpoint["model"]["extra_query_embed.weight"].shape == (2 * 6, 32)
    assert checkpoint["model"]["denoising.label_embed.weight"].shape == (7, 32)
    assert checkpoint["model"]["encoder_head.class_embed.weight"].shape == (7, 32)
    code, out, _ = _run(tiny_flags + ["--output_dir", str(evaluated_dir), "--eval", "--eval_ratios", "0.5",
                                      "--flops_images", "0", "--resume", str(trained_dir / "checkpoint.pth")], capsys)
    assert code == 0 and "dropped" in out
    assert "extra query groups" in out and "denoising queries" in out and "encoder head" in out
    (row,) = json.loads((evaluated_dir / "eval.json").read_text())
    assert [row[name] for name in STAT_NAMES] == log["test_ratio_0.5_coco_eval_bbox"]
    # One epoch finds nothing (AP 0 either way): the outputs themselves must agree too.
    images = [build_dataset("val", main.parse_args(tiny_flags + ["--num_classes", "7"]))[i][0] for i in range(2)]
    outputs = []
    for extra in (accelerators, []):
        model = build_model(main.parse_args(tiny_flags + ["--num_classes", "7", *extra]))[0]
        load_model_weights(model, checkpoint["model"], "checkpoint.pth")
        with torch.no_grad():
            outputs.append(model.eval()(images, 0.5))
    assert torch.equal(outputs[0]["pred_logits"], outputs[1]["pred_logits"])
    assert torch.equal(outputs[0]["pred_boxes"], outputs[1]["pred_boxes"])


def test_resume_with_other_query_groups_is_named(tmp_path, tiny_flags, capsys):
    flags = tiny_flags + ["--output_dir", str(tmp_path), "--eval_every", "0"]
    assert main.run(flags + ["--epochs", "1", "--query_groups", "2"]) == 0
    code, _, err = _run(flags + ["--epochs", "2"], capsys)
    assert_one_line_error(code, err, "--resume", "--query_groups", "--finetune")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_flags, capsys):
    flags = tiny_flags + ["--output_dir", str(tmp_path), "--eval_every", "0"]
    assert main.run(flags + ["--epochs", "1"]) == 0
    good = (tmp_path / "checkpoint.pth").read_bytes()
    code, _, err = _run(flags + ["--epochs", "2", "--bbox_loss_coef", "nan"], capsys)
    assert code == 1
    assert "non-finite loss" in err and "loss_bbox" in err and str(tmp_path / "checkpoint.pth") in err
    assert (tmp_path / "checkpoint.pth").read_bytes() == good


def test_config_preset_is_overridden_by_the_command_line(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("hidden_dim: 48\nlr: 3.0e-4\neval_ratios: [0.25, 0.75]\nno_pnp: true\n")
    args = main.parse_args(["--config", str(preset), "--lr", "5e-4"])
    assert args.hidden_dim == 48 and args.lr == 5e-4 and args.eval_ratios == [0.25, 0.75] and args.no_pnp


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_presets_parse_and_set_only_their_tasks_flags(preset):
    args = main.parse_args(["--config", str(ROOT / "configs" / preset), "--data_path", "data"]
                           if "task: classification" in (ROOT / "configs" / preset).read_text() else
                           ["--config", str(ROOT / "configs" / preset)])
    check_task_flags(get_task(args.task), args)


@pytest.mark.parametrize("extra,needles", [
    (["--sample_ratio_lower_bound", "0.9", "--sample_ratio_higher_bound", "0.5"], ["--sample_ratio_lower_bound"]),
    (["--sample_ratio_higher_bound", "1.5"], ["--sample_ratio_higher_bound", "(0, 1]"]),
    (["--sample_ratio_lower_bound", "0"], ["--sample_ratio_lower_bound"]),
    (["--eval_ratios", "0.5", "1.2"], ["--eval_ratios"]),
    (["--sample_topk_ratio", "0"], ["--sample_topk_ratio"]),
    (["--dilation"], ["--dilation", "resnet18"]),
    (["--num_classes", "3"], ["--num_classes"]),
    (["--channels_last", "--no_channels_last"], ["--channels_last", "--no_channels_last"]),
    (["--ema_decay", "1"], ["--ema_decay", "(0, 1)"]),
])
def test_bad_flags_end_in_one_line(tiny_flags, tmp_path, capsys, extra, needles):
    code, _, err = _run(tiny_flags + ["--output_dir", str(tmp_path), "--epochs", "1"] + extra, capsys)
    assert_one_line_error(code, err, *needles)


def test_missing_coco_path_is_named(tmp_path, capsys):
    code, _, err = _run(TINY_FLAGS + ["--coco_path", str(tmp_path / "nowhere")], capsys)
    assert_one_line_error(code, err, "--coco_path", "nowhere")
    code, _, err = _run(TINY_FLAGS, capsys)
    assert_one_line_error(code, err, "--coco_path")


def test_resume_of_a_missing_file_is_named(tiny_flags, tmp_path, capsys):
    code, _, err = _run(tiny_flags + ["--resume", str(tmp_path / "nope.pth")], capsys)
    assert_one_line_error(code, err, "--resume", "nope.pth")


@pytest.mark.parametrize("content", [b"\x00garbage" * 10, None])
def test_resume_of_a_foreign_file_is_named(tiny_flags, tmp_path, capsys, content):
    path = tmp_path / "foreign.pth"
    if content is None:
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        path.write_bytes(content)
    code, _, err = _run(tiny_flags + ["--resume", str(path)], capsys)
    assert_one_line_error(code, err, "--resume", "foreign.pth")


def test_resume_of_another_architecture_is_named_and_left_intact(trained, tiny_flags, tmp_path, capsys):
    out, _ = trained
    copy = tmp_path / "other.pth"
    shutil.copy(out / "checkpoint.pth", copy)
    before = copy.read_bytes()
    code, _, err = _run(tiny_flags + ["--hidden_dim", "64", "--resume", str(copy), "--eval"], capsys)
    assert_one_line_error(code, err, "other.pth", "--hidden_dim")
    assert copy.read_bytes() == before


def test_finetune_starts_a_new_run_from_the_weights_with_a_fresh_class_head(trained, tiny_flags, tmp_path, capsys):
    source, _ = trained
    out = tmp_path / "finetuned"
    code, stdout, err = _run(tiny_flags + ["--finetune", str(source / "checkpoint.pth"), "--num_classes", "9",
                                           "--output_dir", str(out), "--epochs", "1", "--lr", "0",
                                           "--lr_backbone", "0", "--eval_every", "0"], capsys)
    assert code == 0, err
    assert "class_embed has" in stdout and "the model 10: class_embed starts fresh" in stdout
    assert "training epochs 0..0" in stdout  # the source's epochs and optimiser are not taken
    tuned = torch.load(out / "checkpoint.pth", weights_only=True)
    original = torch.load(source / "checkpoint.pth", weights_only=True)["model"]
    assert tuned["epoch"] == 0 and tuned["model"]["class_embed.bias"].shape == (10,)
    for key, value in original.items():  # lr 0: every other weight is the source's
        if not key.startswith("class_embed.") and value.is_floating_point() and "running" not in key:
            assert torch.equal(tuned["model"][key], value), key


def test_finetune_of_a_missing_file_is_named(tiny_flags, tmp_path, capsys):
    code, _, err = _run(tiny_flags + ["--finetune", str(tmp_path / "nope.pth")], capsys)
    assert_one_line_error(code, err, "--finetune", "nope.pth")


def test_finetune_and_resume_together_are_refused(tiny_flags, tmp_path, capsys):
    code, _, err = _run(tiny_flags + ["--finetune", "a.pth", "--resume", "b.pth"], capsys)
    assert_one_line_error(code, err, "--finetune", "--resume")


@pytest.mark.parametrize("text,needles", [
    ("lr: [oops\n", ["preset.yaml", "YAML"]),
    ("learning_rate: 0.1\n", ["preset.yaml", "learning_rate"]),
    ("epochs: many\n", ["preset.yaml", "epochs"]),
    ("no_pnp: 3\n", ["preset.yaml", "no_pnp"]),
])
def test_bad_preset_is_named(tmp_path, capsys, text, needles):
    preset = tmp_path / "preset.yaml"
    preset.write_text(text)
    code, _, err = _run(["--config", str(preset)], capsys)
    assert_one_line_error(code, err, *needles)


def test_corrupt_image_in_a_loader_worker_ends_in_one_line(synthetic_root, tiny_flags, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    victim = sorted((data / "train2017").iterdir())[0]
    victim.write_bytes(b"not a png")
    flags = list(tiny_flags)
    flags[flags.index("--coco_path") + 1] = str(data)
    flags[flags.index("--num_workers") + 1] = "1"
    code, _, err = _run(flags + ["--output_dir", str(tmp_path / "out"), "--epochs", "1"], capsys)
    assert_one_line_error(code, err, victim.name)


def test_channels_last_computes_the_same_and_trains(tmp_path, tiny_flags):
    from models import build_model

    args = main.parse_args(tiny_flags + ["--num_classes", "7"])
    torch.manual_seed(0)
    model = build_model(args)[0].eval()
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = model(images, 0.5)["pred_boxes"]
        model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(images, 0.5)["pred_boxes"], expected, atol=1e-5, rtol=1e-4)
    for flag, channels_last in (("--channels_last", True), ("--no_channels_last", False)):  # default: the first
        out = tmp_path / flag
        assert main.run(tiny_flags + ["--output_dir", str(out), "--epochs", "1", "--eval_every", "0", flag]) == 0
        checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
        build_model(args)[0].load_state_dict(checkpoint["model"])
        weight = checkpoint["model"]["backbone.0.body.layer1.0.conv2.weight"]  # torch.save keeps the layout
        assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert weight.is_contiguous() != channels_last


def test_tensorboard_logs_the_scalars_of_log_txt(tmp_path, tiny_flags):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from util.plot_utils import log_scalars

    assert main.run(tiny_flags + ["--output_dir", str(tmp_path), "--epochs", "1", "--eval_ratios", "0.5",
                                  "--tensorboard"]) == 0
    logged = log_scalars(json.loads((tmp_path / "log.txt").read_text()))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(logged)
    assert "test_ratio_0.5_AP" in logged
    for name in ("train_loss", "test_ratio_0.5_AP"):
        (event,) = events.Scalars(name)
        assert event.step == 0 and event.value == pytest.approx(logged[name], rel=1e-6)


def test_tensorboard_without_its_package_is_named_before_training(tmp_path, tiny_flags, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    code, out, err = _run(tiny_flags + ["--output_dir", str(tmp_path), "--epochs", "1", "--tensorboard"], capsys)
    assert_one_line_error(code, err, "--tensorboard", "pip install tensorboard")
    assert "training" not in out and not (tmp_path / "checkpoint.pth").exists()


def test_tensorboard_needs_an_output_dir(tiny_flags, capsys):
    code, _, err = _run(tiny_flags + ["--epochs", "1", "--tensorboard"], capsys)
    assert_one_line_error(code, err, "--tensorboard", "--output_dir")


@pytest.mark.parametrize("compiled", [False, True])
def test_compile_pads_batches_to_a_multiple_of_32_pixels(tiny_flags, compiled):
    args = main.parse_args(tiny_flags + (["--compile"] if compiled else []) + ["--eval_size", "50"])
    args.distributed = False
    loader_train, loader_val = main.build_loaders(args, build_dataset("train", args), build_dataset("val", args))
    for loader in (loader_train, loader_val):
        samples, _ = next(iter(loader))
        height, width = samples.tensors.shape[-2:]
        padded_to_32 = height % 32 == 0 and width % 32 == 0
        assert padded_to_32 == compiled, (height, width)
        assert samples.mask.shape[-2:] == (height, width)


# ----------------------------------------------------------------------------- classification
@pytest.fixture
def classification_flags(classification_root) -> list[str]:
    return TINY_CLASSIFICATION_FLAGS + ["--data_path", classification_root]


class _Interrupted(Exception):
    pass


def test_classification_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, classification_flags,
                                                                          monkeypatch):
    """Stopped during epoch 1 and restarted, the run ends as an uninterrupted one: the weights,
    the cosine schedule (which depends on --epochs, so the stopped run has the same flags) and Mixup."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    flags = classification_flags + ["--epochs", "2", "--eval_every", "0"]
    assert main.run(flags + ["--output_dir", str(straight)]) == 0
    train_one_epoch = main.train_one_epoch

    def stop_in_epoch_1(*args, **kwargs):
        if args[5] == 1:  # the epoch
            raise _Interrupted
        return train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(main, "train_one_epoch", stop_in_epoch_1)
    with pytest.raises(_Interrupted):
        main.run(flags + ["--output_dir", str(split)])
    monkeypatch.setattr(main, "train_one_epoch", train_one_epoch)
    assert main.run(flags + ["--output_dir", str(split)]) == 0
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(split / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    assert any(k.startswith("sampler.") for k in a["model"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    logs = [json.loads(line) for line in (split / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in logs] == [0, 1]
    assert {"train_loss_ce", "train_sample_reg_loss", "test_ratio_0.5_acc1", "test_ratio_0.8_acc5"} <= set(logs[1])


def test_classification_finetune_at_another_input_size_resamples_the_position_embedding(tmp_path, classification_flags,
                                                                                         capsys):
    source, tuned = tmp_path / "source", tmp_path / "tuned"
    assert main.run(classification_flags + ["--epochs", "1", "--eval_every", "0", "--output_dir", str(source)]) == 0
    capsys.readouterr()
    code, out, err = _run(classification_flags + ["--input_size", "48", "--finetune", str(source / "checkpoint.pth"),
                                                  "--epochs", "1", "--eval_every", "0", "--output_dir", str(tuned)],
                          capsys)
    assert code == 0, err
    assert "pos_embed resampled from 16 to 36 patches" in out
    assert torch.load(tuned / "checkpoint.pth", weights_only=True)["model"]["pos_embed"].shape[1] == 37


def test_classification_eval_rows_table_and_tradeoff_against_the_plain_vit(tmp_path, classification_flags, capsys):
    plain, pnp = tmp_path / "plain", tmp_path / "pnp"
    assert main.run(classification_flags + ["--no_pnp", "--epochs", "1", "--output_dir", str(plain)]) == 0
    assert main.run(classification_flags + ["--no_pnp", "--eval", "--output_dir", str(plain)]) == 0
    assert main.run(classification_flags + ["--epochs", "1", "--output_dir", str(pnp)]) == 0
    capsys.readouterr()
    code, out, _ = _run(classification_flags + ["--eval", "--output_dir", str(pnp), "--eval_ratios", "0.5", "1",
                                                "--baseline_eval", str(plain / "eval.json")], capsys)
    assert code == 0
    (reference,) = json.loads((plain / "eval.json").read_text())
    rows = json.loads((pnp / "eval.json").read_text())
    assert reference["ratio"] is None and [row["ratio"] for row in rows] == [0.5, 1.0]
    for row in rows + [reference]:
        assert set(row) == {"ratio", "top1", "top5", "gflops", "images_per_s"}
        assert 0 <= row["top1"] <= row["top5"] <= 100 and row["images_per_s"] > 0
    assert rows[0]["gflops"] < reference["gflops"] < rows[1]["gflops"]  # r = 1 adds the sampler to the plain cost
    assert "ratio    top1    top5   GFLOPs    img/s" in out
    assert (pnp / "tradeoff.png").stat().st_size > 0


@pytest.mark.parametrize("extra,needles", [
    (["--masks"], ["--masks", "classification"]),
    (["--pnp_after_block", "6"], ["--pnp_after_block", "0..5"]),
    (["--batch_size", "3"], ["--batch_size", "even"]),
    (["--vit_weights", "timm"], ["--vit_weights", "demo"]),
])
def test_bad_classification_flags_end_in_one_line(classification_flags, tmp_path, capsys, extra, needles):
    code, _, err = _run(classification_flags + ["--output_dir", str(tmp_path), "--epochs", "1"] + extra, capsys)
    assert_one_line_error(code, err, *needles)


def test_classification_without_data_path_is_named(capsys):
    code, _, err = _run(["--task", "classification"], capsys)
    assert_one_line_error(code, err, "--data_path")


@pytest.mark.parametrize("device,pinned", [("cpu", False), ("cuda", True), ("cuda:1", True)])
def test_loaders_pin_memory_for_a_gpu_only(tiny_flags, device, pinned):
    args = main.parse_args(tiny_flags + ["--device", device])
    args.distributed = False
    loader_train, loader_val = main.build_loaders(args, *main.build_datasets(args))
    assert (loader_train.pin_memory, loader_val.pin_memory) == (pinned, pinned)


def test_optimizer_is_fused_adamw_with_the_backbone_at_its_own_lr(tiny_flags):
    args = main.parse_args(tiny_flags + ["--lr", "3e-4", "--lr_backbone", "2e-5"])
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 3)})
    optimizer, _ = main.build_optimizer(args, model, steps_per_epoch=5)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["fused"] for g in optimizer.param_groups] == [True, True]
    assert [(g["lr"], len(g["params"])) for g in optimizer.param_groups] == [(3e-4, 2), (2e-5, 2)]


def test_eval_evaluates_the_vit_weights_as_they_are(tmp_path, classification_flags, capsys):
    trained_run, weights = tmp_path / "run", tmp_path / "vit.pth"
    assert main.run(classification_flags + ["--no_pnp", "--epochs", "1", "--output_dir", str(trained_run)]) == 0
    torch.save(torch.load(trained_run / "checkpoint.pth", weights_only=True)["model"], weights)
    assert main.run(classification_flags + ["--no_pnp", "--eval", "--output_dir", str(trained_run)]) == 0
    capsys.readouterr()
    code, out, _ = _run(classification_flags + ["--no_pnp", "--eval", "--vit_weights", str(weights),
                                                "--output_dir", str(tmp_path / "published")], capsys)
    assert code == 0 and "untrained weights" not in out
    assert (json.loads((tmp_path / "published" / "eval.json").read_text())[0]["top1"]
            == json.loads((trained_run / "eval.json").read_text())[0]["top1"])


def test_lr_base_batch_scales_every_groups_lr_by_the_total_batch(tiny_flags):
    args = main.parse_args(tiny_flags + ["--lr", "4e-4", "--lr_backbone", "2e-5", "--batch_size", "4",
                                         "--lr_base_batch", "16"])
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 3)})
    optimizer, _ = main.build_optimizer(args, model, steps_per_epoch=5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 5e-6])


def test_repeated_aug_in_one_process_trains_on_every_image_and_warns(classification_flags, capsys):
    args = main.parse_args(classification_flags + ["--repeated_aug"])
    args.distributed = False
    loader_train, _ = main.build_loaders(args, *main.build_datasets(args))
    assert isinstance(loader_train.batch_sampler.sampler, torch.utils.data.RandomSampler)
    assert "--repeated_aug" in capsys.readouterr().out


def test_trainable_trains_only_the_named_parameters(trained, tiny_flags, tmp_path, capsys):
    source, _ = trained
    out = tmp_path / "sampler_only"
    code, _, err = _run(tiny_flags + ["--finetune", str(source / "checkpoint.pth"), "--trainable", "transformer.sampler",
                                      "--output_dir", str(out), "--epochs", "1", "--eval_every", "0"], capsys)
    assert code == 0, err
    tuned = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
    original = torch.load(source / "checkpoint.pth", weights_only=True)["model"]
    changed = {k for k, v in original.items() if v.is_floating_point() and "running" not in k and not torch.equal(v, tuned[k])}
    assert changed and all(k.startswith("transformer.sampler.") for k in changed)


def test_trainable_prefix_that_names_nothing_is_named(tiny_flags, capsys):
    code, _, err = _run(tiny_flags + ["--trainable", "transfomer.sampler", "--epochs", "1"], capsys)
    assert_one_line_error(code, err, "--trainable transfomer.sampler", "backbone")
