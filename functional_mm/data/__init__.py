"""Data: sources, modality processors, chat templates, bucketing/packing, a resumable sharded loader, features.

The pieces, in the order data flows through them:

- sources: ``JsonlSource`` / ``read_jsonl`` (manifests, media paths relative to the manifest) or any list of
  dicts; ``synthetic`` writes embedded image/video/audio datasets in that format;
- modality functions: ``image`` (resize/crop/normalise, ``qwen2_vl_patches``, ``internvl_tiles``), ``video``
  (PyAV decode + frame sampling), ``audio`` (decode, resample, Whisper log-mel), ``chat`` (templates,
  placeholder expansion, prompt masking), ``load_tokenizer`` (local HF tokenizer dirs or bytes);
- processors: ``ImageCaption``, ``VideoClip``, ``ChatVLM``, ``AudioTranscript`` (``process(sample, ctx)``);
- batchers: ``ShuffleBatcher``, ``BucketBatcher`` + ``Bucketing``, ``LengthGroupedBatcher``,
  ``PackingBatcher``; collates: ``default_collate``, ``Padder``, ``Packer`` (``pack_sequences``);
- ``Loader``: deterministic global shuffle, dp sharding, workers + prefetch, ``state()`` / ``restore()``;
- features: ``write_features`` / ``python -m functional_mm.data.extract_features`` and ``FeatureSource``.

Example (VLM fine-tuning on the embedded images, packed, on rank ``r`` of ``n``)::

    >>> from functional_mm import data
    >>> src = data.JsonlSource(data.synthetic.make_images("/tmp/mm", 64))           # doctest: +SKIP
    >>> tok = data.load_tokenizer(None, special_tokens=data.CHATML.special_tokens)    # doctest: +SKIP
    >>> proc = data.ChatVLM(tok, data.CHATML, max_pixels=56 * 56)                     # doctest: +SKIP
    >>> batcher = data.PackingBatcher([proc.num_tokens(s) for s in src], seq_len=512, rows=2)  # doctest: +SKIP
    >>> loader = data.Loader(src, proc, batcher, collate=data.Packer(512, 2), dp_rank=r, dp_size=n,
    ...                      num_workers=2)                                          # doctest: +SKIP
"""

from functional_mm.data import audio, chat, image, synthetic, text, video
from functional_mm.data.batching import (
    Bucket,
    BucketBatcher,
    Bucketing,
    LengthGroupedBatcher,
    PackingBatcher,
    PlannedBatch,
    ShuffleBatcher,
)
from functional_mm.data.chat import CHATML, INTERNVL, PLAIN, ChatTemplate, encode_conversation
from functional_mm.data.features import FeatureSource, FeatureWriter, write_features
from functional_mm.data.loader import Loader, SampleContext
from functional_mm.data.packing import Packer, Padder, default_collate, pack_sequences, pad_sequences
from functional_mm.data.processors import AudioTranscript, ChatVLM, ImageCaption, VideoClip
from functional_mm.data.sources import JsonlSource, MediaError, SkipSample, TooManySkipsError, read_jsonl
from functional_mm.data.text import ByteTokenizer
from functional_mm.data.tokenizer import HFTokenizer, load_tokenizer

__all__ = [
    # modules
    "audio",
    "chat",
    "image",
    "synthetic",
    "text",
    "video",
    # sources and errors
    "JsonlSource",
    "read_jsonl",
    "MediaError",
    "SkipSample",
    "TooManySkipsError",
    # text
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "ChatTemplate",
    "CHATML",
    "INTERNVL",
    "PLAIN",
    "encode_conversation",
    # processors
    "ImageCaption",
    "VideoClip",
    "ChatVLM",
    "AudioTranscript",
    # batching
    "PlannedBatch",
    "ShuffleBatcher",
    "Bucket",
    "Bucketing",
    "BucketBatcher",
    "LengthGroupedBatcher",
    "PackingBatcher",
    "default_collate",
    "pad_sequences",
    "pack_sequences",
    "Padder",
    "Packer",
    # loader and features
    "Loader",
    "SampleContext",
    "FeatureSource",
    "FeatureWriter",
    "write_features",
]
