"""torchrun on CPU (gloo): DDP training, rank-0-only writes, and a distributed evaluation whose
AP equals the single-process AP of the same checkpoint; two "nodes" on loopback; the evaluation
of several ratios spread over the processes."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import main
from conftest import TINY_CLASSIFICATION_FLAGS, TINY_FLAGS
from datasets.coco_eval import STAT_NAMES, CocoEvaluator, coco_from_dict
from engine import evaluate_spread

REPO = Path(__file__).resolve().parents[1]
RATIOS = ["0.5", "0.8"]
# 24 images: 5 training batches of 5 over 2 ranks (2 each, drop_last); evaluation deals its 5
# batches (the last one of 4 images) 3 to rank 0 and 2 to rank 1.
BATCH_SIZE = "5"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(launcher: list[str], flags: list[str]) -> subprocess.Popen:
    """``torchrun LAUNCHER main.py FLAGS`` from the repository root, one thread per process.

    ``python -m torch.distributed.run`` is what the ``torchrun`` command runs, here with the
    interpreter of the tests.
    """
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    return subprocess.Popen([*torchrun, *launcher, "main.py", *flags], cwd=REPO, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def seen_root(tmp_path_factory, synthetic_root) -> Path:
    """The synthetic training images, also as the validation split.

    A model trained a few epochs on them finds some of their objects (AP > 0), so that an
    AP comparison can fail.
    """
    root = tmp_path_factory.mktemp("seen")
    (root / "annotations").mkdir()
    train_json = Path(synthetic_root) / "annotations" / "instances_train2017.json"
    for split in ("train", "val"):
        shutil.copy(train_json, root / "annotations" / f"instances_{split}2017.json")
        (root / f"{split}2017").symlink_to(Path(synthetic_root) / "train2017")
    return root


@pytest.fixture(scope="module")
def flags(tmp_path_factory, seen_root) -> list[str]:
    """Tiny-model flags resuming from a checkpoint trained 15 epochs in one process."""
    pretrained = tmp_path_factory.mktemp("pretrained")
    common = TINY_FLAGS + ["--coco_path", str(seen_root), "--batch_size", BATCH_SIZE]
    assert main.run(common + ["--output_dir", str(pretrained), "--epochs", "15", "--eval_every", "0"]) == 0
    return common + ["--resume", str(pretrained / "checkpoint.pth"), "--epochs", "16", "--eval_ratios", *RATIOS]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, flags) -> tuple[Path, str]:
    """One DDP epoch on 2 processes, then the distributed evaluation at RATIOS."""
    out = tmp_path_factory.mktemp("ddp")
    output = _finish(_torchrun(["--standalone", "--nproc_per_node=2"], flags + ["--output_dir", str(out)]))
    return out, output


def test_two_processes_share_each_epoch_and_only_rank_0_writes(ddp_run):
    out, output = ddp_run
    assert "Epoch: [15] [2/2]" in output, "each process should run 2 of the 5 training batches"
    assert output.count("Box AP at poll ratio 0.5:") == 1, "only rank 0 prints"
    logs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [log["epoch"] for log in logs] == [15]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 15
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pth", "log.txt"]


def test_distributed_ap_equals_the_single_process_ap_of_the_checkpoint(ddp_run, flags, tmp_path):
    out, _ = ddp_run
    distributed = json.loads((out / "log.txt").read_text())
    single = tmp_path / "single"
    assert main.run(flags + ["--output_dir", str(single), "--eval", "--resume", str(out / "checkpoint.pth")]) == 0
    rows = json.loads((single / "eval.json").read_text())
    assert [row["ratio"] for row in rows] == [float(r) for r in RATIOS]
    assert any(row["AP50"] > 0 for row in rows), "the checkpoint finds nothing: equal APs would prove nothing"
    for ratio, row in zip(RATIOS, rows):
        stats = distributed[f"test_ratio_{ratio}_coco_eval_bbox"]
        assert stats == [row[name] for name in STAT_NAMES], f"ratio {ratio}"


def test_distributed_ap_of_the_moving_average_equals_the_single_process_ap_of_its_checkpoint(flags, tmp_path):
    """Each rank keeps its own average of the same weights; rank 0's BatchNorm statistics are
    copied into every rank's, as into the trained model's (a decay of 0.01 keeps the average close
    to each rank's own statistics, so that without the copy the APs differ)."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    output = _finish(_torchrun(["--standalone", "--nproc_per_node=2"],
                               flags + ["--output_dir", str(ddp), "--ema_decay", "0.01"]))
    assert "holds no moving average" in output
    distributed = json.loads((ddp / "log.txt").read_text())
    checkpoint = torch.load(ddp / "checkpoint.pth", weights_only=True)
    assert not torch.equal(checkpoint["model"]["class_embed.weight"], checkpoint["trained_model"]["class_embed.weight"])
    assert main.run(flags + ["--output_dir", str(single), "--eval", "--resume", str(ddp / "checkpoint.pth")]) == 0
    rows = json.loads((single / "eval.json").read_text())
    assert any(row["AP50"] > 0 for row in rows), "the checkpoint finds nothing: equal APs would prove nothing"
    for ratio, row in zip(RATIOS, rows):
        assert distributed[f"test_ratio_{ratio}_coco_eval_bbox"] == [row[name] for name in STAT_NAMES], ratio


