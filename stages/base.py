"""The stage contract (datatrove style): a typed config, an optional ``setup()``, one call.

A stage is a small class built from its config. ``setup()`` loads whatever is heavy (a spaCy
pipeline, a teacher network) once per worker, so the orchestrator can run the stage as a Ray
actor; ``__call__`` takes a batch of samples and returns the same samples, in the same order,
updated in place or marked dropped. Stages never import Ray and never drop a sample from the
list: accounting is the writer's job and needs every attempted sample.

Each stage config carries a :class:`Resources` field (how the orchestrator hosts the stage); it
never changes what the stage computes, so it is left out of the output's config hash.
``stages/registry.py`` finds every stage the DAG can run (``stages/NAME.py`` declaring ``STAGE``); ``docs/stage_contract.md`` tells how to
add one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from stages.schema import DropReason, Sample


@dataclass
class Resources:
    """How the orchestrator hosts a stage (never what it computes).

    ``actors = 0``: the stage runs inside the shard's Ray task (set up per shard: for cheap,
    stateless stages such as ingest); ``actors >= 1``: that many long-lived actors, each calling
    ``setup()`` once. ``num_cpus`` is per task or actor (fractions share a core);
    ``num_gpus`` is per actor and used only when the cluster has GPUs, else the stage runs on
    CPU.
    """
    actors: int = 0
    num_cpus: float = 0.5
    num_gpus: float = 0.0

    def validate(self) -> None:
        if not isinstance(self.actors, int) or isinstance(self.actors, bool) or self.actors < 0:
            raise ValueError(f"resources.actors must be an integer >= 0 (0 = inside the shard's task), "
                             f"got {self.actors!r}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("resources.num_cpus and resources.num_gpus must be >= 0")
        if self.num_gpus and not self.actors:
            raise ValueError("resources.num_gpus needs resources.actors >= 1 (a GPU model is loaded "
                             "once per actor)")


@runtime_checkable
class Stage(Protocol):
    name: ClassVar[str]

    def setup(self) -> None: ...

    def __call__(self, batch: list[Sample]) -> list[Sample]: ...


class BaseStage:
    """Convenience base: ``setup`` is a no-op and per-sample errors become ``stage_error`` drops."""

    name: ClassVar[str] = "stage"          # the stage's name in a run config's stages: (= its module's)
    config_class: ClassVar[type]           # the typed config it is built from
    config: Any

    def __init__(self, config: Any = None) -> None:
        self.config = config
        self._ready = False

    def setup(self) -> None:
        self._ready = True

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        self.ensure_setup()
        for sample in batch:
            if not sample.kept:
                continue
            try:
                self.process(sample)
            except Exception as exc:  # bad input must never stop the run
                sample.drop(DropReason.STAGE_ERROR, f"{self.name}: {type(exc).__name__}: {exc}")
        return batch

    def process(self, sample: Sample) -> None:  # pragma: no cover - overridden
        raise NotImplementedError
