"""The training data mixture: a seeded, streaming, weighted interleaving of several sources.

``Mixture(MixtureConfig(sources=[{name, weight}, ...], seed), {name: source})`` is an endless
iterator. Each next sample comes from source ``i`` with probability ``weight_i / sum(weights)``
(to mimic the official "copies" of a dataset in a ConcatDataset, use ``copies x size`` as the
weight). Nothing is materialised: each source is read one item at a time, and a source that
runs out starts again from its beginning (one more epoch of that source, counted in ``epochs``).

A source is a re-iterable (a list, a reader: ``iter()`` gives a fresh pass each time) or a
factory ``epoch -> iterable`` (e.g. to reshuffle per epoch with ``seed + epoch``). A one-shot
iterator (a generator object) is refused: it cannot restart.

The choice of source at step ``t`` depends only on ``(seed, t)``, so the position in the data
is just ``t`` and, per source, (epoch, items consumed in that epoch). ``state_dict()`` holds
those numbers; ``load_state_dict()`` on a fresh ``Mixture`` with the same config and sources
makes the next samples exactly those an uninterrupted run would have given (a source is
re-opened at its epoch and fast-forwarded by reading past the consumed items). The state
counts samples returned by ``next``: save it at a step boundary, not while a prefetching loader
holds samples that the step has not used.

``worker_shard(iterable, rank, world_size)`` keeps every ``world_size``-th item starting at
``rank``: the shards of the workers are disjoint and together cover the iterable. Shard each
source (``lambda epoch: worker_shard(source(epoch), rank, world_size)``) so that every worker
reads and decodes only its own part.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import numpy as np

__all__ = ["MixtureSource", "MixtureConfig", "Mixture", "worker_shard"]

T = TypeVar("T")
Source = Iterable[Any] | Callable[[int], Iterable[Any]]

STATE_VERSION = 1
_BLOCK = 4096            # source choices drawn per block, from a generator seeded with (seed, block)


@dataclass
class MixtureSource:
    name: str = ""
    weight: float = 1.0


@dataclass
class MixtureConfig:
    sources: list[MixtureSource] = field(default_factory=list)
    seed: int = 0

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("mixture.sources is empty: list at least one {name, weight}")
        names = [s.name for s in self.sources]
        for i, s in enumerate(self.sources):
            if not s.name:
                raise ValueError(f"mixture.sources[{i}].name is empty: give every source a name")
            if not math.isfinite(s.weight) or s.weight < 0:
                raise ValueError(f"mixture.sources[{i}].weight must be a finite number >= 0, got {s.weight}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"mixture.sources: names {dup} appear more than once")
        if sum(s.weight for s in self.sources) <= 0:
            raise ValueError("mixture.sources: the weights sum to 0; give at least one a positive weight")
        if self.seed < 0:
            raise ValueError(f"mixture.seed must be >= 0, got {self.seed}")


def worker_shard(iterable: Iterable[T], rank: int, world_size: int) -> Iterator[T]:
    """Items ``rank, rank + world_size, rank + 2 * world_size, ...`` of ``iterable``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return itertools.islice(iterable, rank, None, world_size)


@dataclass
class _Cursor:
    epoch: int = 0          # completed passes over the source
    position: int = 0       # items consumed in the current pass
    drawn: int = 0          # items returned from this source in total