def test_two_nodes_on_loopback_train_as_two_local_processes(ddp_run, flags, tmp_path):
    port = str(_free_port())
    # c10d rendezvous: with the static one (--master_addr/--master_port) node 0's torchrun
    # sometimes did not exit after its worker had finished training (2 runs in 11 here).
    nodes = [_torchrun(["--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1", "--rdzv-backend=c10d",
                        f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two_nodes"],
                       flags + ["--output_dir", str(tmp_path)])
             for rank in (0, 1)]
    outputs = [_finish(node) for node in nodes]
    assert "Epoch: [15] [2/2]" in outputs[0]
    assert "Epoch:" not in outputs[1], "only rank 0 prints"
    ddp_out, _ = ddp_run
    a = torch.load(ddp_out / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    logs = [json.loads((out / "log.txt").read_text()) for out in (ddp_out, tmp_path)]
    assert _losses_and_ap(logs[1]) == _losses_and_ap(logs[0]) != {}


def _losses_and_ap(log: dict) -> dict:
    return {k: v for k, v in log.items() if "loss" in k or "coco_eval" in k}


def test_srun_task_without_a_rendezvous_address_is_told_what_to_set(monkeypatch, tiny_flags, capsys):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert main.run(tiny_flags + ["--epochs", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--dist_url env://" in lines[0] and "MASTER_ADDR" in lines[0], lines


def test_a_run_ends_its_process_group(monkeypatch, tiny_flags, tmp_path):
    """Left to the interpreter's exit, a gloo group sometimes aborted a finished rank."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    assert main.run(tiny_flags + ["--epochs", "1", "--eval_every", "0", "--output_dir", str(tmp_path)]) == 0
    assert (tmp_path / "checkpoint.pth").exists(), "the run should have trained in the process group"
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------- evaluation spread over ranks
EVAL_RATIOS = [0.33, 0.5, 0.8]


def _eval_inputs() -> tuple[dict, dict[float, dict[int, dict[str, torch.Tensor]]]]:
    """A small ground truth and, per ratio, other detections of every image (xyxy tensors)."""
    from tools.benchmark_eval import synthetic_eval_set

    gt, rows = synthetic_eval_set(24, 3.0, 8, seed=2, crowd=0.1)
    generator = np.random.default_rng(0)
    predictions = {}
    for ratio in EVAL_RATIOS:
        jittered = rows.copy()
        jittered[:, 1:5] += generator.normal(scale=2.0, size=(len(rows), 4))
        jittered[:, 3:5] = np.maximum(jittered[:, 3:5], 1.0)
        predictions[ratio] = {}
        for image in gt["images"]:
            mine = torch.from_numpy(jittered[jittered[:, 0] == image["id"]])
            predictions[ratio][image["id"]] = {"boxes": torch.cat([mine[:, 1:3], mine[:, 1:3] + mine[:, 3:5]], 1),
                                               "scores": mine[:, 5], "labels": mine[:, 6].long()}
    return gt, predictions


def _spread_evaluation(gt: dict, predictions: dict, rank: int, world_size: int) -> dict:
    """``evaluate_spread`` over the images dealt to ``rank``: every ratio's stats and summary,
    and the ratios this process evaluated itself."""
    evaluators = {ratio: CocoEvaluator(coco_from_dict(gt), verbose=False) for ratio in EVAL_RATIOS}
    for ratio, evaluator in evaluators.items():
        evaluator.update({i: p for i, p in predictions[ratio].items() if i % world_size == rank})
    results = evaluate_spread(EVAL_RATIOS, evaluators, {})
    return {"results": [box for box, _ in results],
            "evaluated": [ratio for ratio in EVAL_RATIOS if evaluators[ratio].coco_eval is not None],
            "kept_images": {ratio: len(evaluators[ratio].results) for ratio in EVAL_RATIOS}}


def _spread_worker(rank: int, world_size: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.save(_spread_evaluation(*_eval_inputs(), rank, world_size), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ratios_are_evaluated_once_each_spread_over_the_ranks(tmp_path):
    gt, predictions = _eval_inputs()
    single = _spread_evaluation(gt, predictions, 0, 1)
    assert single["evaluated"] == EVAL_RATIOS
    assert len({tuple(box["stats"]) for box in single["results"]}) == 3, "equal stats would prove nothing"
    mp.spawn(_spread_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert ranks[0]["evaluated"] == [0.33, 0.8] and ranks[1]["evaluated"] == [0.5]
    assert ranks[0]["kept_images"] == {0.33: 24, 0.5: 0, 0.8: 24}, "detections go to the owner only"
    assert ranks[1]["kept_images"] == {0.33: 0, 0.5: 24, 0.8: 0}
    for rank in ranks:
        assert rank["results"] == single["results"]


def test_classification_on_two_processes_with_repeated_augmentation(classification_root, tmp_path):
    """PnP-ViT under torchrun: RepeatAugSampler shares the epoch, rank 0 writes, and the top-1
    gathered from both ranks (4 and 2 validation images) equals one process's of the checkpoint."""
    flags = TINY_CLASSIFICATION_FLAGS + ["--data_path", classification_root, "--repeated_aug", "--epochs", "1",
                                         "--eval_ratios", "0.5", "--flops_images", "0"]
    out, single = tmp_path / "ddp", tmp_path / "single"
    output = _finish(_torchrun(["--standalone", "--nproc_per_node=2"], flags + ["--output_dir", str(out)]))
    assert "Epoch: [0] [1/1]" in output, "each process should run 1 of the 3 training batches (12 images, repeated)"
    log = json.loads((out / "log.txt").read_text())
    assert main.run(flags + ["--output_dir", str(single), "--eval", "--resume", str(out / "checkpoint.pth")]) == 0
    (row,) = json.loads((single / "eval.json").read_text())
    assert row["top1"] == pytest.approx(log["test_ratio_0.5_acc1"])
    assert row["top5"] == pytest.approx(log["test_ratio_0.5_acc5"])


# ----------------------------------------------------------------------------- accelerators over ranks
# Boxes per image 3, 1 | 0, 2: the ranks' counts differ, so the loss is right only with the box
# count averaged over the processes.
GROUPED_BOXES = [[[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2], [0.5, 0.2, 0.2, 0.1]], [[0.5, 0.5, 0.4, 0.4]],
                 [], [[0.2, 0.7, 0.2, 0.3], [0.7, 0.3, 0.4, 0.2]]]
# Boxes per image 2, 1 | 0, 2: the counts differ too, but both ranks pad their denoising groups to 2
# queries as the whole batch does (a padding slot is attended to, so more of it would change the rest).
DENOISING_BOXES = [GROUPED_BOXES[0][:2], GROUPED_BOXES[1], [], GROUPED_BOXES[3]]
ACCELERATORS = {
    "query_groups": (["--query_groups", "2"], GROUPED_BOXES, {"loss_bbox_group1", "loss_giou_0_group1"}),
    "denoising": (["--dn_groups", "2", "--dn_label_noise", "0", "--dn_box_noise", "0"], DENOISING_BOXES,
                  {"loss_ce_dn", "loss_bbox_dn", "loss_giou_0_dn"}),
    "encoder_head": (["--encoder_head", "1"], GROUPED_BOXES, {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"}),
}


def _accelerated_losses(accelerator: str, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
    """The box terms of every query group and decoder layer, and every denoising and encoder head term, of a tiny
    PnP-DETR with ``accelerator`` (training mode; BatchNorm on running statistics, so that an
    image's outputs do not depend on its batch). The matching queries' class terms are left out:
    cross-entropy averages over each process's queries, so its average over processes is not the
    whole batch's, with or without accelerators."""
    from models.detr import build

    torch.manual_seed(0)
    model, criterion, _ = build(main.parse_args(
        TINY_FLAGS + ["--num_classes", "5", "--dropout", "0", *ACCELERATORS[accelerator][0]]))
    model.train()
    model.backbone.eval()
    with torch.no_grad():
        losses = criterion(model(images, 0.5, targets), targets)
    return {k: v for k, v in losses.items() if k.startswith(("loss_bbox", "loss_giou")) or k.endswith(("_dn", "_enc"))}


def _accelerated_batch(accelerator: str) -> tuple[list[torch.Tensor], list[dict]]:
    generator = torch.Generator().manual_seed(0)
    boxes_per_image = ACCELERATORS[accelerator][1]
    images = [torch.rand(3, 64, 64, generator=generator) for _ in boxes_per_image]
    targets = [{"labels": torch.arange(len(boxes), dtype=torch.int64) + 1,
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "size": torch.tensor([64, 64])}
               for boxes in boxes_per_image]
    return images, targets


def _accelerated_loss_worker(rank: int, world_size: int, store: str, out: str, accelerator: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        images, targets = _accelerated_batch(accelerator)
        share = slice(2 * rank, 2 * rank + 2)
        torch.save(_accelerated_losses(accelerator, images[share], targets[share]), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("accelerator", sorted(ACCELERATORS))
def test_accelerated_loss_on_two_processes_equals_the_single_process_loss_of_the_batch(tmp_path, accelerator):
    single = _accelerated_losses(accelerator, *_accelerated_batch(accelerator))
    assert ACCELERATORS[accelerator][2] <= set(single)
    mp.spawn(_accelerated_loss_worker, args=(2, str(tmp_path / "store"), str(tmp_path), accelerator), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert set(ranks[0]) == set(single)
    for key, value in single.items():
        torch.testing.assert_close((ranks[0][key] + ranks[1][key]) / 2, value, atol=1e-5, rtol=1e-5, msg=key)
