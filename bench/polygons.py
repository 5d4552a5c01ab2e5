"""Benchmark of backend.polygons on a synthetic 50-segment panoptic map: speed per megapixel and quality per budget.

    python bench/polygons.py [--sizes 0.5 2 8] [--repeats 9]

The map looks like a panoptic prediction: a Voronoi diagram of seeds on coordinates pushed around by smooth
noise (blobby regions with wavy borders), a few segments in several parts, islands of other segments or of void
inside regions (holes). It is defined on normalised coordinates, so every size shows the same picture, and it is
seeded, so every run shows the same one.

Printed: conversion time per size, with the default options and with no point budget (the median of several
runs, after a warm-up) and a least-squares line through those times, which splits them into what every image
costs and what each megapixel adds; for each points-per-polygon budget, the IoU of every region with its rasterised
polygons, the points used, and the share of the image where the regions' polygons overlap or leave gaps between
regions; and that share again when every region is simplified on its own. The last line is one JSON object with
all the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.brush import polygon_to_mask  # noqa: E402
from backend.polygons import PolygonOptions, label_map_polygons, mask_polygons, to_percent  # noqa: E402

SEGMENTS = 50
BUDGETS = {"16": 16, "32": 32, "64": 64, "128": 128, "256": 256, "unlimited": 2**31 - 1}
QUALITY_MEGAPIXELS = 2.0


def panoptic_map(megapixels: float, seed: int = 0) -> np.ndarray:
    """[H, W] int32 map with SEGMENTS ids (0 = void), 4:3, about `megapixels` million pixels."""
    height = round(np.sqrt(megapixels * 1e6 * 3 / 4))
    width = round(height * 4 / 3)
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.arange(width, dtype=np.float32) / height, np.arange(height, dtype=np.float32) / height)
    u, v = (
        _warp(u, v, rng, waves=6, frequency=4, amplitude=0.05),
        _warp(v, u, rng, waves=6, frequency=4, amplitude=0.05),
    )
    u, v = (
        _warp(u, v, rng, waves=10, frequency=25, amplitude=0.004),
        _warp(v, u, rng, waves=10, frequency=25, amplitude=0.004),
    )

    # Six extra cells reuse ids of others: those segments come in several parts.
    seeds = rng.random((SEGMENTS + 6, 2)) * (width / height, 1.0)
    cell_ids = np.concatenate([np.arange(1, SEGMENTS + 1), rng.integers(1, SEGMENTS + 1, 6)]).astype(np.int32)
    nearest = cKDTree(seeds).query(np.column_stack([u.ravel(), v.ravel()]), workers=-1)[1]
    labels = cell_ids[nearest].reshape(height, width)

    # Islands of another segment or of void inside regions: holes in their hosts.
    for island in range(12):
        centre = rng.random(2) * (width / height, 1.0)
        radii = rng.uniform(0.015, 0.05, 2)
        inside = ((u - centre[0]) / radii[0]) ** 2 + ((v - centre[1]) / radii[1]) ** 2 < 1
        labels[inside] = 0 if island % 3 == 0 else rng.integers(1, SEGMENTS + 1)
    return labels


def _warp(
    coordinate: np.ndarray, other: np.ndarray, rng: np.random.Generator, waves: int, frequency: float, amplitude: float
) -> np.ndarray:
    """`coordinate` plus a sum of random plane waves over (coordinate, other): smooth noise of about that frequency."""
    shifted = coordinate.copy()
    for _ in range(waves):
        direction = rng.normal(size=2) * frequency
        shifted += amplitude * np.sin(direction[0] * coordinate + direction[1] * other + rng.uniform(0, 2 * np.pi))
    return shifted


def time_conversion(label_map: np.ndarray, repeats: int, options: PolygonOptions) -> float:
    """Median seconds of label_map_polygons (after one warm-up run)."""
    label_map_polygons(label_map, options)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        label_map_polygons(label_map, options)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def per_image_and_per_megapixel(
    megapixels_of: dict[str, float], seconds: dict[str, float]
) -> tuple[float | None, float | None]:
    """Least-squares line through (megapixels, ms): what every image costs, and what each megapixel adds.

    The time per megapixel of one size mixes the two; at small sizes the per-image part (per-part work, keyhole
    cuts, Python calls) dominates it. (None, None) without two distinct sizes.
    """
    megapixels = np.array([megapixels_of[key] for key in seconds])
    if len(np.unique(megapixels)) < 2:
        return None, None
    slope, intercept = np.polyfit(megapixels, 1000 * np.array(list(seconds.values())), 1)
    return float(intercept), float(slope)


def rasterise(polygons, height: int, width: int) -> np.ndarray:
    """[H, W] count of the given polygons covering each pixel."""
    count = np.zeros((height, width), np.int32)
    for polygon in polygons:
        count += polygon_to_mask(to_percent(polygon.points, width, height), width, height)
    return count


def region_ious(label_map: np.ndarray, polygons: dict) -> list[float]:
    """IoU of each region of the map with the union of its rasterised polygons (0 for a region left out)."""
    height, width = label_map.shape
    ious = []
    for region_id in np.unique(label_map[label_map != 0]):
        mask = label_map == region_id
        drawn = rasterise(polygons.get(int(region_id), []), height, width) > 0
        ious.append(float((mask & drawn).sum() / (mask | drawn).sum()))
    return ious


def between_regions_defect_percent(label_map: np.ndarray, polygons, min_area_px: float) -> float:
    """Area covered by two polygons, plus area between regions covered by none, in % of the image.

    Between regions: a pixel away from void and from parts under min_area_px (dropped on purpose), whose borders
    are simplified like any other.
    """
    kept = np.zeros(label_map.shape, bool)
    for region_id in np.unique(label_map[label_map != 0]):
        parts, _ = ndimage.label(label_map == region_id)
        sizes = np.bincount(parts.ravel())
        kept |= (sizes >= min_area_px)[parts] & (parts > 0)
    count = rasterise(polygons, *label_map.shape)
    between_regions = ndimage.binary_erosion(kept, np.ones((3, 3)), border_value=0)
    defect = (count > 1).sum() + ((count == 0) & between_regions).sum()
    return float(100 * defect / label_map.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.5, 2.0, 8.0], help="megapixels")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    print(f"conversion time, {SEGMENTS}-segment panoptic map, default options (median of {args.repeats})")
    seconds, ms_per_mp, ms_per_mp_unlimited, megapixels_of = {}, {}, {}, {}
    for megapixels in args.sizes:
        label_map = panoptic_map(megapixels)
        key = f"{megapixels:g}"
        megapixels_of[key] = label_map.size / 1e6
        seconds[key] = time_conversion(label_map, args.repeats, PolygonOptions())
        ms_per_mp[key] = 1000 * seconds[key] / (label_map.size / 1e6)
        unlimited = time_conversion(label_map, args.repeats, PolygonOptions(max_points=BUDGETS["unlimited"]))
        ms_per_mp_unlimited[key] = 1000 * unlimited / (label_map.size / 1e6)
        polygons = label_map_polygons(label_map)
        points = sum(len(p.points) for parts in polygons.values() for p in parts)
        print(
            f"  {label_map.shape[1]}x{label_map.shape[0]} ({label_map.size / 1e6:.2f} MP): "
            f"{1000 * seconds[key]:.1f} ms = {ms_per_mp[key]:.1f} ms/MP, "
            f"{sum(map(len, polygons.values()))} polygons, {points} points; "
            f"with no point budget {1000 * unlimited:.1f} ms = {ms_per_mp_unlimited[key]:.1f} ms/MP"
        )

    fixed_ms, ms_per_added_mp = per_image_and_per_megapixel(megapixels_of, seconds)
    if fixed_ms is not None:
        print(f"  least-squares line over the sizes: {fixed_ms:.1f} ms per image + {ms_per_added_mp:.1f} ms per MP")

    label_map = panoptic_map(QUALITY_MEGAPIXELS)
    print(
        f"\npoints-per-polygon budget vs region IoU, {label_map.shape[1]}x{label_map.shape[0]}, "
        f"tolerance {PolygonOptions().tolerance_px:g} px"
    )
    mean_iou, min_iou, total_points, defect = {}, {}, {}, {}
    for name, budget in BUDGETS.items():
        polygons = label_map_polygons(label_map, PolygonOptions(max_points=budget))
        ious = region_ious(label_map, polygons)
        all_polygons = [p for parts in polygons.values() for p in parts]
        mean_iou[name], min_iou[name] = statistics.mean(ious), min(ious)
        total_points[name] = sum(len(p.points) for p in all_polygons)
        defect[name] = between_regions_defect_percent(label_map, all_polygons, PolygonOptions().min_area_px)
        print(
            f"  budget {name:>9}: IoU mean {mean_iou[name]:.4f} min {min_iou[name]:.4f}, "
            f"{total_points[name]} points (max {max(len(p.points) for p in all_polygons)}), "
            f"gaps+overlaps {defect[name]:.3f} %"
        )

    separate_defect = {}
    for name in ("256", "unlimited"):
        options = PolygonOptions(max_points=BUDGETS[name])
        separately = [
            p
            for region_id in np.unique(label_map[label_map != 0])
            for p in mask_polygons(label_map == region_id, options)
        ]
        separate_defect[name] = between_regions_defect_percent(label_map, separately, options.min_area_px)
        print(
            f"\ngaps+overlaps between regions, budget {name}: {defect[name]:.3f} % simplified as a coverage, "
            f"{separate_defect[name]:.3f} % simplified region by region"
        )

    print(
        json.dumps(
            {
                "segments": SEGMENTS,
                "seconds": seconds,
                "ms_per_megapixel": ms_per_mp,
                "ms_per_megapixel_no_budget": ms_per_mp_unlimited,
                "line_ms_per_image": fixed_ms,
                "line_ms_per_megapixel": ms_per_added_mp,
                "quality_megapixels": QUALITY_MEGAPIXELS,
                "iou_mean_by_budget": mean_iou,
                "iou_min_by_budget": min_iou,
                "points_by_budget": total_points,
                "gaps_overlaps_percent_by_budget": defect,
                "gaps_overlaps_percent_region_by_region_by_budget": separate_defect,
            }
        )
    )


if __name__ == "__main__":
    main()
