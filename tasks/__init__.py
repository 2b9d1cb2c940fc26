"""The tasks main.py and predict.py serve, looked up by ``--task``."""
import argparse

from tasks.base import Prediction, Task
from tasks.classification import ClassificationTask
from tasks.detection import DetectionTask
from util.errors import UserError
from util.flags import get_args_parser

TASKS: dict[str, Task] = {task.name: task for task in (DetectionTask(), ClassificationTask())}


def get_task(name: str) -> Task:
    """The task of ``--task name`` (stored flags of runs older than ``--task`` mean detection)."""
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"--task must be one of {', '.join(TASKS)}, got {name!r}") from None


def check_task_flags(task: Task, args: argparse.Namespace) -> None:
    """Refuse, in one line naming it, a flag that only another task reads and that is set to
    anything but its default; then the task's own checks."""
    defaults = get_args_parser().parse_args([])
    for other in TASKS.values():
        for flag in other.own_flags:
            if other is not task and flag not in task.own_flags and getattr(args, flag) != getattr(defaults, flag):
                raise UserError(f"--{flag} is a {other.name} flag; --task {task.name} does not use it")
    task.check_args(args)


__all__ = ["TASKS", "Prediction", "Task", "check_task_flags", "get_task"]
