"""Checkpoints: the official GLIP format <-> ours, and our own format (safetensors + config JSON).

Official files (docs/model.md §9): ``torch.save({"model": state_dict, ...})`` of a DDP-wrapped model, so
keys carry ``module.``; some files are bare state dicts. ``read_official`` accepts both and strips
``module.`` (only when every key has it, as the official loader does).

Name map (official, ``module.`` stripped -> ours); see ``official_to_ours``:

=====================================================  =========================================
``backbone.body.*`` (Swin)                             ``backbone.body.*`` (same names)
``backbone.fpn.fpn_inner{2,3,4}.*`` / ``fpn_layer{..}`` ``backbone.fpn.lateral.{0,1,2}.*`` / ``output.{0,1,2}.*``
``backbone.fpn.top_blocks.{p6,p7}.*``                  ``backbone.fpn.{p6,p7}.*``
``language_backbone.body.model.*``                     ``language.model.*``
``rpn.head.dyhead_tower.{3i}.b_attn.*``                ``head.blocks.{i}.fusion.*``
``rpn.head.dyhead_tower.{3i+1}.*``                     ``head.blocks.{i}.text_layer.*``
``rpn.head.dyhead_tower.{3i+2}.DyConv.{k}.conv.*``     ``head.blocks.{i}.dyconv.convs.{k}.conv.*``
``... .DyConv.{k}.bn.*`` / ``.AttnConv.1.*``           ``... .convs.{k}.norm.*`` / ``.scale_attn.1.*``
``... .relu.fc.{0,2}.*`` / ``.offset.*``               ``... .dyrelu.fc.{0,2}.*`` / ``.offset.*``
``rpn.head.dyhead_tower.{i}.*`` (no fusion, T(A))      ``head.blocks.{i}.dyconv.*``
``rpn.head.dot_product_projection_text.*``             ``head.token_proj.*``
``rpn.head.{bbox_pred,centerness,scales,log_scale,bias_lang,bias0}*``  ``head.<same>``
``rpn.anchor_generator.cell_anchors.{l}``              ``anchor_generator.cell_anchors.{l}``
=====================================================  =========================================

Official keys dropped on load (``DROPPED``), and why:

* ``rpn.head.cls_logits.*``: the classification conv is frozen and its loss weighted x0 in GLIP;
  it is never used for predictions (and its size depends on an unrelated NUM_CLASSES);
* ``language_backbone.body.model.embeddings.position_ids``: a persistent buffer in the
  transformers 4.x that trained GLIP, a non-persistent one (recomputed, same values) in
  transformers 5;
* ``language_backbone.body.model.pooler.*``: GLIP builds BERT without a pooler; some released
  files still carry it.

The tower layout (3 modules per block with fusion, 1 without) is read from the keys themselves,
so both converters are pure ``dict -> dict`` functions, like timm's ``checkpoint_filter_fn``.
Keys that match no rule are passed through unchanged, so a strict load names them.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

DROPPED = (
    re.compile(r"^rpn\.head\.cls_logits\."),
    re.compile(r"^language_backbone\.body\.model\.embeddings\.position_ids$"),
    re.compile(r"^language_backbone\.body\.model\.pooler\."),
)

# (official, ours) name pairs inside one DyConv module.
_DYCONV = [
    (r"DyConv\.(\d+)\.conv\.", r"convs.\1.conv."),
    (r"DyConv\.(\d+)\.bn\.", r"convs.\1.norm."),
    (r"AttnConv\.", r"scale_attn."),
    (r"relu\.fc\.", r"dyrelu.fc."),
    (r"offset\.", r"offset."),
]
# (ours, official) for the same sub-names, the other way round.
_DYCONV_INVERSE = [
    (r"convs\.(\d+)\.conv\.", r"DyConv.\1.conv."),
    (r"convs\.(\d+)\.norm\.", r"DyConv.\1.bn."),
    (r"scale_attn\.", r"AttnConv."),
    (r"dyrelu\.fc\.", r"relu.fc."),
    (r"offset\.", r"offset."),
]
_HEAD_TOP = ("bbox_pred.", "centerness.", "scales.", "log_scale", "bias_lang", "bias0")
_FPN_OFFICIAL = {"fpn_inner": "lateral", "fpn_layer": "output"}


class CheckpointError(RuntimeError):
    """A checkpoint that does not fit the model; the message names every offending key."""


def untrusted_checkpoint_error(path, exc: Exception) -> CheckpointError:
    """The refusal of ``torch.load(weights_only=True)``, explained: the file holds Python objects
    beyond tensors (loading them would run code from the file), and how to convert a trusted one."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f" (it references {found.group(1)})" if found else ""
    return CheckpointError(
        f"{path} holds Python objects beyond tensors{what}; unpickling them could run code from the file, "
        "so it is not loaded. If you trust the file, convert it once to plain tensors: python -c \"import "
        "torch; s = torch.load('IN', weights_only=False); s = s.get('model', s); torch.save({'model': "
        "{k: v for k, v in s.items() if isinstance(v, torch.Tensor)}}, 'OUT.pth')\" and give OUT.pth")


