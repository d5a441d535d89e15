"""What a run trains on and how it shows the result, chosen by the model family's ``inputs``.

- ``text``: windows of the embedded byte-level corpus (:mod:`functional_mm.data.text`); the batch of step
  ``s`` is a pure function of ``(seed, s)``, so resuming needs no data state. At the end: a text sample.
- ``image_text`` (VLMs): the embedded shapes images with their captions, read from a JSONL manifest through
  :class:`functional_mm.data.Loader` (its position is saved with every checkpoint); a row is
  ``<bos> <image placeholders> caption <eos>`` with the loss on the caption only. At the end: caption the
  held-out images greedily and report the exact-match accuracy, printing a few next to the truth.
- ``text_to_image`` (SD3 / Flux): the same images with their short label as the prompt ("a red circle"),
  pixels in [-1, 1]. At the end: sample ``config.sample.num_images`` images for ``config.sample.prompts``,
  write them as a PNG grid and report how often the prompted colour dominates (a deterministic pixel test).
  A variant without a text encoder trains on precomputed features instead (``latents``, ``context``,
  ``pooled`` from :mod:`functional_mm.data.features`; see :meth:`TextToImageTask.open_sources`).

The images come from ``config.data.path`` (a directory holding ``train/images.jsonl`` and
``eval/images.jsonl``); left empty, the embedded dataset is generated once into ``WORKDIR/data``. Every rank
builds the same global batch and keeps its slice (``parallelism.shard_batch``): simple and exact, at the cost
of decoding the whole batch on every rank (fine for the embedded data; a per-rank loader is the scale-up).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from functional_mm import random
from functional_mm.data import Loader, ShuffleBatcher, synthetic, text
from functional_mm.data import image as image_lib
from functional_mm.data.features import FeatureSource
from functional_mm.data.sources import JsonlSource

FEATURE_KEYS = ("latents", "context", "pooled")  # a precomputed text-to-image sample


class Task:
    """``batch(split, step)``: the global batch of a step (``split`` "train" or "eval"); ``state`` /
    ``restore``: a JSON position for exact resume; ``finish(params)``: show and score the trained model."""

    unit = "samples"

    def __init__(self, c, family, model_cfg, workdir: str | None):
        self.c, self.family, self.model_cfg, self.workdir = c, family, model_cfg, workdir
        self.tokenizer = text.ByteTokenizer(special_tokens=family.special_tokens)
        # the decoder's vocabulary (a VLM's text config, a CLIP text encoder's, or a plain LM's)
        vocab = getattr(getattr(model_cfg, "text", None) or model_cfg, "vocab_size", None)
        if vocab is not None and vocab < self.tokenizer.vocab_size:
            raise ValueError(
                f"config.model.overrides: vocab_size {vocab} < the byte tokenizer's {self.tokenizer.vocab_size} ids"
            )

    @property
    def units_per_step(self) -> int:
        return self.c.data.batch_size

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TextTask(Task):
    unit = "tokens"

    def __init__(self, c, family, model_cfg, workdir):
        super().__init__(c, family, model_cfg, workdir)
        docs = {"train": c.data.train_docs, "eval": c.data.eval_docs}
        self.streams = {
            split: text.token_stream(text.synthetic_corpus(c.data.seed + i, n), self.tokenizer)
            for i, (split, n) in enumerate(docs.items())
        }
        self.key = random.fold_in(random.key(c.data.seed), 1)

    @property
    def units_per_step(self) -> int:
        return self.c.data.batch_size * self.c.data.seq_len

    def batch(self, split: str, step: int) -> dict:
        key = random.fold_in(random.fold_in(self.key, int(split == "eval")), step)
        return text.random_windows(key, self.streams[split], self.c.data.batch_size, self.c.data.seq_len)

    def finish(self, params) -> dict:
        if not self.c.sample.prompt or self.family.generate is None:
            return {}
        tok = self.tokenizer
        prompt = torch.tensor([tok.encode(self.c.sample.prompt, bos=True)])
        out = self.family.generate(
            params,
            self.model_cfg,
            prompt,
            {},
            max_new_tokens=self.c.sample.max_new_tokens,
            stop_tokens=(tok.eos,),
        )
        print(f"sample: {tok.decode(out[0])}")
        return {}


def shapes_dataset(c, workdir: str | None) -> dict[str, str]:
    """``{"train": manifest, "eval": manifest}``: ``config.data.path``'s, or the embedded shapes images
    generated once into ``WORKDIR/data`` (fixed ``config.data.image_size`` squares)."""
    root = c.data.path or os.path.join(workdir or ".", "data")
    paths = {split: os.path.join(root, split, "images.jsonl") for split in ("train", "eval")}
    if c.data.path:
        for split, p in paths.items():
            if not os.path.exists(p):
                raise FileNotFoundError(f"config.data.path={c.data.path!r}: no {split}/images.jsonl there")
        return paths
    size = (c.data.image_size, c.data.image_size)
    counts = {"train": c.data.train_images, "eval": c.data.eval_images}
    for i, (split, p) in enumerate(paths.items()):
        if not os.path.exists(p):  # written last by make_images: its presence means the split is complete
            synthetic.make_images(os.path.dirname(p), counts[split], seed=c.data.seed + i, sizes=(size,))
    return paths


def _load_rgb(sample: dict) -> Image.Image:
    return image_lib.to_rgb(image_lib.load_image(sample["image"]))


def _concat(rows: list[dict]) -> dict:
    """Collate rows whose tensors all carry a leading per-row dim (images may hold several patches)."""
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


class _ImageTask(Task):
    """Shared by the image tasks: a Loader over the train manifest, fixed eval batches."""

    def __init__(self, c, family, model_cfg, workdir):
        super().__init__(c, family, model_cfg, workdir)
        self.sources = self.open_sources()
        n = len(self.sources["train"])
        if n < c.data.batch_size:
            raise ValueError(f"config.data.batch_size={c.data.batch_size} exceeds the {n} training images")
        self.loader = Loader(
            self.sources["train"], self.process, ShuffleBatcher(n, c.data.batch_size), seed=c.data.seed,
            collate=_concat, num_workers=c.data.num_workers, worker_type="thread",
        )  # fmt: skip
        self._eval: dict[int, dict] = {}

    def open_sources(self) -> dict:
        """``{"train": source, "eval": source}``: the JSONL manifests of :func:`shapes_dataset`."""
        return {split: JsonlSource(p) for split, p in shapes_dataset(self.c, self.workdir).items()}

    def batch(self, split: str, step: int) -> dict:
        if split == "train":
            return next(self.loader)
        if step not in self._eval:  # the eval split in order, wrapping around
            src, b = self.sources["eval"], self.c.data.batch_size
            rows = [self.process(src[(step * b + i) % len(src)], None) for i in range(b)]
            self._eval[step] = _concat(rows)
        return self._eval[step]

    def state(self) -> dict:
        return self.loader.state()

    def restore(self, state: dict) -> None:
        self.loader.restore(state)

    def close(self) -> None:
        self.loader.close()


def vlm_prompt(family, model_cfg, tokenizer, img: Image.Image, text: str = "") -> tuple[dict, list[int]]:
    """The image's tensors and the prompt ids ``<bos> <placeholders> text`` the captioning task trains on
    (Qwen2-VL wraps the placeholders in ``<|vision_start|>`` / ``<|vision_end|>``)."""
    inputs, n = family.image_inputs(model_cfg, img)
    image = family.image_token * n
    if "<|vision_start|>" in family.special_tokens:
        image = f"<|vision_start|>{image}<|vision_end|>"
    return inputs, tokenizer.encode(image + text, bos=True)


class CaptionTask(_ImageTask):
    """Image captioning for the VLM families (LLaVA, Qwen2-VL, InternVL2)."""

    def prompt(self, img: Image.Image) -> tuple[dict, list[int]]:
        return vlm_prompt(self.family, self.model_cfg, self.tokenizer, img)

    def process(self, sample: dict, ctx) -> dict:
        inputs, prompt = self.prompt(_load_rgb(sample))
        caption = self.tokenizer.encode(sample["caption"], eos=True)
        ids, seq_len = prompt + caption, self.c.data.seq_len
        if len(ids) > seq_len:
            raise ValueError(f"config.data.seq_len={seq_len} is shorter than a {len(ids)}-token row")
        pad = seq_len - len(ids)
        return {
            **inputs,
            "tokens": torch.tensor([ids + [self.tokenizer.pad] * pad]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * pad]),
            "loss_mask": torch.tensor([[0] * len(prompt) + [1] * len(caption) + [0] * pad]),
        }

    def finish(self, params) -> dict:
        """Caption up to ``config.sample.num_images`` held-out images; exact-match accuracy."""
        src = self.sources["eval"]
        n = min(len(src), self.c.sample.num_images)
        tok, hits, shown = self.tokenizer, 0, []
        for start in range(0, n, self.c.data.batch_size):
            rows = [src[i] for i in range(start, min(n, start + self.c.data.batch_size))]
            preps = [self.prompt(_load_rgb(r)) for r in rows]
            inputs = _concat([p[0] for p in preps])
            tokens = torch.tensor([p[1] for p in preps])
            out = self.family.generate(
                params, self.model_cfg, tokens, inputs, max_new_tokens=self.c.sample.max_new_tokens,
                stop_tokens=(tok.eos,), pad_token=tok.pad,
            )  # fmt: skip
            for r, ids in zip(rows, out[:, tokens.shape[1] :]):
                got = tok.decode([int(i) for i in ids if i < 256])
                hits += got == r["caption"]
                if len(shown) < 5:
                    shown.append((os.path.basename(r["image"]), got, r["caption"]))
        acc = hits / max(n, 1)
        for name, got, truth in shown:
            print(f"  {name}: {got!r:40} truth {truth!r}")
        print(f"held-out captions: {hits}/{n} exact ({100 * acc:.1f}%)")
        return {"caption_accuracy": acc}


def dominant_colour(img: np.ndarray) -> str | None:
    """The palette colour (:data:`functional_mm.data.synthetic.COLOURS`) nearest to the mean of the saturated
    pixels of ``img: uint8 [H, W, 3]`` (the grey background is unsaturated); None when nothing is saturated."""
    x = img.reshape(-1, 3).astype(np.float32)
    shape = x[(x.max(1) - x.min(1)) > 60]
    if len(shape) < 4:
        return None
    mean = shape.mean(0)
    return min(synthetic.COLOURS, key=lambda k: float(((np.array(synthetic.COLOURS[k]) - mean) ** 2).sum()))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [-1, 1] -> uint8 ``[B, H, W, 3]``."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def write_grid(images: np.ndarray, path: str, cols: int = 8) -> None:
    """Save ``uint8 [B, H, W, 3]`` as one PNG grid, row-major."""
    b, h, w, _ = images.shape
    rows = -(-b // cols)
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        grid[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = im
    Image.fromarray(grid).save(path)


def encode_prompts(tokenizer, model_cfg, prompts: list[str]) -> torch.Tensor:
    """``[N, L]`` byte ids ``<bos> prompt <eos>`` padded with ``<eos>`` to the text encoder's length (CLIP
    pools the first EOS)."""
    length = model_cfg.text.max_position_embeddings
    rows = []
    for p in prompts:
        ids = tokenizer.encode(p, bos=True, eos=True)[:length]
        rows.append(ids + [tokenizer.eos] * (length - len(ids)))
    return torch.tensor(rows)


class TextToImageTask(_ImageTask):
    """Prompted image generation for the SD3 / Flux families (pixels in [-1, 1], prompt = the short label)."""

    def open_sources(self) -> dict:
        """Without a text encoder in the model the batches are precomputed features: ``config.data.path`` holds
        ``train/`` and ``eval/`` feature directories (:mod:`functional_mm.data.features`, written by
        ``functional_mm.data.extract_features``) with ``latents`` ``[C, H, W]``, ``context`` ``[T, D]`` and
        ``pooled`` ``[P]`` per sample (the frozen VAE and text encoders run once, outside the step)."""
        if self.model_cfg.text is not None:
            return super().open_sources()
        if not self.c.data.path:
            raise ValueError(
                f"config.model.variant={self.c.model.variant!r} has no text encoder: set config.data.path to a "
                "directory with train/ and eval/ feature sets (latents, context, pooled)"
            )
        return {split: FeatureSource(os.path.join(self.c.data.path, split)) for split in ("train", "eval")}

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.tokenizer, self.model_cfg, prompts)

    def process(self, sample: dict, ctx) -> dict:
        if self.model_cfg.text is None:
            missing = [k for k in FEATURE_KEYS if k not in sample]
            if missing:
                raise ValueError(
                    f"feature sample {sample.get('index')} lacks {missing} (needs {FEATURE_KEYS})"
                )
            return {k: sample[k][None] for k in FEATURE_KEYS}
        img = _load_rgb(sample)
        size = (self.model_cfg.image_size, self.model_cfg.image_size)
        pixels = image_lib.normalize(image_lib.to_tensor(image_lib.resize(img, size)), *image_lib.HALF)
        return {"pixels": pixels[None], "prompt": self.encode_prompts([sample["label"]])}

    def finish(self, params) -> dict:
        """Sample ``config.sample.num_images`` images cycling through ``config.sample.prompts``; the share whose
        dominant colour is the prompted one. Writes ``WORKDIR/samples.png``."""
        from functional_mm.models import t2i

        s = self.c.sample
        if self.model_cfg.text is None or not s.prompts:
            return {}  # features-only runs have no text encoder to turn prompts into conditioning
        prompts = [s.prompts[i % len(s.prompts)] for i in range(s.num_images)]
        images = t2i.sample(
            params, self.model_cfg, self.encode_prompts(prompts), key=random.key(s.seed), num_steps=s.num_steps,
            guidance_scale=s.guidance_scale,
        )  # fmt: skip
        pixels = to_uint8(images)
        hits = sum(dominant_colour(im) == p.split()[1] for im, p in zip(pixels, prompts))
        if self.workdir:
            write_grid(pixels, os.path.join(self.workdir, "samples.png"), cols=len(s.prompts))
        acc = hits / len(prompts)
        print(f"samples: prompted colour dominant in {hits}/{len(prompts)} ({100 * acc:.1f}%)")
        return {"colour_accuracy": acc}


TASKS = {"text": TextTask, "image_text": CaptionTask, "text_to_image": TextToImageTask}


def make(c, family, model_cfg, workdir: str | None) -> Task:
    """The task for ``family.inputs``."""
    return TASKS[family.inputs](c, family, model_cfg, workdir)
