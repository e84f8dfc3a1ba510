"""Dataset readers: COCO-format detection JSON and MDETR-format grounding JSON -> ``Sample`` s.

- ``stages.readers.coco``: ``CocoDetectionReader`` (COCO, Objects365, ODinW, LVIS).
- ``stages.readers.mdetr``: ``MdetrGroundingReader`` (GoldG: Flickr30k entities, GQA/VG mixed).
- ``stages.readers.common``: ``DatasetFormatError``, ``BoxConvention`` and the xywh <-> xyxy
  conversions (the official GLIP's legacy ``x2 = x + w - 1`` or the exact ``x2 = x + w``).
"""
from stages.readers.coco import CocoDetectionReader, CocoImage, CocoReaderConfig
from stages.readers.common import BoxConvention, DatasetFormatError, xywh_to_xyxy, xyxy_to_xywh
from stages.readers.mdetr import MdetrGroundingReader, MdetrImage, MdetrReaderConfig, PhraseTarget

__all__ = ["CocoDetectionReader", "CocoImage", "CocoReaderConfig", "MdetrGroundingReader",
           "MdetrImage", "MdetrReaderConfig", "PhraseTarget", "BoxConvention", "DatasetFormatError",
           "xywh_to_xyxy", "xyxy_to_xywh"]
