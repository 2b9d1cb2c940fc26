"""run_with_submitit.py: flag handling, the task's rendezvous and requeue (fast), then real
Slurm jobs on a local one-node cluster (system tests: --run-system, as root on Debian)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch

import run_with_submitit
from conftest import TINY_FLAGS

REPO = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = REPO / "tests" / "slurm"
# 2 CPU processes on the one node; 24 training images in batches of 4: 3 iterations per process.
LAUNCH = ["--ngpus", "0", "--tasks_per_node", "2", "--cpus_per_task", "1", "--timeout", "10"]


def _slurm_task_env(monkeypatch, job_id: str = "123456", nodes: str = "gpu[07-08]") -> None:
    """The variables that srun gives task 3 (local 1) of a 4-task job started by submitit."""
    for name, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": job_id, "SLURM_PROCID": "3",
                        "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2",
                        "SLURM_JOB_NODELIST": nodes}.items():
        monkeypatch.setenv(name, value)


def test_launcher_flags_are_split_from_main_flags():
    launcher, main_argv, main_args = run_with_submitit.parse_args(
        ["--ngpus", "0", "--tasks_per_node", "2", "--epochs", "3", "--nodes", "2", "--coco_path", "data/x"])
    assert (launcher.ngpus, launcher.tasks_per_node, launcher.nodes) == (0, 2, 2)
    assert main_argv == ["--device", "cpu", "--epochs", "3", "--coco_path", "data/x"]
    assert (main_args.epochs, main_args.device) == (3, "cpu")


@pytest.mark.parametrize("argv,flag", [
    (["--nodes", "0"], "--nodes"),
    (["--ngpus", "-1"], "--ngpus"),
    (["--timeout", "0"], "--timeout"),
    (["--ngpus", "8", "--tasks_per_node", "2"], "--tasks_per_node"),
    (["--ngpus", "8", "--device", "cpu"], "--device cpu"),
    (["--ngpus", "0", "--device", "cuda"], "--device cuda"),
])
def test_bad_launcher_flags_end_in_one_line(argv, flag, capsys):
    assert run_with_submitit.run(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], lines


def test_a_machine_without_slurm_is_told_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert run_with_submitit.run(["--ngpus", "0"]) == 2
    assert "sbatch not found" in capsys.readouterr().err


def test_rendezvous_uses_the_job_node_list_and_a_port_from_the_job_id(monkeypatch):
    _slurm_task_env(monkeypatch)
    env = run_with_submitit.rendezvous_env(submitit.JobEnvironment())
    assert env == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(15000 + 123456 % 15000)}
    _slurm_task_env(monkeypatch, job_id="123457")
    assert run_with_submitit.rendezvous_env(submitit.JobEnvironment())["MASTER_PORT"] != env["MASTER_PORT"]


@pytest.mark.parametrize("flags,resumes_from_output", [
    ([], False),  # main.py finds output_dir/checkpoint.pth by itself
    (["--resume", "detr.pth"], True),  # fine-tuning: the requeued job must not restart from detr.pth
    (["--resume", "detr.pth", "--eval"], False),
])
def test_requeue_continues_from_the_last_checkpoint(monkeypatch, tmp_path, flags, resumes_from_output):
    _slurm_task_env(monkeypatch, job_id="42")
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "checkpoint.pth").touch()
    trainer = run_with_submitit.Trainer(["--device", "cpu"] + flags, str(tmp_path / "%j"))
    requeued = trainer.checkpoint().function
    expected = ["--device", "cpu", *flags, "--output_dir", str(tmp_path / "42")]
    if resumes_from_output:
        expected += ["--resume", str(tmp_path / "42" / "checkpoint.pth")]
    assert requeued.job_argv() == expected


# ----------------------------------------------------------------------------- system tests
@pytest.fixture(scope="module")
def slurm_env():
    """Environment for Slurm clients of the local cluster (started here if not yet running)."""
    started = subprocess.run(["bash", str(SLURM_SCRIPTS / "start_local_slurm.sh")], capture_output=True, text=True)
    if started.returncode == 3:
        pytest.skip(f"Slurm cannot be installed here: {started.stderr.strip().splitlines()[-1]}")
    assert started.returncode == 0, started.stderr
    conf = started.stdout.strip().removeprefix("export SLURM_CONF=")
    yield {**os.environ, "SLURM_CONF": conf, "OMP_NUM_THREADS": "1"}
    if "already running" not in started.stderr:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop_local_slurm.sh")], check=True)


def _submit(env: dict, flags: list[str]) -> str:
    """``python run_with_submitit.py LAUNCH FLAGS``; returns the job id."""
    result = subprocess.run([sys.executable, "run_with_submitit.py", *LAUNCH, *flags], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return re.search(r"submitted job (\d+)", result.stdout).group(1)


def _job(env: dict, job_id: str) -> dict[str, str]:
    """``scontrol show job``'s fields, e.g. JobState and Restarts."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                           check=True).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def _wait(env: dict, job_id: str, done, what: str, timeout_s: float = 240) -> None:
    """Poll until ``done()``; a job that failed or took too long fails the test."""
    deadline = time.time() + timeout_s
    while not done():
        state = _job(env, job_id)["JobState"]
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), f"job {job_id} {state} before {what}"
        if time.time() > deadline:
            subprocess.run(["scancel", job_id], env=env)
            pytest.fail(f"job {job_id} still {state} after {timeout_s} s, waiting for {what}")
        time.sleep(0.5)


