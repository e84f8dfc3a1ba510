"""Predictor: images + class names, or captions with phrase spans -> boxes in the original frame.

Detection (``detect``): the names become the official prompt ``"a. b. c"`` (``prompts.
build_chunked_prompts``); vocabularies longer than ``inference.chunk_size`` run one forward pass
per chunk and the chunks' detections are concatenated (no cross-chunk NMS, as the official
chunked evaluation). Grounding (``ground``): each image has its caption and the character spans
of its phrases (entity i = one or more spans); a phrase's score is the mean probability of its
tokens.

Images are preprocessed as the official test pipeline (``transforms.Preprocessor``) and run
``batch_size`` at a time. As in the official code, a batch is zero-padded to its largest image,
and the fusion attends over the padding, so an image's scores can change (slightly) with the
other images of its batch; same-sized images give identical results batched or one by one.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from model.checkpoint import load_official_into
from model.config import InferenceConfig, load_model_config
from model.glip import GLIP, build_glip
from model.postprocess import PostProcessor
from model.prompts import Prompt, build_chunked_prompts, prompt_positive_maps
from model.transforms import ImageBatch, Preprocessor, boxes_to_original

Span = tuple[int, int]


@dataclass
class Detections:
    """One image's detections, best first, in the original image frame."""
    boxes: torch.Tensor                               # [K, 4] xyxy, absolute pixels
    scores: torch.Tensor                              # [K]
    labels: torch.Tensor                              # [K] class index / phrase index (0-based)
    phrases: list[str] = field(default_factory=list)  # [K] the class name / phrase text

    def __len__(self) -> int:
        return int(self.scores.numel())

    def as_dict(self) -> dict:
        return {"boxes": self.boxes.tolist(), "scores": self.scores.tolist(),
                "labels": self.labels.tolist(), "phrases": list(self.phrases)}


def _empty() -> Detections:
    return Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), [])


def _normalise_spans(spans) -> list[list[Span]]:
    """[(b, e), ...] (one span per phrase) or [[(b, e), ...], ...] -> list of span lists."""
    out = []
    for item in spans:
        if len(item) == 2 and all(isinstance(v, numbers.Integral) for v in item):
            out.append([(int(item[0]), int(item[1]))])
        else:
            out.append([(int(b), int(e)) for b, e in item])
    return out


