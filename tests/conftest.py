"""Shared pytest fixtures."""
import contextlib
import io
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.synthetic import generate, generate_classification  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: one intra-op thread beats two that fight over a shared 2-core CPU."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def synthetic_params() -> dict:
    """Arguments of ``generate`` for the tiny shared synthetic dataset."""
    return {"num_train": 24, "num_val": 12, "image_size": 96, "seed": 0}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory, synthetic_params) -> str:
    """Folder of a tiny synthetic COCO-layout dataset, generated once per session."""
    root = str(tmp_path_factory.mktemp("synthetic"))
    with contextlib.redirect_stdout(io.StringIO()):
        generate(root, **synthetic_params)
    return root


@pytest.fixture(scope="session")
def synthetic_panoptic_root(tmp_path_factory) -> str:
    """Folder of a tiny synthetic dataset with COCO panoptic annotations (things and stuff)."""
    root = str(tmp_path_factory.mktemp("synthetic_panoptic"))
    with contextlib.redirect_stdout(io.StringIO()):
        generate(root, num_train=12, num_val=4, image_size=48, seed=0, panoptic=True)
    return root


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")
    parser.addoption("--run-system", action="store_true",
                     help="also run tests marked system (as root: install and start a local Slurm)")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_system = pytest.mark.skip(reason="system test (installs and starts a local Slurm as root): run with --run-system")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "system" in item.keywords and not config.getoption("--run-system"):
            item.add_marker(skip_system)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


class HostWaits:
    """Records, while active, every operation that would make the host wait for a GPU.

    The ``meta`` device stands in for the GPU: its tensors have shapes but no values. Recorded
    are reads of a device value (``.item()``, ``int(t)``: they also fail on meta, as they would
    wait on a GPU), blocking copies from the host to the device, and operations that mix device
    tensors with host tensors of one or more dimensions (a blocking copy inside the operation).
    Not seen: tensors made on the device straight from Python numbers (``torch.tensor(x, device=d)``).
    """

    def __init__(self):
        self.found: list[str] = []

    def __enter__(self) -> "HostWaits":
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                recorder._check(func, args, kwargs or {})
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def _check(self, func, args, kwargs) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if t.device.type == "meta"]
        on_host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
        name = str(func)
        if func is torch.ops.aten._local_scalar_dense.default and on_device:
            self.found.append(f"{name}: reads a device value")
        elif func is torch.ops.aten._to_copy.default:
            if tensors[0].device.type == "cpu" and str(kwargs.get("device")) == "meta" and not kwargs.get("non_blocking"):
                self.found.append(f"{name}: blocking copy to the device")
        elif func is torch.ops.aten.copy_.default:
            non_blocking = kwargs.get("non_blocking", len(args) > 2 and args[2])
            if args[0].device.type == "meta" and args[1].device.type == "cpu" and not non_blocking:
                self.found.append(f"{name}: blocking copy to the device")
        elif on_device and on_host:
            self.found.append(f"{name}: takes host tensors {[tuple(t.shape) for t in on_host]} with device ones")


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """A command-line entry point ended with status 2 and one ``error:`` line holding every needle."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


# A tiny PnP-ViT (16 patches of 8 px, the demo width) with DeiT's augmentation, Mixup / CutMix
# and a cosine schedule with warm-up; add --data_path.
TINY_CLASSIFICATION_FLAGS = [
    "--task", "classification", "--vit_arch", "demo", "--input_size", "32", "--patch_size", "8",
    "--pnp_after_block", "1", "--unsample_abstract_number", "3", "--batch_size", "4", "--lr", "1e-3",
    "--weight_decay", "0.05", "--lr_schedule", "cosine", "--warmup_epochs", "1", "--num_workers", "0",
    "--device", "cpu", "--print_freq", "100", "--flops_images", "2",
]


@pytest.fixture(scope="session")
def classification_root(tmp_path_factory) -> str:
    """A tiny synthetic ImageFolder classification set: 12 train / 6 val images of 40 px, 6 classes."""
    root = str(tmp_path_factory.mktemp("synthetic_cls"))
    with contextlib.redirect_stdout(io.StringIO()):
        generate_classification(root, num_train=12, num_val=6, image_size=40, seed=0)
    return root


TINY_FLAGS = [
    "--device", "cpu", "--backbone", "resnet18", "--backbone_weights", "none", "--backbone_last_stage", "3",
    "--eval_size", "64", "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2",
    "--dim_feedforward", "64", "--dropout", "0.0", "--num_queries", "6", "--unsample_abstract_number", "4",
    "--lr", "1e-3", "--lr_backbone", "1e-3", "--batch_size", "4", "--num_workers", "0", "--print_freq", "100",
]


@pytest.fixture
def tiny_flags(synthetic_root) -> list[str]:
    """Flags of a tiny CPU model on the shared synthetic dataset (seconds per epoch)."""
    return TINY_FLAGS + ["--coco_path", synthetic_root]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, synthetic_root) -> tuple:
    """A tiny PnP-DETR trained 2 epochs, then evaluated at two ratios: its output folder and flags.

    Its checkpoint.pth is read by other tests; only test_main's --eval runs rewrite eval.json.
    """
    import main

    out = tmp_path_factory.mktemp("run")
    flags = TINY_FLAGS + ["--coco_path", synthetic_root, "--output_dir", str(out)]
    assert main.run(flags + ["--epochs", "2", "--eval_ratios", "0.4", "0.9"]) == 0
    assert main.run(flags + ["--eval", "--eval_ratios", "0.3", "1.0"]) == 0
    return out, flags
