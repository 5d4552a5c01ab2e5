"""Speed and memory of the model on Focal-T sizes (random weights), repeatable.

    python -m xdecoder.bench                       # CPU, 2 threads, 512x683 input
    python -m xdecoder.bench --device cuda         # adds bf16 throughput on a GPU
    python -m xdecoder.bench --merge-size 3000x4000 --merge-queries 20   # the panoptic merge for a 12 MP photo
    python -m xdecoder.bench --caption-reference   # adds the official 50-step captioning loop (slow on CPU)

Measures: panoptic segmentation (6 labels, class embeddings cached), referring with 2 prompts, both
from one encoding, class-name embeddings for 6 labels (first time and cached), the caption (alone, and
what it adds to panoptic), what ranking 8 tags adds to panoptic, and peak memory.
Captions: the random weights never choose the end token, so every caption runs all 50 steps (the most a
caption costs); `caption_decoding_s` is the decoding alone, after the image pass; with
--caption-reference the same decoding written as the official code does it (the whole decoder re-run
every step) is timed once, and `caption_tokens_identical` says whether both chose the same tokens.
Times are medians over --repeats runs after one warm-up. The last line printed is one JSON object
with every figure (seconds and MB), for scripts.

The panoptic merge (--merge-size): the model's masks for the input image merged into a panoptic map of that
size, as for a photo of that size resized to the input, with --merge-queries queries passing the class threshold
(random weights pass none on their own, so their class scores are set).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import numpy as np
import torch

from . import postprocess
from .captioning import greedy_captions, reference_greedy_captions
from .config import XDecoderConfig
from .model import build_model
from .predictor import Predictor
from .text import ClassEmbeddingCache

LABELS = ["person", "dog", "car", "sky", "grass", "wall"]
PROMPTS = ["the red car on the left", "a dog lying on the grass"]
TAGS = ["indoor", "outdoor", "people", "animal", "vehicle", "food", "night", "city street"]
TARGETS_CPU = {"panoptic_s": 2.6, "class_embeddings_first_s": 2.5, "class_embeddings_cached_s": 0.010}


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour regions plus noise: a stand-in photo (content does not change the cost much)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(12):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(30, 200)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        image[inside] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median, min) seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def panoptic_merge(predictor: Predictor, image: np.ndarray, output_size: tuple[int, int], kept: int):
    """A call that merges the model's masks for `image` into a panoptic map of `output_size`, `kept` queries
    passing the class threshold (half of them things, half stuff)."""
    model = predictor.model
    with torch.inference_mode():
        batch = model.prepare_images([torch.tensor(image).permute(2, 0, 1)])
        output = model.decode(model.encode_image(batch.pixels), predictor.class_embeddings(LABELS))
    masks = output.object_masks[0]
    num_labels = len(LABELS)
    probs = torch.full((masks.shape[0], num_labels + 1), 0.1 / num_labels, device=masks.device)
    probs[:, num_labels] = 0.9  # background: dropped
    for query in range(kept):
        probs[query] = 0.01
        probs[query, query % num_labels] = 1 - 0.01 * num_labels
    is_thing = [label % 2 == 0 for label in range(num_labels)]
    geometry = postprocess.Geometry(tuple(batch.pixels.shape[-2:]), batch.sizes[0], output_size)
    return lambda: postprocess.panoptic(probs, masks, is_thing, geometry, 0.8, 0.8)


def caption_and_tags(predictor: Predictor, image: np.ndarray, repeats: int, reference: bool, panoptic_s: float) -> dict:
    """Caption and tag (ranking) figures; see the module docstring. panoptic_s: the panoptic time they add to."""
    model = predictor.model
    steps = model.config.decoder.captioning_steps
    results = {}
    results["caption_s"], _ = timed(lambda: predictor.caption(image), repeats)
    results["panoptic_and_caption_s"], _ = timed(lambda: predictor.predict(image, labels=LABELS, caption=True), repeats)
    results["panoptic_and_tags_s"], _ = timed(lambda: predictor.predict(image, labels=LABELS, rank_texts=TAGS), repeats)
    results["caption_extra_s"] = results["panoptic_and_caption_s"] - panoptic_s
    results["tags_extra_s"] = results["panoptic_and_tags_s"] - panoptic_s
    results["tags"] = len(TAGS)
    with torch.inference_mode():
        batch = model.prepare_images([torch.tensor(predictor.prepare(image).resized).permute(2, 0, 1)])
        features = model.encode_image(batch.pixels)
        context = model.decode(features, None, caption_context=True).caption_context
    ours = greedy_captions(model.decoder, context, steps)
    results["caption_steps"] = ours.steps
    results["caption_decoding_s"], _ = timed(lambda: greedy_captions(model.decoder, context, steps), repeats)
    if reference:
        pixel = features.pixel
        start = time.perf_counter()
        official = reference_greedy_captions(model.decoder, pixel.multi_scale, pixel.mask_features, ours.steps)
        results["caption_reference_decoding_s"] = time.perf_counter() - start
        results["caption_tokens_identical"] = bool(torch.equal(official.token_buffer, ours.token_buffer))
        results["caption_speedup"] = results["caption_reference_decoding_s"] / results["caption_decoding_s"]
    return results


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m xdecoder.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=683)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-images", type=int, default=32, help="images for the GPU throughput run")
    parser.add_argument("--gpu-batch", type=int, default=8)
    parser.add_argument("--merge-size", help="HEIGHTxWIDTH: also time the panoptic merge at this output size")
    parser.add_argument("--merge-queries", type=int, default=20, help="queries the merge keeps (default 20)")
    parser.add_argument(
        "--caption-reference", action="store_true", help="also time the official 50-step captioning loop (once)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(XDecoderConfig.focalt()).eval().to(device)
    with torch.no_grad():  # build_model leaves the captioning head at zero: every logit would tie
        model.decoder.caping_embed.normal_(std=0.02)
    predictor = Predictor(model, autocast=False, embedding_cache=ClassEmbeddingCache())
    image = synthetic_image(args.height, args.width)
    results: dict = {
        "device": str(device),
        "threads": args.threads,
        "input": [args.height, args.width],
        "torch": torch.__version__,
        "machine": platform.machine(),
    }

    start = time.perf_counter()
    predictor.class_embeddings(LABELS)
    results["class_embeddings_first_s"] = time.perf_counter() - start
    results["class_embeddings_cached_s"], _ = timed(lambda: predictor.class_embeddings(LABELS), 20)

    results["panoptic_s"], results["panoptic_min_s"] = timed(lambda: predictor.panoptic(image, LABELS), args.repeats)
    results["referring_2_prompts_s"], _ = timed(lambda: predictor.referring(image, PROMPTS), args.repeats)
    results["panoptic_and_referring_s"], _ = timed(
        lambda: predictor.predict(image, labels=LABELS, prompts=PROMPTS), args.repeats
    )
    results |= caption_and_tags(predictor, image, args.repeats, args.caption_reference, results["panoptic_s"])
    if args.merge_size:
        height, width = (int(side) for side in args.merge_size.lower().split("x"))
        merge = panoptic_merge(predictor, image, (height, width), args.merge_queries)
        results["merge_size"], results["merge_queries"] = [height, width], args.merge_queries
        results["merge_s"], _ = timed(merge, args.repeats)
    results["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        results |= gpu_throughput(model, image, args.gpu_images, args.gpu_batch)
    else:
        results["targets"] = TARGETS_CPU
        results["meets_targets"] = all(results[k] <= v for k, v in TARGETS_CPU.items())

    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key:<28} {value:10.4f}")
    print(json.dumps(results))
    return results


def gpu_throughput(model, image: np.ndarray, count: int, batch_size: int) -> dict:
    """bf16 autocast panoptic throughput at short side 512, images per second."""
    predictor = Predictor(model, batch_size=batch_size, autocast=torch.bfloat16)
    images = [image] * count
    torch.cuda.reset_peak_memory_stats()
    median, _ = timed(lambda: predictor.panoptic(images, LABELS), 2)
    return {
        "gpu": torch.cuda.get_device_name(),
        "gpu_bf16_images_per_s": count / median,
        "gpu_batch": batch_size,
        "gpu_peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
    }


if __name__ == "__main__":
    main()
