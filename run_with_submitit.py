"""Submit a PnP-DETR or PnP-ViT run to Slurm through submitit: one process per GPU, on one or more nodes.

    python run_with_submitit.py --nodes 2 --ngpus 8 --config configs/pnp_detr_r50.yaml --coco_path /data/coco
    python run_with_submitit.py --ngpus 0 --tasks_per_node 2 --cpus_per_task 1 --config configs/demo.yaml
    python run_with_submitit.py --nodes 2 --ngpus 8 --config configs/deit_small_pnp.yaml --data_path /data/imagenet

The flags below belong to this launcher; every other flag goes to main.py unchanged. The
processes meet at the job's first node on a port derived from the job id. Slurm signals the
job before its time limit (or on preemption); the job then requeues itself, and the requeued
job resumes from ``output_dir/checkpoint.pth``.
"""
import argparse
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Optional

import submitit
import torch
from submitit.core.utils import FailedJobError

import main
from util.errors import UserError, exit_status

SIGNAL_DELAY_S = 120  # Slurm signals the job this long before its time limit
MAX_REQUEUES_ON_TIMEOUT = 30
PORT_BASE, PORT_RANGE = 15000, 15000  # rendezvous ports 15000-29999, below Linux's ephemeral ports


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "run_with_submitit.py", allow_abbrev=False,
        description="Submit PnP-DETR training or evaluation to Slurm.",
        epilog="Every other flag is passed to main.py (python main.py --help).")
    p.add_argument("--ngpus", default=8, type=int,
                   help="GPUs per node, one process each; 0: a CPU job with --tasks_per_node processes per node "
                        "(default: %(default)s)")
    p.add_argument("--tasks_per_node", default=None, type=int,
                   help="processes per node of a CPU job (--ngpus 0) (default: 1)")
    p.add_argument("--nodes", default=1, type=int, help="number of nodes (default: %(default)s)")
    p.add_argument("--timeout", default=1440, type=int,
                   help="time limit of one job in minutes; then the job requeues itself and resumes "
                        "(default: %(default)s)")
    p.add_argument("--job_dir", default="outputs/submitit/%j",
                   help="submitit's folder (%%j: the job id) for the job's script, pickles and logs; "
                        "also main.py's --output_dir unless one is given (default: %(default)s)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default partition)")
    p.add_argument("--cpus_per_task", default=10, type=int,
                   help="CPUs per process: its threads and data loading workers (default: %(default)s)")
    p.add_argument("--mem_gb", default=None, type=int, help="memory per node in GB (default: the partition's default)")
    p.add_argument("--constraint", default=None, help="Slurm node features to require, e.g. volta32gb")
    p.add_argument("--comment", default=None, help="Slurm job comment")
    return p


def check_launcher_args(args: argparse.Namespace) -> None:
    """Reject impossible launcher flags with a one-line message naming them."""
    for flag in ("nodes", "timeout", "cpus_per_task", "mem_gb", "tasks_per_node"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    if args.ngpus < 0:
        raise UserError(f"--ngpus must be 0 (CPU job) or more, got {args.ngpus}")
    if args.ngpus > 0 and args.tasks_per_node is not None:
        raise UserError(f"--tasks_per_node is for CPU jobs (--ngpus 0); with --ngpus {args.ngpus} "
                        "there is one process per GPU")


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str], argparse.Namespace]:
    """Launcher flags, main.py's argv and main.py's parsed flags.

    main.py's argv starts with the ``--device`` that ``--ngpus`` implies; a contradicting
    ``--device`` on the command line is an error.
    """
    launcher, rest = get_args_parser().parse_known_args(argv)
    check_launcher_args(launcher)
    device = "cuda" if launcher.ngpus > 0 else "cpu"
    main_argv = ["--device", device] + rest
    main_args = main.parse_args(main_argv)
    if not str(main_args.device).startswith(device):
        raise UserError(f"--device {main_args.device} contradicts --ngpus {launcher.ngpus}: use --ngpus 0 "
                        "--tasks_per_node N for a CPU job, --ngpus N for N GPUs per node")
    return launcher, main_argv, main_args


def rendezvous_env(env: submitit.JobEnvironment) -> dict[str, str]:
    """torchrun's variables for this task: ranks from Slurm, the job's first node as master and
    a port derived from the job id (so that jobs sharing a node use different ports)."""
    return {"RANK": str(env.global_rank), "LOCAL_RANK": str(env.local_rank), "WORLD_SIZE": str(env.num_tasks),
            "MASTER_ADDR": env.hostnames[0], "MASTER_PORT": str(PORT_BASE + int(env.raw_job_id) % PORT_RANGE)}


