"""Panoptic quality (datasets/panoptic_eval.py): by hand, and against panopticapi (the reference
implementation, an optional dev package: those tests skip without it) on a hand-made case and
on the synthetic panoptic val."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets.panoptic_eval as panoptic_eval
from datasets.panoptic_eval import PQ_NAMES, PanopticEvaluator, panoptic_row
from datasets.synthetic import IMAGE_SIZE, generate
from util.panoptic_png import ids_to_rgb, rgb_to_ids

PANOPTICAPI_MISSING = ("panopticapi is not installed (pip install --no-deps panopticapi-lite; its metadata pins "
                       "numpy<2): the cross-check against the reference implementation is skipped")
CATEGORIES = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 1},
              {"id": 3, "name": "s", "isthing": 0}]


def _png(ids: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(ids_to_rgb(ids)).save(buffer, format="PNG")
    return buffer.getvalue()


def _segments(ids: np.ndarray, categories: dict[int, int]) -> list[dict]:
    return [{"id": i, "category_id": c, "area": int((ids == i).sum()), "bbox": [0, 0, 1, 1], "iscrowd": 0}
            for i, c in categories.items()]


def hand_made_case():
    """Two 8x8 images: ground truth and prediction id maps with their categories."""
    gt1 = np.full((8, 8), 2)
    gt1[:4, :4] = 1
    pred1 = np.full((8, 8), 2)
    pred1[:4, :3] = 1                                      # thing a: IoU 12/16, stuff: IoU 48/52
    gt2 = np.full((8, 8), 3)
    gt2[:, :2] = 1
    gt2[4:, 4:] = 2
    gt2[:2, 6:] = 0                                        # void
    pred2 = np.full((8, 8), 3)
    pred2[:, :2] = 1                                       # right pixels, wrong class (a instead of b)
    pred2[4:, 4:] = 2
    return {
        1: (gt1, {1: 1, 2: 3}, pred1, {1: 1, 2: 3}),
        2: (gt2, {1: 2, 2: 1, 3: 3}, pred2, {1: 1, 2: 1, 3: 3}),
    }


def write_ground_truth(folder, case) -> dict:
    (folder / "gt").mkdir()
    annotations = []
    for image_id, (gt, gt_categories, _, _) in case.items():
        name = f"{image_id:04d}.png"
        (folder / "gt" / name).write_bytes(_png(gt))
        annotations.append({"image_id": image_id, "file_name": name, "segments_info": _segments(gt, gt_categories)})
    data = {"images": [{"id": i, "file_name": f"{i:04d}.jpg"} for i in case], "annotations": annotations,
            "categories": CATEGORIES}
    (folder / "gt.json").write_text(json.dumps(data))
    return data


def predictions(case) -> dict[int, dict]:
    return {image_id: {"png_string": _png(pred), "segments_info": _segments(pred, pred_categories)}
            for image_id, (_, _, pred, pred_categories) in case.items()}


def panopticapi_results(folder, gt: dict, preds: dict[int, dict]) -> dict:
    """panopticapi's own pq_compute on the predictions written as files."""
    pq_compute = pytest.importorskip("panopticapi.evaluation", reason=PANOPTICAPI_MISSING).pq_compute
    (folder / "pred").mkdir()
    annotations = []
    for ann in gt["annotations"]:
        (folder / "pred" / ann["file_name"]).write_bytes(preds[ann["image_id"]]["png_string"])
        annotations.append({"image_id": ann["image_id"], "file_name": ann["file_name"],
                            "segments_info": preds[ann["image_id"]]["segments_info"]})
    (folder / "pred.json").write_text(json.dumps({"annotations": annotations}))
    with contextlib.redirect_stdout(io.StringIO()):
        return pq_compute(str(folder / "gt.json"), str(folder / "pred.json"), str(folder / "gt"), str(folder / "pred"))


def _evaluate(gt, folder, preds) -> dict:
    evaluator = PanopticEvaluator(gt, str(folder / "gt"), verbose=False)
    evaluator.update(preds)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    return evaluator.results


def assert_same_results(ours: dict, theirs: dict) -> None:
    for group in ("All", "Things", "Stuff"):
        for metric in ("pq", "sq", "rq", "n"):
            assert ours[group][metric] == pytest.approx(theirs[group][metric], abs=1e-12), (group, metric)


def test_pq_of_a_hand_made_case(tmp_path):
    case = hand_made_case()
    gt = write_ground_truth(tmp_path, case)
    ours = _evaluate(gt, tmp_path, predictions(case))
    # Class a has TPs of IoU 3/4 and 1 and one FP: PQ = 1.75 / 2.5; class b one FN; the stuff
    # class has TPs of IoU 48/52 and 1 (the void pixels of image 2 are not counted).
    assert ours["Things"] == pytest.approx({"pq": (1.75 / 2.5 + 0.0) / 2, "sq": (1.75 / 2 + 0.0) / 2,
                                            "rq": (2 / 2.5 + 0.0) / 2, "n": 2})
    assert ours["Stuff"] == pytest.approx({"pq": (48 / 52 + 1) / 2, "sq": (48 / 52 + 1) / 2, "rq": 1.0, "n": 1})
    assert ours["All"]["n"] == 3


