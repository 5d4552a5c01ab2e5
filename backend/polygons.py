"""Turn segmentation masks into Label Studio polygons that annotators can still edit.

Label Studio's polygon is one closed ring of percent coordinates: no holes, no multi-part regions, and its editor
becomes unusable with thousands of points. So every 4-connected part of a region becomes one polygon, simplified
to a few points (`PolygonOptions.tolerance_px`, then harder until `max_points` fits), and holes are kept by joining
each hole to the outer ring with a zero-width cut ("keyhole"): going out along the cut and back along the same
segment adds no area, so a browser canvas fills the ring as the outer boundary minus the holes, under both the
even-odd and the nonzero rule, and so does the shoelace formula.

Coordinates are pixel corners of the original image: pixel (col, row) covers [col, col+1] x [row, row+1], so a
full-image region is the ring (0, 0), (W, 0), (W, H), (0, H).

How a label map becomes polygons (`label_map_polygons`):

1. Trace. Every border between two different labels runs along pixel edges ("cracks"). All cracks of the map are
   found with two vectorised comparisons and linked into closed rings, each walked with its region on the right,
   so a border shared by two regions is traced once for each of them, through the same vertices. Only corners
   where a ring turns or where borders meet are kept. Tracing the whole map in one pass, rather than each segment
   on its own, is what makes the rings of neighbours match vertex for vertex.
2. Parts. Rings with positive area are the outer boundaries of 4-connected parts, rings with negative area their
   holes; a hole belongs to the smallest outer ring of its label that contains it. Parts smaller than
   `min_area_px` are dropped.
3. Simplify. The parts form an exact polygonal coverage, which `shapely.coverage_simplify` (Visvalingam-Whyatt on
   the shared edges) simplifies without opening gaps or overlaps between neighbours. Simplifying each region on its
   own would move the two copies of a shared border differently.
4. Budget. Parts still over `max_points` get the whole coverage simplified again at a higher tolerance, and again,
   each border taking the level of the more demanding part along it, so neighbours still match. Only the largest
   holes a budget can hold are kept (each costs at least 3 points plus 2 for its cut).
5. Keyhole. The outer ring and its holes are joined into one ring (or, with `keep_holes=False`, the outer ring is
   used alone and the holes are filled).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import depth_first_order
from scipy.spatial import cKDTree

# Points a hole adds to a keyhole ring at the least: a triangle, plus the two ends of its cut visited twice.
MIN_POINTS_PER_HOLE = 5
# Tolerance factor from one level of simplification to the next, for parts over the point budget. Each level is a
# GEOS pass over those parts and their neighbours; doubling needs half the passes of a factor of 1.41 for about the
# same IoU at the default budget (bench/polygons.py).
LEVEL_STEP = 2.0
# Candidate cuts tried per hole before settling for the shortest one even if it crosses something.
CUT_CANDIDATES = 64


@dataclass(frozen=True)
class PolygonOptions:
    # Visvalingam-Whyatt: a vertex goes when the triangle it makes with its neighbours has less than tolerance_px²
    # of area (at 1, the corners of one-pixel stair steps, but not those with legs of 1 and 2 pixels). 0: none.
    tolerance_px: float = 1.0
    max_points: int = 256  # points per ring, cuts to holes included
    min_area_px: float = 64.0  # parts with less area (outer minus holes) are dropped
    keep_holes: bool = True  # False: holes are filled, only outer rings are returned

    def __post_init__(self) -> None:
        if not self.tolerance_px >= 0:
            raise ValueError(f"tolerance_px must be >= 0, got {self.tolerance_px}")
        if self.max_points < 3:
            raise ValueError(f"max_points must be at least 3 (a triangle), got {self.max_points}")
        if not self.min_area_px >= 0:
            raise ValueError(f"min_area_px must be >= 0, got {self.min_area_px}")


@dataclass
class Polygon:
    points: list[tuple[float, float]]  # (x, y) in pixels of the original image, one ring, first != last
    area_px: float  # filled area of the region this ring draws (outer minus holes)
    region_id: int  # segment id (label-map value) or 1 for a single mask


def label_map_polygons(label_map: np.ndarray, options: PolygonOptions = PolygonOptions()) -> dict[int, list[Polygon]]:
    """[H, W] integer map (0 = no region) -> polygons per region id, simplified together as a coverage.

    Each region id maps to one polygon per part, largest first. Ids whose parts are all dropped are left out.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label_map must be 2-D [H, W], got shape {label_map.shape}")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label_map must have an integer dtype, got {label_map.dtype} (use mask_polygons for masks)")
    if label_map.size == 0:
        return {}
    lowest, highest = int(label_map.min()), int(label_map.max())
    fitting = [t for t in (np.uint8, np.int16, np.int32) if np.iinfo(t).min <= lowest and highest <= np.iinfo(t).max]
    if not fitting:
        raise ValueError(f"label_map values must fit in int32, got {lowest}..{highest}")
    narrowest = fitting[0]
    polygons: dict[int, list[Polygon]] = {}
    for polygon in _polygons(label_map, narrowest, options):
        polygons.setdefault(polygon.region_id, []).append(polygon)
    return dict(sorted(polygons.items()))