class Predictor:
    def __init__(self, model: GLIP, device: str | torch.device | None = None, batch_size: int = 4,
                 min_size: int | None = None, max_size: int | None = None,
                 inference: InferenceConfig | None = None):
        """``min_size``/``max_size`` default to ``input.min_size_test``/``max_size_test``;
        ``inference`` (thresholds, top-k, chunk size) to the model config's."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.cfg = model.cfg
        self.inference = inference or self.cfg.inference
        self.batch_size = batch_size
        self.preprocess = Preprocessor(self.cfg.input, min_size, max_size)
        self.postprocess = PostProcessor(self.inference)

    @classmethod
    def from_pretrained(cls, directory: str | Path, overrides: list[str] | None = None, **kwargs) -> "Predictor":
        """A directory written by ``checkpoint.save_pretrained`` (a learnt prompt included)."""
        from model.load import load_ours
        return cls(load_ours(directory, overrides), **kwargs)

    @classmethod
    def from_official(cls, config: str, checkpoint: str | Path, overrides: list[str] | None = None,
                      **kwargs) -> "Predictor":
        """``config`` (glip_t / glip_l / a YAML path) + an official .pth (strict load)."""
        model = build_glip(load_model_config(config, overrides), load_weights=False)
        load_official_into(model, checkpoint)
        return cls(model, **kwargs)

    # ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self, batch: ImageBatch, prompts: list[Prompt]) -> list[dict]:
        """One preprocessed batch: image i with prompts[i] -> per image post-processed dict in
        the original frame (labels are rows of the prompt's positive map)."""
        lang = self.cfg.language
        enc, maps = prompt_positive_maps(self.model.tokenizer, prompts, lang.max_query_len, lang.pad_to_max)
        outputs = self.model(batch.images.to(self.device), batch.image_sizes,
                             enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
        results = self.postprocess(outputs, [m.to(self.device) for m in maps], batch.image_sizes)
        for r, resized, original in zip(results, batch.image_sizes, batch.original_sizes):
            r["boxes"] = boxes_to_original(r["boxes"], resized, original).cpu()
            r["scores"], r["labels"] = r["scores"].cpu(), r["labels"].cpu()
        return results

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield range(start, min(start + self.batch_size, n))

    def detect(self, images: Sequence, class_names: Sequence[str]) -> list[Detections]:
        """images (PIL / HxWx3 uint8 RGB arrays / paths / bytes) + class names -> one
        ``Detections`` per image; ``labels`` index ``class_names``."""
        images, class_names = list(images), list(class_names)
        learnt = getattr(self.model, "prompt_tuning", None)
        if learnt is not None and learnt.names is not None and class_names != learnt.names:
            from core.config import ConfigError          # one line from the CLI: the user picks the classes
            raise ConfigError(f"this model's learnt prompt belongs to the classes {learnt.names} (in that order); "
                              f"detect exactly those, not {class_names}, or use a model without a learnt prompt")
        if not class_names:
            return [_empty() for _ in images]
        chunks = build_chunked_prompts(class_names, self.inference.chunk_size)
        out: list[Detections] = []
        for idx in self._batches(len(images)):
            batch = self.preprocess([images[i] for i in idx])
            parts = [[] for _ in idx]
            for prompt in chunks:
                for j, r in enumerate(self._run(batch, [prompt] * len(idx))):
                    r["labels"] = torch.as_tensor(prompt.labels, dtype=torch.long)[r["labels"]]
                    parts[j].append(r)
            out.extend(self._merge(p, class_names) for p in parts)
        return out

    def ground(self, images: Sequence, captions: Sequence[str] | str,
               phrase_spans: Sequence) -> list[Detections]:
        """images + captions + the phrases' character spans -> one ``Detections`` per image;
        ``labels`` index the image's phrases.

        With one caption (a ``str``) for every image, ``phrase_spans`` lists its phrases; with a
        list of captions (one per image), ``phrase_spans`` is a list of such lists. A phrase is
        ``(beg, end)`` or a list of ``(beg, end)`` spans (MDETR's ``tokens_positive``).
        """
        images = list(images)
        n = len(images)
        if isinstance(captions, str):
            captions, phrase_spans = [captions] * n, [phrase_spans] * n
        captions, phrase_spans = list(captions), list(phrase_spans)
        if len(captions) != n or len(phrase_spans) != n:
            raise ValueError(f"{n} images but {len(captions)} captions and {len(phrase_spans)} span lists")
        prompts = []
        for caption, spans in zip(captions, phrase_spans):
            spans = _normalise_spans(spans)
            for b, e in (s for entity in spans for s in entity):
                if not 0 <= b < e <= len(caption):
                    raise ValueError(f"span ({b}, {e}) is outside caption {caption!r}")
            prompts.append(Prompt(caption, spans, list(range(len(spans)))))
        out: list[Detections] = []
        for idx in self._batches(n):
            todo = [i for i in idx if prompts[i].tokens_positive]
            results = {}
            if todo:
                batch = self.preprocess([images[i] for i in todo])
                results = dict(zip(todo, self._run(batch, [prompts[i] for i in todo])))
            for i in idx:
                if i not in results:
                    out.append(_empty())
                    continue
                names = [" ".join(captions[i][b:e] for b, e in entity) for entity in prompts[i].tokens_positive]
                out.append(self._merge([results[i]], names))
        return out

    @staticmethod
    def _merge(parts: list[dict], names: list[str]) -> Detections:
        boxes = torch.cat([p["boxes"] for p in parts])
        scores = torch.cat([p["scores"] for p in parts])
        labels = torch.cat([p["labels"] for p in parts])
        order = scores.argsort(descending=True, stable=True)
        boxes, scores, labels = boxes[order], scores[order], labels[order]
        return Detections(boxes, scores, labels, [names[int(i)] for i in labels])