class Trainer:
    """What every task of the job runs: main.py with the job's rendezvous and output folder.

    ``output_dir`` may hold ``%j`` (the job id); ``resume`` is the checkpoint a requeued job
    continues from.
    """

    def __init__(self, main_argv: list[str], output_dir: str, resume: Optional[str] = None):
        self.main_argv = main_argv
        self.output_dir = output_dir
        self.resume = resume

    def job_output_dir(self) -> Path:
        return Path(self.output_dir.replace("%j", submitit.JobEnvironment().job_id))

    def job_argv(self) -> list[str]:
        """main.py's flags in this job: the output folder and, once requeued, ``--resume``."""
        argv = self.main_argv + ["--output_dir", str(self.job_output_dir())]
        return argv + ["--resume", self.resume] if self.resume else argv

    def __call__(self) -> None:
        os.environ.update(rendezvous_env(submitit.JobEnvironment()))
        os.register_at_fork(after_in_child=_ignore_requeue_signal)
        # As many threads as the task has CPUs (torch would take every core of the node).
        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", torch.get_num_threads())))
        code = main.run(self.job_argv())
        if code != 0:
            raise RuntimeError(f"main.py ended with exit status {code}; its error is above in this log")

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 when Slurm signals the time limit or a preemption.

        main.py writes ``checkpoint.pth`` after every epoch and resumes from it by itself; only
        a run started with ``--resume`` (fine-tuning) must be pointed at it explicitly.
        """
        latest = self.job_output_dir() / "checkpoint.pth"
        resume = self.resume
        flags = main.parse_args(self.main_argv)
        if flags.resume and not flags.eval and latest.exists():
            resume = str(latest)
        print(f"requeueing; last finished epoch's checkpoint: {latest if latest.exists() else 'none yet'}",
              flush=True)
        return submitit.helpers.DelayedSubmission(Trainer(self.main_argv, self.output_dir, resume))


def _ignore_requeue_signal() -> None:
    """Run in processes forked from a task (DataLoader workers): Slurm signals every process
    of the job, but only the task itself may checkpoint and requeue."""
    signal.signal(getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}"), signal.SIG_IGN)


def submit(argv: Optional[list[str]] = None) -> tuple[submitit.Job, Trainer]:
    """Submit the job that ``argv`` describes; returns it and its Trainer."""
    launcher, main_argv, main_args = parse_args(argv)
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: run_with_submitit.py submits to Slurm; on one machine use torchrun")
    job_dir = Path(launcher.job_dir).absolute()
    executor = submitit.AutoExecutor(folder=job_dir, cluster="slurm", slurm_max_num_timeout=MAX_REQUEUES_ON_TIMEOUT)
    executor.update_parameters(
        name="pnp_detr", nodes=launcher.nodes, tasks_per_node=launcher.ngpus or launcher.tasks_per_node or 1,
        cpus_per_task=launcher.cpus_per_task, timeout_min=launcher.timeout, slurm_signal_delay_s=SIGNAL_DELAY_S)
    optional = {"gpus_per_node": launcher.ngpus or None, "mem_gb": launcher.mem_gb,
                "slurm_partition": launcher.partition, "slurm_constraint": launcher.constraint,
                "slurm_comment": launcher.comment}
    executor.update_parameters(**{k: v for k, v in optional.items() if v is not None})
    output_dir = str(Path(main_args.output_dir).absolute()) if main_args.output_dir else str(job_dir)
    trainer = Trainer(main_argv, output_dir)
    try:
        job = executor.submit(trainer)
    except FailedJobError as err:
        raise UserError(f"sbatch rejected the job: {str(err).strip().splitlines()[-1]}") from None
    return job, trainer


def run(argv: Optional[list[str]] = None) -> int:
    """Entry point: prints the job id and where its logs and outputs go; bad input ends in one
    line on stderr and exit status 2."""
    def command() -> None:
        job, trainer = submit(argv)
        print(f"submitted job {job.job_id}; rank 0 logs to {job.paths.stdout}")
        print(f"output_dir: {trainer.output_dir.replace('%j', job.job_id)}")

    return exit_status(command)


if __name__ == "__main__":
    sys.exit(run())
