"""From a trace to a boundary: the depth law, gains, rules (static and moving), the cost model -> FreezePlan.

Public face: ``plan(trace, policy=...)`` -> ``FreezePlan``; ``MovingSchedule``;
``default_plan`` (what the library trains when the user does not say, by run length);
``freezekern.policy.cost`` (the one step-cost formula); ``freezekern.policy.lora``
(LoRA placement above the boundary).
"""

from freezekern.policy.default import default_plan, default_rule
from freezekern.policy.moving import MovingSchedule, moving_plan, schedule_of
from freezekern.policy.rules import DEFAULT_POLICY, PLAN_FILE, POLICIES, FreezePlan, plan

__all__ = ["DEFAULT_POLICY", "PLAN_FILE", "POLICIES", "FreezePlan", "MovingSchedule", "default_plan", "default_rule",
           "moving_plan", "plan", "schedule_of"]
