"""Checkpoints: the official format (every name of the reference manifests) and our own format."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from model.checkpoint import (CheckpointError, load_into, load_official, load_pretrained, official_to_ours,
                              ours_to_official, read_official, save_official, save_pretrained)
from model.config import load_model_config
from model.glip import build_glip

_ROOT = Path(__file__).resolve().parents[2]
# The official parameter manifests ([name, shape] of every tensor of the released GLIP-T and GLIP-L
# checkpoints), kept in tests/model/data/ so the test depends on nothing outside the checkout.
REFERENCE = next((p for p in (Path(os.environ.get("GLIP_REFERENCE_DIR", "/nonexistent")),
                              Path(__file__).resolve().parent / "data")
                  if (p / "glip_t_state_dict.json").is_file()), None)
DROPPED = {"module.rpn.head.cls_logits.weight", "module.rpn.head.cls_logits.bias",
           "module.language_backbone.body.model.embeddings.position_ids"}


def manifest(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """Reference (name, shape) list; ``t_a`` = GLIP-T(A), derived from T: no fusion modules,
    the DyConv of block i at ``dyhead_tower.{i}``."""
    if REFERENCE is None:
        pytest.skip("the reference manifests (tests/model/data/glip_*_state_dict.json) are not here; "
                    "set GLIP_REFERENCE_DIR")
    if name != "t_a":
        return [(k, tuple(s)) for k, s in json.loads((REFERENCE / f"glip_{name}_state_dict.json").read_text())]
    out = []
    for key, shape in manifest("t"):
        m = re.match(r"(module\.rpn\.head\.dyhead_tower\.)(\d+)\.(.*)$", key)
        if m is None:
            out.append((key, shape))
        elif int(m[2]) % 3 == 2:
            out.append((f"{m[1]}{int(m[2]) // 3}.{m[3]}", shape))
    return out


def fake_checkpoint(entries) -> dict[str, torch.Tensor]:
    """Tensors of the listed shapes: random values plus a per-tensor offset, so a swap of two
    same-shaped tensors cannot go unnoticed (one random draw, reused: fast for GLIP-L's 430 M)."""
    largest = max(torch.Size(shape).numel() for _, shape in entries)
    base = torch.rand(largest, generator=torch.Generator().manual_seed(0))
    sd = {}
    for i, (key, shape) in enumerate(entries):
        values = (base[:torch.Size(shape).numel()] + 2 * i).view(shape)
        integer = key.endswith(("relative_position_index", "position_ids"))
        sd[key] = (values * 1000).long() if integer else values
    return sd


CASES = [("glip_t", [], "t"), ("glip_t", ["head.fusion=none"], "t_a"), ("glip_l", [], "l")]


@pytest.mark.parametrize("config, overrides, ref", CASES, ids=["glip_t", "glip_t_a", "glip_l"])
def test_official_checkpoint_loads_strictly_and_exports_back(tmp_path, config, overrides, ref):
    entries = manifest(ref)
    assert len(entries) == {"t": 746, "t_a": 542, "l": 1022}[ref]      # docs/model.md §1, §9
    original = fake_checkpoint(entries)
    torch.save({"model": original, "iteration": 1}, tmp_path / "official.pth")

    model = build_glip(load_model_config(config, overrides), device="meta")
    converted = load_official(tmp_path / "official.pth")
    report = load_into(model, converted, strict=True, assign=True)
    assert report.ok, str(report)
    state = model.state_dict()
    assert len(converted) == len(state) == len(entries) - 3            # all but the documented drops
    assert not any(t.is_meta for t in state.values())                  # every parameter/buffer filled
    for name, tensor in converted.items():
        assert state[name] is tensor or torch.equal(state[name], tensor)

    exported = ours_to_official(state)
    assert set(exported) == set(original) - DROPPED
    for name, tensor in exported.items():
        assert torch.equal(tensor, original[name]), name


def test_names_of_each_part():
    sd = {k: torch.zeros(1) for k, _ in manifest("t")}
    ours = official_to_ours({k[len("module."):]: v for k, v in sd.items()})
    expected = {
        "backbone.fpn.fpn_inner2.weight": "backbone.fpn.lateral.0.weight",
        "backbone.fpn.fpn_layer4.bias": "backbone.fpn.output.2.bias",
        "backbone.fpn.top_blocks.p6.weight": "backbone.fpn.p6.weight",
        "language_backbone.body.model.encoder.layer.3.output.dense.weight": "language.model.encoder.layer.3.output.dense.weight",
        "rpn.head.dyhead_tower.3.b_attn.gamma_v": "head.blocks.1.fusion.gamma_v",
        "rpn.head.dyhead_tower.4.attention.self.query.weight": "head.blocks.1.text_layer.attention.self.query.weight",
        "rpn.head.dyhead_tower.5.DyConv.2.bn.weight": "head.blocks.1.dyconv.convs.2.norm.weight",
        "rpn.head.dyhead_tower.17.AttnConv.1.weight": "head.blocks.5.dyconv.scale_attn.1.weight",
        "rpn.head.dyhead_tower.2.relu.fc.2.bias": "head.blocks.0.dyconv.dyrelu.fc.2.bias",
        "rpn.head.dot_product_projection_text.weight": "head.token_proj.weight",
        "rpn.head.scales.4.scale": "head.scales.4.scale",
        "rpn.anchor_generator.cell_anchors.3": "anchor_generator.cell_anchors.3",
    }
    for official, name in expected.items():
        assert name in ours, official
    assert not any("cls_logits" in k or "position_ids" in k for k in ours)


def test_pooler_is_dropped_and_unknown_keys_are_reported():
    ours = official_to_ours({"language_backbone.body.model.pooler.dense.weight": torch.zeros(2, 2),
                             "rpn.head.something_new": torch.zeros(1)})
    assert ours == {"rpn.head.something_new": ours["rpn.head.something_new"]}


def test_read_official_accepts_bare_dicts_and_strips_module_only_when_all_keys_have_it(tmp_path):
    torch.save({"module.a": torch.zeros(1), "module.b": torch.ones(1)}, tmp_path / "bare.pth")
    assert set(read_official(tmp_path / "bare.pth")) == {"a", "b"}
    torch.save({"model": {"module.a": torch.zeros(1), "b": torch.ones(1)}}, tmp_path / "mixed.pth")
    assert set(read_official(tmp_path / "mixed.pth")) == {"module.a", "b"}
    torch.save({"model": {"a": 1}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError):
        read_official(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        read_official(tmp_path / "missing.pth")
    torch.save({"model": {"a": torch.zeros(1)}, "cfg": Unsafe()}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_official(tmp_path / "pickled.pth")


class Unsafe:
    """An arbitrary pickled object, as a config object saved beside the weights."""


def test_strict_load_names_every_offending_key(tiny_model):
    sd = dict(tiny_model.state_dict())
    sd.pop("head.bias0")
    sd["head.log_scale"] = torch.zeros(3)
    sd["head.unknown"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_into(tiny_model, sd)
    message = str(err.value)
    assert "missing: head.bias0" in message and "unexpected: head.unknown" in message
    assert "head.log_scale: (3,) vs (1,)" in message


def test_save_official_round_trip(tmp_path, tiny_model):
    save_official(tiny_model, tmp_path / "tiny_official.pth")
    raw = torch.load(tmp_path / "tiny_official.pth", weights_only=True)["model"]
    assert all(k.startswith("module.") for k in raw)
    assert "module.backbone.fpn.fpn_inner2.weight" in raw and "module.rpn.head.dyhead_tower.5.offset.weight" in raw
    loaded = load_official(tmp_path / "tiny_official.pth")
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_save_and_load_pretrained_reproduce_the_model(tmp_path, tiny_model, photo):
    save_pretrained(tiny_model, tmp_path / "tiny")
    assert {p.name for p in (tmp_path / "tiny").iterdir()} == {"model.safetensors", "config.json"}
    restored = load_pretrained(tmp_path / "tiny", ["inference.score_threshold=0.3"])
    assert restored.cfg.inference.score_threshold == 0.3
    assert restored.cfg.head == tiny_model.cfg.head and restored.cfg.input == tiny_model.cfg.input
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    enc = tiny_model.tokenize(["a person. a tie"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = tiny_model(x, [(64, 64)], enc["input_ids"], enc["attention_mask"])
        b = restored(x, [(64, 64)], enc["input_ids"], enc["attention_mask"])
    for la, lb in zip(a["token_logits"], b["token_logits"]):
        assert torch.equal(la, lb)
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "nothing")