class Mixture(Iterator[Any]):
    def __init__(self, cfg: MixtureConfig, sources: Mapping[str, Source]):
        cfg.validate()
        names = [s.name for s in cfg.sources]
        missing = [n for n in names if n not in sources]
        extra = [n for n in sources if n not in names]
        if missing or extra:
            raise ValueError(f"mixture sources do not match the config: missing {missing}, "
                             f"not in the config {extra}")
        for name, src in sources.items():
            if not callable(src) and iter(src) is src:
                raise TypeError(f"source {name!r} is a one-shot iterator and cannot restart; give a "
                                "list, a reader, or a factory epoch -> iterable")
        self.cfg = cfg
        self.names = names
        self._sources = dict(sources)
        weights = np.array([s.weight for s in cfg.sources], dtype=np.float64)
        self._cum = np.cumsum(weights / weights.sum())
        self._cum[int(np.flatnonzero(weights > 0)[-1]):] = 1.0   # rounding never picks a zero weight
        self.step = 0
        self._cursors = {n: _Cursor() for n in names}
        self._iters: dict[str, Iterator[Any]] = {}
        self._block_index = -1
        self._block: np.ndarray | None = None

    # -- the source schedule (depends only on seed and step) -----------------------------------
    def source_at(self, step: int) -> str:
        """The name of the source that sample ``step`` comes from."""
        block = step // _BLOCK
        if block != self._block_index:
            u = np.random.default_rng([self.cfg.seed, block]).random(_BLOCK)
            self._block_index = block
            self._block = np.searchsorted(self._cum, u, side="right")
        return self.names[int(self._block[step % _BLOCK])]

    # -- reading ------------------------------------------------------------------------------
    def _open(self, name: str) -> Iterator[Any]:
        src, cur = self._sources[name], self._cursors[name]
        it = iter(src(cur.epoch) if callable(src) else src)
        if cur.position:
            skipped = sum(1 for _ in itertools.islice(it, cur.position))
            if skipped < cur.position:
                raise RuntimeError(f"source {name!r} epoch {cur.epoch} has only {skipped} items, but the "
                                   f"saved state had consumed {cur.position}: the source changed")
        return it

    def _next_from(self, name: str) -> Any:
        cur = self._cursors[name]
        if name not in self._iters:
            self._iters[name] = self._open(name)
        try:
            item = next(self._iters[name])
        except StopIteration:
            if cur.position == 0:
                raise RuntimeError(f"source {name!r} yields no samples (epoch {cur.epoch})") from None
            cur.epoch, cur.position = cur.epoch + 1, 0
            self._iters[name] = self._open(name)
            try:
                item = next(self._iters[name])
            except StopIteration:
                raise RuntimeError(f"source {name!r} yields no samples (epoch {cur.epoch})") from None
        cur.position += 1
        cur.drawn += 1
        return item

    def __iter__(self) -> "Mixture":
        return self

    def __next__(self) -> Any:
        item = self._next_from(self.source_at(self.step))
        self.step += 1
        return item

    # -- bookkeeping --------------------------------------------------------------------------
    @property
    def epochs(self) -> dict[str, int]:
        """Completed passes over each source."""
        return {n: c.epoch for n, c in self._cursors.items()}

    @property
    def drawn(self) -> dict[str, int]:
        """Samples returned from each source so far."""
        return {n: c.drawn for n, c in self._cursors.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "seed": self.cfg.seed,
            "weights": {s.name: float(s.weight) for s in self.cfg.sources},
            "step": self.step,
            "sources": {n: {"epoch": c.epoch, "position": c.position, "drawn": c.drawn}
                        for n, c in self._cursors.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; the config (seed, names, weights) must be the one it was saved with."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"mixture state version {state.get('version')!r}, expected {STATE_VERSION}")
        weights = {s.name: float(s.weight) for s in self.cfg.sources}
        if state["seed"] != self.cfg.seed or dict(state["weights"]) != weights:
            raise ValueError(f"the mixture state was saved with seed {state['seed']} and weights "
                             f"{dict(state['weights'])}, but this mixture has seed {self.cfg.seed} and "
                             f"weights {weights}; resume with the same mixture config")
        for it in self._iters.values():
            close = getattr(it, "close", None)
            if close is not None:
                close()
        self._iters = {}
        self.step = int(state["step"])
        self._cursors = {n: _Cursor(int(s["epoch"]), int(s["position"]), int(s["drawn"]))
                         for n, s in state["sources"].items()}
