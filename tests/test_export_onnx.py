"""tools/export_onnx.py: tiny DETR, PnP-DETR and panoptic exports checked with ONNX Runtime; predict.py on them."""
import json
import sys
from pathlib import Path

import pytest
import torch

import main
import predict
from models import build_model
from util.checkpoint import plain_args
from tools import export_onnx
from util.onnx import OnnxDetector, SingleImageDetector, max_differences, session
from conftest import TINY_FLAGS, assert_one_line_error

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

RATIO = 0.4
SIZES = [(64, 96), (80, 64)]  # each exported graph is checked again on two sizes, neither of them traced


def _export(checkpoint: Path, out: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = export_onnx.run(["--checkpoint", str(checkpoint), "--output", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _checkpoint(tmp_path: Path, name: str, flags: list[str]) -> tuple[Path, torch.nn.Module]:
    args = main.parse_args(TINY_FLAGS + ["--num_classes", "5"] + flags)
    torch.manual_seed(0)
    model = build_model(args)[0].eval()
    path = tmp_path / f"{name}.pth"
    torch.save({"model": model.state_dict(), "args": plain_args(args)}, path)
    return path, model


@pytest.fixture(scope="module")
def pnp_export(trained, tmp_path_factory) -> tuple[Path, Path]:
    """The trained tiny PnP-DETR checkpoint and its export at ``RATIO``."""
    out, _ = trained
    onnx = tmp_path_factory.mktemp("onnx") / "pnp.onnx"
    assert export_onnx.run(["--checkpoint", str(out / "checkpoint.pth"), "--ratio", str(RATIO),
                            "--output", str(onnx)]) == 0
    return out / "checkpoint.pth", onnx


def _assert_matches_eager(onnx: Path, model: torch.nn.Module, ratio) -> None:
    detector = OnnxDetector(str(onnx))
    assert detector.ratio == ratio
    differences = max_differences(SingleImageDetector(model, ratio), session(str(onnx)), SIZES, seed=1)
    assert max(differences) < 1e-4, differences


def test_pnp_detr_export_matches_eager_on_two_sizes(pnp_export):
    checkpoint, onnx = pnp_export
    model, _, _ = predict.load_model(str(checkpoint), torch.device("cpu"))
    _assert_matches_eager(onnx, model, RATIO)
    # the graph's fine-token count follows the image size: another ratio's graph gives other outputs
    other = SingleImageDetector(model, 0.9)
    image = torch.randn(1, 3, *SIZES[0])
    with torch.no_grad():
        assert not torch.allclose(other(image)[0], SingleImageDetector(model, RATIO)(image)[0])


def test_detr_export_matches_eager_on_two_sizes_and_reports_it(tmp_path, capsys):
    checkpoint, model = _checkpoint(tmp_path, "detr", ["--no_pnp"])
    onnx = tmp_path / "detr.onnx"
    code, out, err = _export(checkpoint, onnx, capsys, "--ratio", "0.5")
    assert code == 0, err
    assert "--ratio is ignored" in out and "largest absolute difference" in out and f"wrote {onnx}" in out
    _assert_matches_eager(onnx, model, None)


def test_panoptic_export_returns_masks_matching_eager(tmp_path, capsys):
    checkpoint, model = _checkpoint(tmp_path, "panoptic", ["--masks", "--dataset_file", "coco_panoptic"])
    onnx = tmp_path / "panoptic.onnx"
    code, out, err = _export(checkpoint, onnx, capsys, "--size", "64", "64")
    assert code == 0, err
    assert "pred_masks" in out
    assert OnnxDetector(str(onnx)).output_names == ["pred_logits", "pred_boxes", "pred_masks"]
    _assert_matches_eager(onnx, model, model.detr.transformer.sampler.default_ratio)


def test_predict_on_the_export_gives_the_checkpoints_detections(pnp_export, synthetic_root, tmp_path):
    checkpoint, onnx = pnp_export
    reports = {}
    for name, source in (("pth", checkpoint), ("onnx", onnx)):
        out = tmp_path / f"{name}.json"
        extra = ["--sample_topk_ratio", str(RATIO)] if name == "pth" else []
        assert predict.run(["--checkpoint", str(source), str(Path(synthetic_root) / "val2017"), "--device", "cpu",
                            "--threshold", "0", "--output", str(out), *extra]) == 0
        reports[name] = json.loads(out.read_text())
    expected, got = reports["pth"], reports["onnx"]
    assert got["sample_topk_ratio"] == RATIO and got["checkpoint"] == str(onnx)
    assert {k: v for k, v in got.items() if k not in ("images", "checkpoint")} == \
           {k: v for k, v in expected.items() if k not in ("images", "checkpoint")}
    assert len(got["images"]) == len(expected["images"]) > 0
    for entry, reference in zip(got["images"], expected["images"]):
        assert {k: v for k, v in entry.items() if k != "detections"} == \
               {k: v for k, v in reference.items() if k != "detections"}
        assert len(entry["detections"]) == len(reference["detections"]) == 6  # every query, threshold 0
        for det, ref in zip(entry["detections"], reference["detections"]):
            assert (det["category_id"], det["category"]) == (ref["category_id"], ref["category"])
            assert det["score"] == pytest.approx(ref["score"], abs=1.01e-4)  # both rounded to 1e-4
            assert det["bbox"] == pytest.approx(ref["bbox"], abs=0.0101)  # both rounded to 0.01


@pytest.mark.parametrize("extra,needles", [
    (["--batch_size", "2"], ["--batch_size", "one image at a time"]),
    (["--sample_topk_ratio", "0.9"], ["--sample_topk_ratio", f"r={RATIO}", "--ratio 0.9"]),
    (["--show_poll", "--draw", "pictures"], ["--show_poll", "exported graph"]),
])
def test_predict_flags_an_export_cannot_follow_are_named(pnp_export, synthetic_root, capsys, extra, needles):
    _, onnx = pnp_export
    code = predict.run(["--checkpoint", str(onnx), str(Path(synthetic_root) / "val2017"), *extra])
    assert_one_line_error(code, capsys.readouterr().err, str(onnx), *needles)


@pytest.mark.parametrize("package", ["onnx", "onnxruntime", "onnxscript"])
def test_a_missing_package_is_named_in_one_line(trained, tmp_path, capsys, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # import then raises ImportError
    out = tmp_path / "model.onnx"
    code, _, err = _export(trained[0] / "checkpoint.pth", out, capsys)
    assert_one_line_error(code, err, f"'{package}'", f"pip install {package}")
    assert not out.exists()


def test_predict_without_onnxruntime_names_it(pnp_export, synthetic_root, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code = predict.run(["--checkpoint", str(pnp_export[1]), str(Path(synthetic_root) / "val2017")])
    assert_one_line_error(code, capsys.readouterr().err, "'onnxruntime'", "pip install onnxruntime")


def test_an_export_over_the_tolerance_is_not_written(trained, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    code, _, err = _export(trained[0] / "checkpoint.pth", out, capsys, "--tolerance", "1e-12", "--size", "64", "64")
    assert_one_line_error(code, err, "--tolerance", f"{out} was not written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra,needles", [
    (["--ratio", "1.5"], ["--ratio", "(0, 1]"]),
    (["--size", "32", "96"], ["--size", "at least 64"]),
    (["--tolerance", "0"], ["--tolerance"]),
])
def test_bad_flags_end_in_one_line(trained, tmp_path, capsys, extra, needles):
    code, _, err = _export(trained[0] / "checkpoint.pth", tmp_path / "model.onnx", capsys, *extra)
    assert_one_line_error(code, err, *needles)


def test_an_output_file_not_ending_in_onnx_is_named(trained, tmp_path, capsys):
    code, _, err = _export(trained[0] / "checkpoint.pth", tmp_path / "model.pth", capsys)
    assert_one_line_error(code, err, "--output:", ".onnx")


def test_out_still_names_the_output_file():
    args = export_onnx.get_args_parser().parse_args(["--checkpoint", "c.pth", "--out", "model.onnx"])
    assert args.output == "model.onnx"


def test_a_file_without_the_export_metadata_is_named(synthetic_root, tmp_path, capsys):
    onnx_module = pytest.importorskip("onnx")
    plain = tmp_path / "plain.onnx"
    graph = onnx_module.helper.make_graph(
        [onnx_module.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx_module.helper.make_tensor_value_info("x", onnx_module.TensorProto.FLOAT, [1])],
        [onnx_module.helper.make_tensor_value_info("y", onnx_module.TensorProto.FLOAT, [1])])
    onnx_module.save(onnx_module.helper.make_model(graph), plain)
    code = predict.run(["--checkpoint", str(plain), str(Path(synthetic_root) / "val2017")])
    assert_one_line_error(code, capsys.readouterr().err, str(plain), "not a file written by tools/export_onnx.py")


def test_an_exporter_failure_ends_in_one_line_and_keeps_the_earlier_file(trained, tmp_path, capsys, monkeypatch):
    def failing_export(model, ratio, path, size, metadata):
        Path(path).write_bytes(b"half a graph")
        raise RuntimeError("Unsupported operator aten::something\nwith many\nmore lines")

    monkeypatch.setattr(export_onnx, "export", failing_export)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier export")
    code, _, err = _export(trained[0] / "checkpoint.pth", out, capsys)
    assert_one_line_error(code, err, "--checkpoint", "RuntimeError: Unsupported operator aten::something")
    assert "many" not in err
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
