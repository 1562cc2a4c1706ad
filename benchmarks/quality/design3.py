"""Study v3's design: its settings, its arms, the learning-rate grid and the order of its jobs.

What the study trains (``study3.py``) and what it reports (``report3.py``) both read the design from here;
nothing here trains or loads a model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from runs import run_key
from tasks import NEW_TASKS, TASKS

from freezekern.trials import Arm
from freezekern.trials.schedule import Schedule

ALL_TASKS = {**TASKS, **NEW_TASKS}
MOVING = {"start": 0, "begin": 0.1, "finish": 0.6}
SCHEDULE = Schedule(warmup=0.05, decay="cosine", weight_decay=0.1)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every process working on one OUT folder must agree on (``settings.json``)."""

    budget: float  # full-step equivalents per final run
    sizes: dict  # task -> (seq_len, batch_size, train_tokens, eval_tokens, calib_tokens)
    full_lrs: tuple = (3e-5, 1e-4, 3e-4)
    lora_lrs: tuple = (3e-4, 1e-3, 3e-3)
    seeds: tuple = (0, 1)
    grid_share: float = 0.25
    checkpoints: tuple = tuple(round(0.1 * i, 1) for i in range(1, 11))
    grid_checkpoints: tuple = (0.5, 1.0)
    grid_extend: int = 2  # half-decades a grid may grow past an edge where its best rate lies, on each side
    schedule: dict = dataclasses.field(default_factory=SCHEDULE.to_dict)
    moving: dict = dataclasses.field(default_factory=lambda: dict(MOVING))
    model: str = "smollm2-135m-instruct"

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, as read back


MANY = 10 ** 9  # every example, once
FULL = Settings(budget=150.0, sizes={"code": (64, 4, 128 * 1024, 2048, 2048), "chat": (64, 4, MANY, 6144, 2048),
                                     "classify": (48, 8, MANY, MANY, 2048),
                                     "speeches": (64, 4, 128 * 1024, 2048, 2048)})
QUICK = Settings(budget=4.0, sizes={"code": (32, 2, 8 * 64, 128, 128), "chat": (64, 2, 8 * 128, 256, 256),
                                    "classify": (32, 2, 16 * 32, 256, 128), "speeches": (32, 2, 8 * 64, 128, 128)},
                 full_lrs=(3e-3,), lora_lrs=(1e-2,), checkpoints=(0.5, 1.0), grid_extend=0,
                 model="tiny llama (6 blocks, hidden 64)")


# -- arms and their learning rates ---------------------------------------------------------------

def arms_for(plans: dict, moving: dict) -> dict[str, Arm]:
    """Arm name -> Arm (learning rate a placeholder until the grid chooses it), in the report's order."""
    num_layers = plans["num_layers"]
    default = plans["plans"]["gain_share/cosine"]["boundary"]
    salf = plans["plans"]["salf/cosine"]["boundary"]
    arms = {
        "full": Arm("full", None),
        "freeze half": Arm("freeze half", round(num_layers / 2)),
        "shallow L/3": Arm("shallow L/3", round(num_layers / 3)),
        "default": Arm("default", default),
        "salf": Arm("salf", salf),
        "LoRA all": Arm("LoRA all", 0, lora=True),
    }
    if default > moving["start"]:
        arms["moving -> default"] = Arm("moving -> default", default, moving=dict(moving))
    if salf != default and salf > moving["start"]:
        arms["moving -> salf"] = Arm("moving -> salf", salf, moving=dict(moving))
    return arms


def config_key(arm: Arm) -> str:
    """What the arm trains, whatever its name and learning rate."""
    return dataclasses.replace(arm, name="", lr=1.0).key()