def _wait_until_completed(env: dict, job_id: str) -> None:
    _wait(env, job_id, lambda: _job(env, job_id)["JobState"] == "COMPLETED", "completion")


def _epochs(out: Path) -> list[int]:
    log = out / "log.txt"
    return [json.loads(line)["epoch"] for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.system
def test_slurm_job_with_two_tasks_trains_and_rank_0_writes(slurm_env, synthetic_root, tmp_path):
    job_id = _submit(slurm_env, ["--job_dir", f"{tmp_path}/%j", *TINY_FLAGS, "--coco_path", synthetic_root,
                                 "--epochs", "2", "--eval_ratios", "0.5"])
    _wait_until_completed(slurm_env, job_id)
    out = tmp_path / job_id  # --output_dir defaults to the job's folder
    assert _epochs(out) == [0, 1]
    assert len(json.loads((out / "log.txt").read_text().splitlines()[-1])["test_ratio_0.5_coco_eval_bbox"]) == 12
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
    rank0, rank1 = ((out / f"{job_id}_{task}_log.out").read_text() for task in (0, 1))
    assert "Epoch: [1] [3/3]" in rank0 and "Box AP at poll ratio 0.5" in rank0
    assert "Epoch:" not in rank1 and "Job completed successfully" in rank1


INTERRUPTIONS = {
    # What Slurm sends before the time limit (submitit's --signal=USR2@120): submitit checkpoints and requeues.
    "time limit": [["scancel", "--signal=USR2"]],
    # Slurm requeues the job by itself: SIGTERM (which submitit ignores), SIGKILL KillWait seconds later.
    # Suspending the job first freezes it at once, so that the requeue lands mid-training on any machine;
    # a job requeued while suspended is held until released.
    "scontrol requeue": [["scontrol", "suspend"], ["scontrol", "requeue"], ["scontrol", "release"]],
}


@pytest.mark.system
@pytest.mark.parametrize("interruption", INTERRUPTIONS)
def test_requeued_job_resumes_from_its_checkpoint(slurm_env, synthetic_root, tmp_path, interruption):
    out = tmp_path / "out"
    job_id = _submit(slurm_env, ["--job_dir", f"{tmp_path}/%j", *TINY_FLAGS, "--coco_path", synthetic_root,
                                 "--output_dir", str(out), "--epochs", "12", "--eval_every", "0",
                                 "--num_workers", "1"])  # a worker gets Slurm's signals too
    _wait(slurm_env, job_id, lambda: len(_epochs(out)) >= 2, "its second epoch")
    for command in INTERRUPTIONS[interruption]:
        subprocess.run(command + [job_id], env=slurm_env, check=True)
    _wait_until_completed(slurm_env, job_id)

    assert _job(slurm_env, job_id)["Restarts"] == "1"
    assert _epochs(out) == list(range(12)), "every epoch once: none lost, none repeated"
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 11
    rank0 = (tmp_path / job_id / f"{job_id}_0_log.out").read_text()
    starts = [int(first) for first in re.findall(r"training epochs (\d+)\.\.11", rank0)]
    assert len(starts) == 2 and starts[0] == 0 and 2 <= starts[1] < 12, f"runs started at epochs {starts}"
    assert f"resuming from {out / 'checkpoint.pth'}" in rank0
    if interruption == "time limit":  # submitit's checkpoint() ran in the task, not in its worker
        assert rank0.count("requeueing; last finished epoch's checkpoint") == 1