def mask_polygons(mask: np.ndarray, options: PolygonOptions = PolygonOptions()) -> list[Polygon]:
    """[H, W] bool mask (e.g. one referring mask) -> its polygons (one per part, largest first)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be a bool array, got {mask.dtype} (e.g. pass mask > 0)")
    if mask.size == 0:
        return []
    return _polygons(mask.view(np.uint8), np.uint8, options)


def to_percent(points, width: int, height: int) -> list[list[float]]:
    """pixel (x, y) -> Label Studio [x%, y%] clamped to 0..100."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    percent = np.clip(xy * (100.0 / width, 100.0 / height), 0.0, 100.0)
    return percent.tolist()


def _polygons(labels: np.ndarray, dtype: type, options: PolygonOptions) -> list[Polygon]:
    parts, part_labels = _parts(_trace_rings(labels, dtype), options.min_area_px)
    parts = _simplify(parts, options)
    areas = shapely.area(parts)
    order = np.lexsort((-areas, part_labels))
    return [
        Polygon(points=_keyhole_ring(parts[i]), area_px=float(areas[i]), region_id=int(part_labels[i])) for i in order
    ]


def _simplify(parts: np.ndarray, options: PolygonOptions) -> np.ndarray:
    """Simplify the coverage `parts`, harder where a part is over the point budget, keeping it a coverage.

    Harder means simplifying again at LEVEL_STEP times the tolerance, and again, until each part fits at some
    level; each time the parts still over budget and the parts touching them, as a coverage of their own (parts
    further away would not change anything that is kept). A border then takes the level of the more demanding of
    the two parts along it (see `_merge_levels`), so neighbours still share it exactly and a part never has more
    points than at its own level. Points count as in the final ring, with the holes kept at that level (see
    `_kept_holes`); the others are filled at the end, since until then their borders are shared with the parts
    inside them. Parts that no tolerance brings within budget (every vertex left is a corner where three parts
    meet, or a hole is in the way) are finished on their own from their most simplified level, their borders no
    longer shared exactly.
    """
    if not len(parts):
        return parts
    level_zero = _coverage_simplify(parts, options.tolerance_px) if options.tolerance_px > 0 else parts
    smallest_holes = [0.0]  # area of the smallest hole kept at each level
    over_budget = _point_counts(level_zero, options, smallest_holes[0]) > options.max_points
    level_of_part = np.zeros(len(parts), np.intp)
    runs: list[tuple[np.ndarray, np.ndarray]] = []  # per level above 0: (parts simplified, their geometry)
    latest = level_zero.copy()
    if over_budget.any():
        touching = _touching_pairs(level_zero)
        tolerance = options.tolerance_px
        useless_tolerance = _useless_tolerance(parts)
        while over_budget.any() and tolerance < useless_tolerance:
            tolerance = max(LEVEL_STEP * tolerance, 1.0)
            smallest_holes.append(tolerance**2)
            run = over_budget.copy()
            run[touching[1][over_budget[touching[0]]]] = True
            run = np.flatnonzero(run)
            latest[run] = _coverage_simplify(latest[run], tolerance)
            runs.append((run, latest[run]))
            level_of_part[over_budget] = len(runs)
            over_budget[run] &= _point_counts(latest[run], options, smallest_holes[-1]) > options.max_points
    merged = _merge_levels(level_zero, runs, level_of_part) if runs else level_zero.copy()
    for index in np.flatnonzero(shapely.get_num_interior_rings(merged) > 0):
        merged[index] = _kept_holes(merged[index], options, smallest_holes[level_of_part[index]])
    for index in np.flatnonzero(over_budget):
        merged[index] = _fit_budget(latest[index], options)
    return merged


