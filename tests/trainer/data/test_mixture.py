"""The training mixture: proportions, determinism, epochs, resume, worker shards."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from core import config as typed_config
from trainer.data.mixture import Mixture, MixtureConfig, MixtureSource, worker_shard

SIZES = {"o365": 13, "goldg": 50, "cc3m": 7}


def config(weights=(1.0, 2.0, 7.0), seed=0) -> MixtureConfig:
    return MixtureConfig(sources=[MixtureSource(n, w) for n, w in zip(SIZES, weights)], seed=seed)


def shuffled_source(name: str):
    """A factory: a fresh, differently shuffled pass per epoch (as a reader would give)."""
    def factory(epoch: int):
        order = np.random.default_rng([7, epoch]).permutation(SIZES[name])
        return ((name, epoch, int(i)) for i in order)
    return factory


def sources():
    return {"o365": [("o365", i) for i in range(SIZES["o365"])],    # a plain re-iterable
            "goldg": shuffled_source("goldg"), "cc3m": shuffled_source("cc3m")}


def take(mixture: Mixture, n: int) -> list:
    return list(itertools.islice(mixture, n))


def test_config_from_yaml_dict_and_validation():
    cfg = typed_config.from_dict(MixtureConfig, {"seed": 3, "sources": [
        {"name": "o365", "weight": 2}, {"name": "goldg", "weight": 1.5}]})
    assert cfg.sources[0] == MixtureSource("o365", 2.0) and cfg.seed == 3
    cfg.validate()
    for bad, match in [([], "empty"), ([MixtureSource("a", 1), MixtureSource("a", 2)], "more than once"),
                       ([MixtureSource("a", -1)], ">= 0"), ([MixtureSource("a", 0)], "sum to 0"),
                       ([MixtureSource("", 1)], "name is empty")]:
        with pytest.raises(ValueError, match=match):
            MixtureConfig(sources=bad).validate()
    with pytest.raises(ValueError, match="missing"):
        Mixture(config(), {"o365": [1]})


def test_proportions_follow_the_weights_and_epochs_are_counted():
    mixture = Mixture(config(), sources())
    items = take(mixture, 20000)
    names = np.array([it[0] for it in items])
    for name, p in zip(SIZES, (0.1, 0.2, 0.7)):
        assert abs(np.mean(names == name) - p) < 0.012
    drawn = mixture.drawn
    assert sum(drawn.values()) == 20000 and mixture.step == 20000
    for name, size in SIZES.items():
        assert drawn[name] == int(np.sum(names == name))
        assert mixture.epochs[name] == drawn[name] // size
    # within one epoch a source gives each of its items once: the stream restarts, never repeats early
    cc = [it for it in items if it[0] == "cc3m"]
    for e in range(5):
        assert sorted(i for _, ep, i in cc if ep == e) == list(range(SIZES["cc3m"]))
    o365 = [it for it in items if it[0] == "o365"]
    assert o365[:26] == [("o365", i) for i in range(13)] * 2


def test_zero_weight_source_is_never_drawn():
    mixture = Mixture(config(weights=(1.0, 0.0, 0.0)), sources())
    assert {it[0] for it in take(mixture, 3000)} == {"o365"}


def test_determinism_by_seed():
    a = take(Mixture(config(seed=5), sources()), 3000)
    b = take(Mixture(config(seed=5), sources()), 3000)
    c = take(Mixture(config(seed=6), sources()), 3000)
    assert a == b
    assert a != c


@pytest.mark.parametrize("stop", [1, 999, 4096, 5000])
def test_resume_from_state_dict_continues_with_the_identical_next_samples(stop):
    reference = take(Mixture(config(), sources()), stop + 1500)
    first = Mixture(config(), sources())
    assert take(first, stop) == reference[:stop]
    state = json.loads(json.dumps(first.state_dict()))      # survives a JSON checkpoint
    resumed = Mixture(config(), sources())
    resumed.load_state_dict(state)
    assert take(resumed, 1500) == reference[stop:]
    first_more = take(first, 1500)
    assert first_more == reference[stop:]
    assert resumed.state_dict() == first.state_dict()


def test_resume_refuses_another_config():
    m = Mixture(config(), sources())
    take(m, 10)
    other = Mixture(config(seed=1), sources())
    with pytest.raises(ValueError, match="same mixture config"):
        other.load_state_dict(m.state_dict())
    other = Mixture(config(weights=(1.0, 1.0, 1.0)), sources())
    with pytest.raises(ValueError, match="same mixture config"):
        other.load_state_dict(m.state_dict())


def test_unusable_sources_are_reported():
    with pytest.raises(TypeError, match="one-shot"):
        Mixture(config(), dict(sources(), o365=iter([1, 2])))
    m = Mixture(config(weights=(1.0, 0.0, 0.0)), dict(sources(), o365=[]))
    with pytest.raises(RuntimeError, match="'o365' yields no samples"):
        next(m)


def test_worker_shards_are_disjoint_and_cover_everything():
    data = list(range(103))
    for world in (1, 2, 4, 7):
        shards = [list(worker_shard(data, rank, world)) for rank in range(world)]
        flat = [x for s in shards for x in s]
        assert sorted(flat) == data and len(flat) == len(set(flat))
        assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    with pytest.raises(ValueError):
        worker_shard(data, 2, 2)


def test_sharded_sources_in_a_mixture_give_each_worker_its_own_part():
    world = 3
    seen = []
    for rank in range(world):
        src = {name: (lambda epoch, f=shuffled_source(name), r=rank: worker_shard(f(epoch), r, world))
               for name in SIZES}
        m = Mixture(config(seed=rank), src)
        items = take(m, 600)
        seen.append({it for it in items if it[1] == 0})       # first epoch of every source
    for a, b in itertools.combinations(seen, 2):
        assert not a & b
    union = set().union(*seen)
    for name, size in SIZES.items():
        assert {i for n, _, i in union if n == name} == set(range(size))
