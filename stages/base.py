"""The stage contract (datatrove style): a typed config, an optional ``setup()``, one call.

A stage is a small class built from its config. ``setup()`` loads whatever is heavy (a spaCy
pipeline, a teacher network) once per worker, so the orchestrator can run the stage as a Ray
actor; ``__call__`` takes a batch of samples and returns the same samples, in the same order,
updated in place or marked dropped. Stages never import Ray and never drop a sample from the
list: accounting is the writer's job and needs every attempted sample.
"""
from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from stages.schema import DropReason, Sample


@runtime_checkable
class Stage(Protocol):
    name: ClassVar[str]

    def setup(self) -> None: ...

    def __call__(self, batch: list[Sample]) -> list[Sample]: ...


class BaseStage:
    """Convenience base: ``setup`` is a no-op and per-sample errors become ``stage_error`` drops."""

    name: ClassVar[str] = "stage"
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