def is_dropped(official_key: str) -> bool:
    return any(p.search(official_key) for p in DROPPED)


def _sub_first(rules, text: str) -> str | None:
    for pattern, repl in rules:
        if re.match(pattern, text):
            return re.sub("^" + pattern, repl, text, count=1)
    return None


def _tower_to_ours(index: int, rest: str, fused: bool) -> str | None:
    block, kind = (index // 3, index % 3) if fused else (index, 2)
    if kind == 0:
        return f"head.blocks.{block}.fusion.{rest[len('b_attn.'):]}" if rest.startswith("b_attn.") else None
    if kind == 1:
        return f"head.blocks.{block}.text_layer.{rest}"
    mapped = _sub_first(_DYCONV, rest)
    return None if mapped is None else f"head.blocks.{block}.dyconv.{mapped}"


def official_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names (``module.`` stripped) -> ours; ``DROPPED`` keys removed, unknown kept."""
    fused = any(re.match(r"rpn\.head\.dyhead_tower\.\d+\.b_attn\.", k) for k in state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if is_dropped(key):
            continue
        new = None
        if key.startswith("backbone.body."):
            new = key
        elif m := re.match(r"backbone\.fpn\.(fpn_inner|fpn_layer)([234])\.(.*)$", key):
            new = f"backbone.fpn.{_FPN_OFFICIAL[m[1]]}.{int(m[2]) - 2}.{m[3]}"
        elif m := re.match(r"backbone\.fpn\.top_blocks\.(p6|p7)\.(.*)$", key):
            new = f"backbone.fpn.{m[1]}.{m[2]}"
        elif key.startswith("language_backbone.body.model."):
            new = "language.model." + key[len("language_backbone.body.model."):]
        elif m := re.match(r"rpn\.head\.dyhead_tower\.(\d+)\.(.*)$", key):
            new = _tower_to_ours(int(m[1]), m[2], fused)
        elif key.startswith("rpn.head.dot_product_projection_text."):
            new = "head.token_proj." + key[len("rpn.head.dot_product_projection_text."):]
        elif key.startswith("rpn.head.") and key[len("rpn.head."):].startswith(_HEAD_TOP):
            new = "head." + key[len("rpn.head."):]
        elif m := re.match(r"rpn\.anchor_generator\.cell_anchors\.(\d+)$", key):
            new = f"anchor_generator.cell_anchors.{m[1]}"
        out[new if new is not None else key] = value
    return out


def ours_to_official(state_dict: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Our names -> official names with ``prefix`` (``module.`` as in released files)."""
    fused = any(re.match(r"head\.blocks\.\d+\.fusion\.", k) for k in state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = None
        if key.startswith("backbone.body."):
            new = key
        elif m := re.match(r"backbone\.fpn\.(lateral|output)\.([012])\.(.*)$", key):
            kind = "fpn_inner" if m[1] == "lateral" else "fpn_layer"
            new = f"backbone.fpn.{kind}{int(m[2]) + 2}.{m[3]}"
        elif m := re.match(r"backbone\.fpn\.(p6|p7)\.(.*)$", key):
            new = f"backbone.fpn.top_blocks.{m[1]}.{m[2]}"
        elif key.startswith("language.model."):
            new = "language_backbone.body.model." + key[len("language.model."):]
        elif m := re.match(r"head\.blocks\.(\d+)\.(fusion|text_layer|dyconv)\.(.*)$", key):
            i, part, rest = int(m[1]), m[2], m[3]
            if part == "fusion":
                new = f"rpn.head.dyhead_tower.{3 * i}.b_attn.{rest}"
            elif part == "text_layer":
                new = f"rpn.head.dyhead_tower.{3 * i + 1}.{rest}"
            else:
                mapped = _sub_first(_DYCONV_INVERSE, rest)
                if mapped is not None:
                    new = f"rpn.head.dyhead_tower.{3 * i + 2 if fused else i}.{mapped}"
        elif key.startswith("head.token_proj."):
            new = "rpn.head.dot_product_projection_text." + key[len("head.token_proj."):]
        elif key.startswith("head.") and key[len("head."):].startswith(_HEAD_TOP):
            new = "rpn." + key
        elif m := re.match(r"anchor_generator\.cell_anchors\.(\d+)$", key):
            new = f"rpn.anchor_generator.cell_anchors.{m[1]}"
        out[prefix + (new if new is not None else key)] = value
    return out


# --------------------------------------------------------------------------------------------
# reading, strict loading
# --------------------------------------------------------------------------------------------

def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """An official .pth -> its state dict with official names (``{"model": ...}`` or bare;
    ``module.`` stripped when every key has it). Loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        try:   # memory-mapped: optimizer state and other extras are never read into memory
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:   # legacy (non-zip) serialisation cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise untrusted_checkpoint_error(path, exc) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict or {{'model': state dict}}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_official(path: str | Path) -> dict[str, torch.Tensor]:
    """An official .pth -> a state dict with our names (``read_official`` + ``official_to_ours``)."""
    return official_to_ours(read_official(path))


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)      # ours, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)   # in the checkpoint, not ours
    mismatched: list[str] = field(default_factory=list)   # "name: checkpoint shape vs ours"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = []
        for title, names in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape mismatch", self.mismatched)):
            if names:
                shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
                parts.append(f"{title}: {shown}")
        return "; ".join(parts) or "all keys matched"


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True,
              assign: bool = False) -> LoadReport:
    """Load ``state_dict`` (our names) into ``model``; with ``strict`` any missing, unexpected or
    mis-shaped key raises ``CheckpointError`` naming them all (nothing is loaded then).
    ``assign=True`` is for models built on the ``meta`` device."""
    own = model.state_dict()
    report = LoadReport(
        missing=[k for k in own if k not in state_dict],
        unexpected=[k for k in state_dict if k not in own],
        mismatched=[f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
                    if k in own and tuple(v.shape) != tuple(own[k].shape)])
    if strict and not report.ok:
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: {report}")
    bad = {m.split(":")[0] for m in report.mismatched}
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own and k not in bad},
                          strict=False, assign=assign)
    return report


def load_official_into(model: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Official .pth -> ``model`` (converted, strict by default)."""
    return load_into(model, load_official(path), strict=strict)


def save_official(model: nn.Module, path: str | Path) -> None:
    """Write ``{"model": state dict}`` with official ``module.`` names (the DROPPED keys absent)."""
    sd = ours_to_official({k: v.detach().cpu() for k, v in model.state_dict().items()})
    torch.save({"model": sd}, Path(path))


# --------------------------------------------------------------------------------------------
# our own format: DIR/model.safetensors + DIR/config.json
# --------------------------------------------------------------------------------------------

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (other threads may be
    creating files)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """``model`` (a GLIP with ``.cfg``) -> ``directory``/{model.safetensors, config.json}."""
    from safetensors.torch import save_file
    from core import config as typed_config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    os.chmod(directory / WEIGHTS_NAME, 0o666 & ~_umask())   # safetensors writes 0600; match the other files
    (directory / CONFIG_NAME).write_text(json.dumps(typed_config.to_dict(model.cfg), indent=2) + "\n")
    return directory


def load_pretrained(directory: str | Path, overrides: list[str] | None = None,
                    device: str | torch.device = "cpu"):
    """``directory`` written by ``save_pretrained`` -> a GLIP in eval mode (strict load).

    ``overrides`` (``key=value``) may change non-architectural keys, e.g. ``inference.*``."""
    from safetensors.torch import load_file
    from core import config as typed_config
    from model.config import ModelConfig
    from model.glip import build_glip
    directory = Path(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name} (not written by save_pretrained)")
    data = json.loads((directory / CONFIG_NAME).read_text())
    if overrides:
        data = typed_config.merge_overrides(data, overrides)
    cfg = typed_config.from_dict(ModelConfig, data, source=str(directory / CONFIG_NAME))
    model = build_glip(cfg, load_weights=False)
    load_into(model, load_file(str(directory / WEIGHTS_NAME)), strict=True)
    return model.to(device).eval()
