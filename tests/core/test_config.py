"""The typed-config machinery: YAML + overrides -> dataclasses, with errors that name the key."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import pytest

from model.config import FusionKind, ModelConfig, load_model_config
from core.config import ConfigError, from_dict, load, merge_overrides, to_dict


class Color(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Inner:
    size: int = 3
    ratio: float = 0.5
    sizes: tuple[int, ...] = (1, 2)
    factors: dict[str, float] = field(default_factory=dict)


@dataclass
class Outer:
    name: str = "x"
    color: Color = Color.RED
    inner: Inner = field(default_factory=Inner)
    path: str | None = None
    flag: bool = False


def test_round_trip_through_dict():
    cfg = Outer(name="y", color=Color.BLUE, inner=Inner(size=7, sizes=(4, 5)), path="p", flag=True)
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_partial_dict_keeps_defaults():
    cfg = from_dict(Outer, {"inner": {"size": 9}})
    assert cfg.inner.size == 9 and cfg.inner.ratio == 0.5 and cfg.name == "x"


def test_unknown_nested_key_is_named_with_the_accepted_ones():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"sise": 9}}, source="a.yaml")
    msg = str(err.value)
    assert "inner.sise" in msg and "a.yaml" in msg and "inner.size" in msg


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"inner\.size.*integer"):
        from_dict(Outer, {"inner": {"size": "big"}})
    with pytest.raises(ConfigError, match="flag.*true or false"):
        from_dict(Outer, {"flag": "yes please"})


def test_enum_lists_accepted_values():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"color": "green"})
    assert "'red'" in str(err.value) and "'blue'" in str(err.value)


def test_int_is_accepted_for_float_but_not_bool_for_int():
    assert from_dict(Inner, {"ratio": 1}).ratio == 1.0
    with pytest.raises(ConfigError):
        from_dict(Inner, {"size": True})


def test_exponent_floats_without_a_dot_are_numbers():
    # YAML 1.1 reads `3e-4` as a string; a user writing lr=3e-4 means the number
    assert load(Inner, None, ["ratio=3e-4"]).ratio == pytest.approx(3e-4)
    assert load(Inner, None, ["ratio=-2E+1"]).ratio == -20.0
    for bad in ("fast", "3e", "1e-4x", ".", "nan"):
        with pytest.raises(ConfigError, match="ratio in overrides: expected a number"):
            load(Inner, None, [f"ratio={bad}"])


def test_typed_mapping_values_are_coerced_and_named():
    assert load(Inner, None, ["factors={a.b: 1e1, c: 2}"]).factors == {"a.b": 10.0, "c": 2.0}
    with pytest.raises(ConfigError, match="factors.a in overrides: expected a number, got 'x'"):
        load(Inner, None, ["factors={a: x}"])


def test_overrides_are_parsed_as_yaml_and_dotted():
    data = merge_overrides({"inner": {"size": 1}}, ["inner.size=4", "inner.sizes=[3, 4]", "path=null",
                                                    "name=hello world"])
    cfg = from_dict(Outer, data)
    assert cfg.inner.size == 4 and cfg.inner.sizes == (3, 4) and cfg.path is None
    assert cfg.name == "hello world"


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        merge_overrides({}, ["inner.size"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(Outer, tmp_path / "nope.yaml")


def test_model_configs_load_and_validate():
    t = load_model_config("glip_t")
    l = load_model_config("glip_l")
    tiny = load_model_config("tiny")
    assert t.head.num_blocks == 6 and l.head.num_blocks == 8
    assert l.backbone.swin.embed_dim == 192 and l.backbone.swin.window_size == 12
    assert t.head.fusion is FusionKind.MHA_B
    assert tiny.head.num_blocks == 2
    with pytest.raises(ConfigError, match="unknown model config"):
        load_model_config("glip_xxl")
    with pytest.raises(ConfigError, match="head.channels"):
        load_model_config("glip_t", ["head.channels=128"])


def test_model_config_round_trips():
    cfg = load_model_config("glip_l")
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


def test_brace_patterns_survive_list_overrides():
    @dataclass
    class Paths:
        shards: list[str] = field(default_factory=list)

    data = merge_overrides({}, ["shards=[data/{00000..00009}.tar, s3://b/{0..3}.tar]"])
    assert from_dict(Paths, data).shards == ["data/{00000..00009}.tar", "s3://b/{0..3}.tar"]
    assert from_dict(Paths, merge_overrides({}, ["shards=data/*.tar"])).shards == ["data/*.tar"]


@dataclass
class _Part:
    n: int = 0

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass
class _Whole:
    out: str = ""
    part: _Part = field(default_factory=_Part)
    items: dict[str, _Part] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.out:
            raise ValueError("out is empty")


def test_deferred_validation_then_validate_tree():
    """A program completing a config (selftrain sets the trainer's output) reads it with
    validation deferred; validate_tree then checks the whole tree, naming the nested key."""
    import dataclasses

    from core.config import validate_tree

    with pytest.raises(ConfigError, match="out is empty"):
        load(_Whole, None, ["part.n=2"])                       # validated at once by default
    cfg = load(_Whole, None, ["part.n=2"], validate=False)
    cfg = dataclasses.replace(cfg, out="x", items={"a": _Part(0)})
    with pytest.raises(ConfigError, match=r"items\.a: n must be >= 1, got 0"):
        validate_tree(cfg)
    validate_tree(dataclasses.replace(cfg, items={"a": _Part(3)}))
    assert load(_Whole, None, ["out=y", "part.n=1"]).out == "y"   # later loads validate again
