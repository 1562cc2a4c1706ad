"""The error of an engine that cannot do what freezekern was asked to do."""


class EngineRefusal(RuntimeError):
    """The engine cannot do what freezekern was asked to do; the message names the engine and the fix."""


def is_deepspeed_object(obj) -> bool:
    """True for an object of DeepSpeed's (its engine, a ZeRO optimizer)."""
    return obj is not None and type(obj).__module__.startswith("deepspeed")