def test_pq_equals_panopticapi_on_a_hand_made_case(tmp_path):
    case = hand_made_case()
    gt = write_ground_truth(tmp_path, case)
    ours = _evaluate(gt, tmp_path, predictions(case))
    assert_same_results(ours, panopticapi_results(tmp_path, gt, predictions(case)))


# ----------------------------------------------------------------------------- synthetic panoptic val
def imperfect_predictions(root, seed: int = 0) -> tuple[dict, str, dict[int, dict]]:
    """The synthetic panoptic val's ground truth, its PNG folder and predictions made from it:
    each image's id map shifted by up to 2 pixels, one segment in three given another
    category, one in five dropped (void), and a spurious square segment in every other image."""
    folder = root / "annotations" / "panoptic_val2017"
    gt = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    categories = [c["id"] for c in gt["categories"]]
    rng = np.random.default_rng(seed)
    preds = {}
    for ann in gt["annotations"]:
        with Image.open(folder / ann["file_name"]) as png:
            ids = np.roll(rgb_to_ids(np.asarray(png.convert("RGB"))), tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
        labels = {}
        for segment in ann["segments_info"]:
            if rng.uniform() < 0.2:
                ids[ids == segment["id"]] = 0
            else:
                swap = rng.uniform() < 1 / 3
                labels[segment["id"]] = int(rng.choice(categories)) if swap else segment["category_id"]
        if rng.uniform() < 0.5:
            y, x = rng.integers(0, min(ids.shape) - 8, size=2)
            ids[y:y + 8, x:x + 8] = 1000
            labels[1000] = int(rng.choice(categories))
        preds[ann["image_id"]] = {"png_string": _png(ids), "segments_info": _segments(ids, labels)}
    return gt, str(folder), preds


def test_pq_equals_panopticapi_on_the_synthetic_panoptic_val(synthetic_panoptic_root, tmp_path):
    assert_pq_equals_panopticapi(Path(synthetic_panoptic_root), tmp_path)


def test_pq_equals_panopticapi_on_the_readme_synthetic_panoptic_val(tmp_path):
    """The val split of docs/panoptic.md's ``python -m datasets.synthetic ... --num_val 200 --seed 0 --panoptic``
    (a split's images do not depend on the size of the other split)."""
    with contextlib.redirect_stdout(io.StringIO()):
        generate(str(tmp_path / "data"), num_train=0, num_val=200, image_size=IMAGE_SIZE, seed=0, panoptic=True)
    assert_pq_equals_panopticapi(tmp_path / "data", tmp_path)


def assert_pq_equals_panopticapi(root: Path, tmp_path: Path) -> None:
    gt, folder, preds = imperfect_predictions(root)
    evaluator = PanopticEvaluator(gt, folder, verbose=False)
    evaluator.update(preds)
    evaluator.accumulate()
    assert 0.1 < evaluator.results["All"]["pq"] < 0.9 and evaluator.results["Stuff"]["n"] > 0
    (tmp_path / "gt").symlink_to(folder)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    assert_same_results(evaluator.results, panopticapi_results(tmp_path, gt, preds))


def test_predictions_are_merged_across_processes(tmp_path, monkeypatch):
    case = hand_made_case()
    gt = write_ground_truth(tmp_path, case)
    everything = _evaluate(gt, tmp_path, predictions(case))
    preds = predictions(case)
    monkeypatch.setattr(panoptic_eval, "all_gather", lambda local: [local, {2: preds[2]}])  # rank 1 saw image 2
    assert _evaluate(gt, tmp_path, {1: preds[1]}) == everything


def test_a_kind_that_never_occurs_gives_minus_one(tmp_path):
    gt_ids = np.zeros((8, 8))
    gt_ids[2:6, 2:6] = 1                                   # one thing, the rest void: no stuff anywhere
    case = {1: (gt_ids, {1: 1}, gt_ids, {1: 1})}
    gt = write_ground_truth(tmp_path, case)
    results = _evaluate(gt, tmp_path, predictions(case))
    assert results["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    assert results["Stuff"] == {"pq": -1.0, "sq": -1.0, "rq": -1.0, "n": 0}


def test_panoptic_row_names():
    stats = {f"ratio_0.5_{key}": {"pq": i, "sq": i + 0.1, "rq": i + 0.2, "n": 3}
             for i, key in enumerate(["PQ_all", "PQ_th", "PQ_st"])}
    row = panoptic_row(stats, "ratio_0.5_")
    assert list(row) == [name for name, _, _ in PQ_NAMES]
    assert row == {"PQ": 0, "SQ": 0.1, "RQ": 0.2, "PQ_th": 1, "SQ_th": 1.1, "RQ_th": 1.2,
                   "PQ_st": 2, "SQ_st": 2.1, "RQ_st": 2.2}