def half_decade(lr: float, up: bool) -> float:
    """The next rate of the 1, 3, 10, 30, ... ladder above or below ``lr`` (which must be on it)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = round(lr / 10 ** exponent)
    if mantissa not in (1, 3):
        raise ValueError(f"{lr:g} is not on the 1, 3, 10, 30 ladder")
    if up:
        return float(f"{3 if mantissa == 1 else 1}e{exponent if mantissa == 1 else exponent + 1}")
    return float(f"{1 if mantissa == 3 else 3}e{exponent if mantissa == 3 else exponent - 1}")


def grown_grid(arm: Arm, settings: Settings, runs: dict | None = None,
               task: str | None = None) -> tuple[tuple, dict[float, float] | None]:
    """The arm's rates and, once every one of them has run, their scores (learning rate -> validation loss at
    the end of the grid run; a run that diverged scores infinity), else None. The rates: the base grid,
    extended (given the runs) one half-decade at a time past an edge where the best rate so far lies, at most
    ``settings.grid_extend`` times on each side; in increasing order."""
    grid = sorted(settings.lora_lrs if arm.lora else settings.full_lrs)
    if runs is None:
        return tuple(grid), None
    extended = {False: 0, True: 0}
    while True:
        scores = _scores(runs, task, arm, settings, grid)
        if scores is None:
            return tuple(grid), None
        best = best_rate(scores)
        if best == grid[0] and extended[False] < settings.grid_extend:
            grid.insert(0, half_decade(grid[0], up=False))
            extended[False] += 1
        elif best == grid[-1] and extended[True] < settings.grid_extend:
            grid.append(half_decade(grid[-1], up=True))
            extended[True] += 1
        else:
            return tuple(grid), scores


def lr_grid(arm: Arm, settings: Settings, runs: dict | None = None, task: str | None = None) -> tuple:
    """The arm's rates (``grown_grid``'s first half)."""
    return grown_grid(arm, settings, runs, task)[0]


def best_rate(scores: dict[float, float]) -> float:
    """The rate with the lowest validation loss (the lower rate on a tie)."""
    return min(scores, key=lambda lr: (scores[lr], lr))


def _scores(runs: dict, task: str, arm: Arm, settings: Settings, grid) -> dict[float, float] | None:
    budget = settings.grid_share * settings.budget
    scores = {}
    for lr in grid:
        record = runs.get(run_key(task, dataclasses.replace(arm, lr=lr), 0, budget))
        if record is None:
            return None
        scores[lr] = record["rows"][-1]["validation_loss"] if record.get("rows") else float("inf")
    return scores


def grid_scores(runs: dict, task: str, arm: Arm, settings: Settings) -> dict[float, float] | None:
    """``grown_grid``'s second half: the scores over the arm's whole (extended) grid, None until all have run."""
    return grown_grid(arm, settings, runs, task)[1]


def chosen_lr(runs: dict, task: str, arm: Arm, settings: Settings) -> float | None:
    scores = grid_scores(runs, task, arm, settings)
    return None if scores is None else best_rate(scores)


# -- the queue ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    key: str
    task: str
    stage: str  # plans | grid | final
    arm: Arm | None = None
    seed: int = 0
    budget: float = 0.0


def job_list(tasks: list[str], settings: Settings, out: Path, runs: dict) -> tuple[list[Job], bool]:
    """Every job known now, in the queue's order, and whether the list is complete (no job still unknown
    because the plans or the grid it depends on are not done)."""
    plans_jobs, grid_jobs, finals = [], [], {seed: [] for seed in settings.seeds}
    complete = True
    for name in tasks:
        path = out / f"plans_{name}.json"
        plans_jobs.append(Job(f"plans|{name}", name, "plans"))
        if not path.is_file():
            complete = False
            continue
        arms = arms_for(json.loads(path.read_text()), settings.moving)
        configs = {}
        for arm in arms.values():
            configs.setdefault(config_key(arm), arm)
        for arm in configs.values():
            grid, scores = grown_grid(arm, settings, runs, name)
            for lr in grid:
                tuned = dataclasses.replace(arm, lr=lr)
                budget = settings.grid_share * settings.budget
                grid_jobs.append(Job(run_key(name, tuned, 0, budget), name, "grid", tuned, 0, budget))
            if scores is None:
                complete = False
                continue
            tuned = dataclasses.replace(arm, lr=best_rate(scores))
            for seed in settings.seeds:
                finals[seed].append(Job(run_key(name, tuned, seed, settings.budget), name, "final", tuned, seed,
                                        settings.budget))
    return plans_jobs + grid_jobs + [j for seed in settings.seeds for j in finals[seed]], complete