def _coverage_simplify(geometry, tolerance: float):
    """`shapely.coverage_simplify`, removing only vertices whose triangle has less than tolerance² of area.

    GEOS also removes those with exactly tolerance²; on the pixel grid at 1 px that is every corner with legs of
    1 and 2 pixels, and removing them all costs small wiggly parts several percent of their area.
    """
    return shapely.coverage_simplify(geometry, np.nextafter(tolerance, 0))


def _touching_pairs(parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): every ordered pair of parts with a vertex in common (a border, or a corner where they touch)."""
    xy, part = shapely.get_coordinates(parts, return_index=True)
    corner = _corner_numbers(xy)
    by_corner = np.lexsort((part, corner))
    corner, part = corner[by_corner], part[by_corner]
    first_listing = np.r_[True, (corner[1:] != corner[:-1]) | (part[1:] != part[:-1])]
    corner, part = corner[first_listing], part[first_listing]
    pairs = []
    for offset in (1, 2, 3):  # at most four parts meet at a corner: the four pixels around it
        same = corner[offset:] == corner[:-offset]
        pairs += [(part[:-offset][same], part[offset:][same]), (part[offset:][same], part[:-offset][same])]
    return np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs])


def _merge_levels(
    level_zero: np.ndarray, runs: list[tuple[np.ndarray, np.ndarray]], level_of_part: np.ndarray
) -> np.ndarray:
    """Each part of `level_zero` with every border as simplified at the level of the more demanding part along it.

    Every run simplifies, from the previous level, the parts over budget and all the parts touching them, so
    the two parts along a border of a part over budget are in the same runs up to its level. Simplification only
    removes vertices, never a corner where three parts meet: a vertex inside such a border is in both rings, and
    both keep or lose it together at every level. Keeping it only if it survives at the higher of the two parts'
    levels gives both rings the same border. (A corner where two parts only touch is a vertex of each on its own:
    each keeps it as at its own level.) A part whose borders come from different levels could in principle cross
    itself (each run was checked for crossings only within itself); such a part keeps its own level instead.
    """
    rings, part_of_ring = shapely.get_rings(level_zero, return_index=True)
    xy, ring_of_vertex = shapely.get_coordinates(rings, return_index=True)
    not_closing = np.r_[ring_of_vertex[1:] == ring_of_vertex[:-1], False]
    xy, ring_of_vertex = xy[not_closing], ring_of_vertex[not_closing]
    part_of_vertex = part_of_ring[ring_of_vertex]
    corners, corner_of_vertex = np.unique(_corner_numbers(xy), return_inverse=True)
    needed_level = np.zeros(len(corners), np.intp)
    np.maximum.at(needed_level, corner_of_vertex, level_of_part[part_of_vertex])
    needed_level = needed_level[corner_of_vertex]
    kept = needed_level == 0
    own_level = level_zero.copy()
    for level, (run, geometry) in enumerate(runs, start=1):
        at_level = needed_level == level
        run_xy, index_in_run = shapely.get_coordinates(geometry, return_index=True)
        kept[at_level] = np.isin(
            _corner_numbers(xy[at_level], part_of_vertex[at_level]), _corner_numbers(run_xy, run[index_in_run])
        )
        at_own_level = level_of_part[run] == level
        own_level[run[at_own_level]] = geometry[at_own_level]
    merged_rings = shapely.linearrings(xy[kept], indices=ring_of_vertex[kept])
    merged = shapely.polygons(merged_rings, indices=part_of_ring)

    mixed = shapely.get_num_coordinates(merged) != shapely.get_num_coordinates(own_level)
    broken = mixed & ~shapely.is_valid(merged)
    merged[broken] = own_level[broken]
    return merged


def _corner_numbers(xy: np.ndarray, parts: np.ndarray | None = None) -> np.ndarray:
    """One integer per pixel corner (vertices are on pixel corners), or per (part, corner) when `parts` is given."""
    x, y = xy.astype(np.int64).T
    number = y << 24 | x  # images are far below 2**24 pixels wide
    return number if parts is None else parts.astype(np.int64) << 48 | number


def _kept_holes(part: shapely.Polygon, options: PolygonOptions, smallest_hole: float) -> shapely.Polygon:
    """`part` with the holes its ring keeps (the others filled).

    None without `keep_holes`. Otherwise those of at least `smallest_hole` area (simplifying harder for the budget
    at tolerance t, holes under t² are below what it resolves, and each would cost at least MIN_POINTS_PER_HOLE
    points), and of those at most as many as a ring of `max_points` could hold, the largest.
    """
    if not part.interiors:
        return part
    affordable = (options.max_points - 3) // MIN_POINTS_PER_HOLE if options.keep_holes else 0
    holes = [(shapely.Polygon(ring).area, ring) for ring in part.interiors]
    largest_first = sorted((hole for hole in holes if hole[0] >= smallest_hole), key=lambda hole: -hole[0])
    return shapely.Polygon(part.exterior, [ring for _, ring in largest_first[:affordable]])


def _point_counts(parts: np.ndarray, options: PolygonOptions, smallest_hole: float) -> np.ndarray:
    """Points of the ring each part becomes: every ring without its closing point, plus 2 per cut to a hole."""
    parts = parts.copy()
    for index in np.flatnonzero(shapely.get_num_interior_rings(parts) > 0):
        parts[index] = _kept_holes(parts[index], options, smallest_hole)
    holes = shapely.get_num_interior_rings(parts)
    return shapely.get_num_coordinates(parts) - (holes + 1) + 2 * holes


def _useless_tolerance(geometry) -> float:
    """A tolerance at which Visvalingam-Whyatt removes every vertex it can: no triangle in `geometry` is larger."""
    x_min, y_min, x_max, y_max = shapely.total_bounds(geometry)
    return 2 * float(np.sqrt((x_max - x_min) * (y_max - y_min))) + 1


def _fit_budget(part: shapely.Polygon, options: PolygonOptions) -> shapely.Polygon:
    """Simplify `part` on its own, harder and harder, until its ring has at most `options.max_points` points.

    If no tolerance simplifies it enough (simplification never makes an outer ring cross a hole), holes are
    dropped, smallest first.
    """

    def over_budget(part: shapely.Polygon, smallest_hole: float) -> bool:
        return _point_counts(np.array([part], dtype=object), options, smallest_hole)[0] > options.max_points

    tolerance, smallest_hole = options.tolerance_px, 0.0
    part = _kept_holes(part, options, smallest_hole)
    useless_tolerance = _useless_tolerance(part)
    while over_budget(part, smallest_hole) and tolerance < useless_tolerance:
        tolerance = max(LEVEL_STEP * tolerance, 1.0)
        smallest_hole = tolerance**2
        part = _coverage_simplify(_kept_holes(part, options, smallest_hole), tolerance)
    while over_budget(part, smallest_hole) and part.interiors:
        holes = list(part.interiors)
        holes.pop(int(np.argmin([shapely.Polygon(ring).area for ring in holes])))
        part = _coverage_simplify(shapely.Polygon(part.exterior, holes), tolerance)
    return _kept_holes(part, options, smallest_hole)


@dataclass
class _Rings:
    xy: np.ndarray  # [N, 2] float64 vertex coordinates (pixel corners) of all rings, one ring after the other
    ring_of_vertex: np.ndarray  # [N] ring index of each vertex, ascending
    labels: np.ndarray  # [R] label each ring bounds (on its right when walked)
    areas: np.ndarray  # [R] signed area: outer rings > 0, holes < 0


# Walking directions on the pixel-corner grid, numbered so that +1 turns right and +3 turns left (y points down).
EAST, SOUTH, WEST, NORTH = 0, 1, 2, 3


def _trace_rings(labels: np.ndarray, dtype: type) -> _Rings:
    """All rings of all nonzero labels of `labels`, each with its label on the right-hand side."""
    height, width = labels.shape
    # A frame of zeros makes the image border an ordinary border and keeps neighbour lookups inside the array.
    padded_width = width + 2
    padded = np.zeros((height + 2, padded_width), dtype)
    padded[1:-1, 1:-1] = labels
    flat = padded.ravel()
    # Vertex (x, y) is numbered by the flat index of the padded pixel up-left of it, so the 2x2 pixels around
    # vertex v are flat[v + up_left], flat[v + up_right], ... and a step in a direction adds step[direction].
    up_left, up_right, down_left, down_right = 0, 1, padded_width, padded_width + 1
    step = np.array([1, padded_width, -1, -padded_width])
    # Pixels ahead of a walker arriving at a vertex, on its right and on its left, and the pixel behind on its left.
    ahead_right = np.array([down_right, down_left, up_left, up_right])
    ahead_left = np.array([up_right, down_right, down_left, up_left])
    behind_left = np.array([up_left, up_right, down_right, down_left])

    # k in across: pixels k and k+1 differ, a vertical crack from vertex k - padded_width down to vertex k.
    # k in along: pixels k and k + padded_width differ, a horizontal crack from vertex k - 1 to vertex k.
    # The frame makes the row wrap-around of flat indices harmless: both ends of it are frame zeros.
    across = np.flatnonzero(flat[:-1] != flat[1:])
    along = np.flatnonzero(flat[:-padded_width] != flat[padded_width:])
    # Each crack is walked once per side, keeping the side's label on the walker's right.
    starts = np.concatenate([along - 1, across - padded_width, along, across])
    directions = np.repeat(np.array([EAST, SOUTH, WEST, NORTH], np.intp), [len(along), len(across)] * 2)
    edge_labels = np.concatenate([flat[along + padded_width], flat[across], flat[along], flat[across + 1]])
    on_region = edge_labels != 0
    starts, directions, edge_labels = starts[on_region], directions[on_region], edge_labels[on_region]
    keys = starts * 4 + directions  # unique: one walk leaves a vertex in a given direction
    by_key = np.argsort(keys, kind="stable")  # four already sorted runs: a merge, not a full sort
    keys, starts, directions, edge_labels = keys[by_key], starts[by_key], directions[by_key], edge_labels[by_key]

    # Where each walk goes next: keep the region on the right, separating regions that touch only at a corner
    # (4-connectivity): turn right when the pixel ahead-right is not ours, left when both pixels ahead are ours.
    ends = starts + step[directions]
    ahead_right_ours = flat[ends + ahead_right[directions]] == edge_labels
    ahead_left_label = flat[ends + ahead_left[directions]]
    ahead_left_ours = ahead_left_label == edge_labels
    turn = np.where(~ahead_right_ours, 1, np.where(ahead_left_ours, 3, 0))
    successor = np.searchsorted(keys, ends * 4 + (directions + turn) % 4)

    ring_order = _cycles(successor)
    # A part whose outside reaches into it through a single corner (a "saddle": ours on one diagonal, others on the
    # other) comes back to that corner, and its ring would touch itself there, which polygon validity forbids.
    # Reconnecting the two walks through the corner splits that ring into an outer ring and a hole that touch.
    saddles = np.flatnonzero(~ahead_right_ours & ahead_left_ours)
    saddles = saddles[np.lexsort((edge_labels[saddles], ends[saddles]))].reshape(-1, 2)  # two walks per saddle
    ring_of_edge = np.empty(len(successor), np.intp)
    ring_of_edge[ring_order] = np.cumsum(_ring_starts(ring_order, successor)) - 1
    pinched = saddles[ring_of_edge[saddles[:, 0]] == ring_of_edge[saddles[:, 1]]]
    if len(pinched):
        successor[pinched[:, 0]], successor[pinched[:, 1]] = successor[pinched[:, 1]], successor[pinched[:, 0]]
        ring_order = _cycles(successor)

    # A vertex where the walk goes straight on and no other border meets it is not needed.
    straight_through = (turn == 0) & (flat[ends + behind_left[directions]] == ahead_left_label)
    needed = np.empty(len(successor), bool)
    needed[successor] = ~straight_through
    first_of_ring = _ring_starts(ring_order, successor)
    kept = needed[ring_order]
    vertices = starts[ring_order[kept]]
    ring_of_vertex = np.cumsum(first_of_ring)[kept] - 1
    ring_labels = edge_labels[ring_order[first_of_ring]]
    # Shoelace; walked with the region on the right (y down), outer rings have positive area and holes negative.
    x, y = vertices % padded_width, vertices // padded_width
    following = _next_in_ring(ring_of_vertex, len(ring_labels))
    areas = np.bincount(ring_of_vertex, x * y[following] - x[following] * y, len(ring_labels)) / 2
    return _Rings(
        xy=np.column_stack([x, y]).astype(np.float64),
        ring_of_vertex=ring_of_vertex,
        labels=ring_labels,
        areas=areas,
    )


def _next_in_ring(ring_of_vertex: np.ndarray, ring_count: int) -> np.ndarray:
    """Index of the next vertex of each vertex along its ring (rings stored one after another)."""
    first = np.searchsorted(ring_of_vertex, np.arange(ring_count))
    last = np.r_[first[1:], len(ring_of_vertex)][:ring_count] - 1
    following = np.arange(1, len(ring_of_vertex) + 1)
    following[last] = first
    return following


def _cycles(successor: np.ndarray) -> np.ndarray:
    """Indices of a permutation ordered cycle after cycle, each cycle in successor order.

    A depth-first walk from an extra root linked to every index follows each cycle to its end before moving on.
    """
    count = len(successor)
    indptr = np.concatenate([[0], np.arange(count, 2 * count + 1)])
    indices = np.concatenate([np.arange(1, count + 1), successor + 1])
    graph = csr_matrix((np.ones(2 * count, np.int8), indices, indptr), shape=(count + 1, count + 1))
    return depth_first_order(graph, 0, directed=True, return_predecessors=False)[1:] - 1


def _ring_starts(ring_order: np.ndarray, successor: np.ndarray) -> np.ndarray:
    """For each position of `ring_order`, whether a new cycle starts there."""
    starts = np.ones(len(ring_order), bool)
    starts[1:] = successor[ring_order[:-1]] != ring_order[1:]
    return starts


def _parts(rings: _Rings, min_area_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Rings -> (shapely Polygons with holes, one per part of at least `min_area_px`, and their labels)."""
    ring_count = len(rings.labels)
    if ring_count == 0:
        return np.empty(0, object), np.empty(0, np.int64)
    signed_area = rings.areas
    ring_geoms = shapely.linearrings(rings.xy, indices=rings.ring_of_vertex)
    is_shell = signed_area > 0
    shells, holes = np.flatnonzero(is_shell), np.flatnonzero(~is_shell)
    owner = np.arange(ring_count)
    if len(holes):
        # A hole's owner is the smallest outer ring of its label containing a point of the hole's border; the
        # middle of its first edge lies on no other ring of that label, so it is strictly inside the owner.
        first = np.searchsorted(rings.ring_of_vertex, holes)
        probes = shapely.points((rings.xy[first] + rings.xy[first + 1]) / 2)
        shell_polygons = shapely.polygons(ring_geoms[shells])
        hole_index, shell_index = shapely.STRtree(shell_polygons).query(probes, predicate="within")
        same_label = rings.labels[holes[hole_index]] == rings.labels[shells[shell_index]]
        hole_index, shell_index = hole_index[same_label], shell_index[same_label]
        smallest_first = np.lexsort((signed_area[shells[shell_index]], hole_index))
        hole_index, shell_index = hole_index[smallest_first], shell_index[smallest_first]
        first_match = np.r_[True, hole_index[1:] != hole_index[:-1]]
        owner[holes[hole_index[first_match]]] = shells[shell_index[first_match]]

    part_area = np.bincount(owner, signed_area, ring_count)
    kept_part = is_shell & (part_area >= min_area_px)
    kept_ring = kept_part[owner]
    ring_indices = np.flatnonzero(kept_ring)
    shell_first = ring_indices[np.lexsort((~is_shell[ring_indices], owner[ring_indices]))]
    parts = shapely.polygons(ring_geoms[shell_first], indices=np.unique(owner[shell_first], return_inverse=True)[1])
    return parts, rings.labels[np.flatnonzero(kept_part)]


