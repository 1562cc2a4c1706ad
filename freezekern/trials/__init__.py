"""Training at equal compute: arms, the schedule, ``compare``, the probe, ``finetune``.

Public face: ``Arm``, ``train_arm``, ``run_trials``, ``compare``, ``format_table``,
``probe_plan``, ``time_steps``, ``Schedule``, ``finetune``.
"""

from freezekern.trials.arms import DEFAULT_CHECKPOINTS, Arm, ArmResult, arm_step_cost
from freezekern.trials.compare import CompareResult, arms_for, compare, format_table, recommend, run_trials
from freezekern.trials.engine import train_arm
from freezekern.trials.probe import probe_candidates, probe_plan
from freezekern.trials.schedule import Schedule
from freezekern.trials.timing import time_steps

__all__ = ["DEFAULT_CHECKPOINTS", "Arm", "ArmResult", "CompareResult", "Schedule", "arm_step_cost", "arms_for", "compare", "format_table",
           "probe_candidates", "probe_plan", "recommend", "run_trials", "time_steps", "train_arm"]