def _keyhole_ring(part: shapely.Polygon) -> list[tuple[float, float]]:
    """One ring drawing `part`: its outer ring with a zero-width cut out to each hole and back.

    Each cut joins a hole to the ring built so far by the shortest segment that stays inside the part and crosses
    no earlier cut, so the result looks like the region with thin slits; the fill is right even when no such
    segment is found among the candidates and the shortest one is used.
    """
    part = shapely.orient_polygons(part)  # holes turn the other way from the outer ring: their area subtracts
    ring = np.asarray(part.exterior.coords)[:-1]
    holes = [np.asarray(interior.coords)[:-1] for interior in part.interiors]
    if holes:
        shapely.prepare(part)
        holes.sort(key=lambda hole: cKDTree(ring).query(hole)[0].min())
        cuts: list[shapely.LineString] = []
        for hole in holes:
            ring_index, hole_index = _cut(part, ring, hole, shapely.multilinestrings(cuts) if cuts else None)
            ring = np.concatenate(
                [ring[: ring_index + 1], hole[hole_index:], hole[: hole_index + 1], ring[ring_index:]]
            )
            cuts.append(shapely.LineString([ring[ring_index], hole[hole_index]]))
        # A hole touching the outer ring at a corner gets a cut of length zero: drop the repeated point.
        ring = ring[np.any(ring != np.roll(ring, 1, axis=0), axis=1)]
    return list(map(tuple, ring.tolist()))


def _cut(part: shapely.Polygon, ring: np.ndarray, hole: np.ndarray, cuts) -> tuple[int, int]:
    """(ring vertex, hole vertex) of the shortest segment between them inside `part`, crossing none of `cuts`."""
    neighbours = min(8, len(ring))
    distances, ring_indices = cKDTree(ring).query(hole, k=neighbours)
    distances, ring_indices = distances.reshape(len(hole), neighbours), ring_indices.reshape(len(hole), neighbours)
    by_length = np.argsort(distances, axis=None)[:CUT_CANDIDATES]
    hole_indices, neighbour = np.unravel_index(by_length, distances.shape)
    ring_indices = ring_indices[hole_indices, neighbour]
    segments = shapely.linestrings(np.stack([ring[ring_indices], hole[hole_indices]], axis=1))
    usable = shapely.covered_by(segments, part)
    if cuts is not None:
        usable &= ~shapely.crosses(segments, cuts)
    chosen = int(np.argmax(usable))  # the shortest usable one, or the shortest of all when none is usable
    return int(ring_indices[chosen]), int(hole_indices[chosen])
