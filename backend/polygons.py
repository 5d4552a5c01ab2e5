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
   so a border shared by two regions is traced once for each of them, through the same vertices. A straight run
   of cracks with the same two labels on either side is walked as one edge, so only corners where a ring turns
   or where borders meet are kept. Tracing the whole map in one pass, rather than each segment
   on its own, is what makes the rings of neighbours match vertex for vertex.
2. Parts. Rings with positive area are the outer boundaries of 4-connected parts, rings with negative area their
   holes; a hole belongs to the smallest outer ring of its label that contains it. Parts smaller than
   `min_area_px` are dropped.
3. Simplify. The parts form an exact polygonal coverage. Each ring is cut at the corners where three or more
   borders meet, into border pieces that each separate the same two parts all along; each piece is simplified once
   (Douglas-Peucker, `shapely.simplify`, its ends fixed) and both rings along it use the result, so neighbours keep
   sharing their borders exactly: no gaps, no overlaps. Small or thin parts, which have much border for their
   area, have their borders simplified less. Simplifying each region on its own would move the two
   copies of a shared border differently. (`shapely.coverage_simplify` gives the same guarantee, but it finds the
   shared edges again, which the trace already knows, and took twice as long as all the rest together.) A part
   that comes out crossing itself (a sliver whose two sides moved towards each other) is redone less simplified.
4. Budget. Parts still over `max_points` are simplified again at a higher tolerance, and again, each border
   taking the level of the more demanding part along it, so neighbours still match. Only the largest holes a
   budget can hold are kept (each costs at least 3 points plus 2 for its cut).
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
# Tolerance factor from one level of simplification to the next, for parts over the point budget. A level costs
# little (Douglas-Peucker on those parts' borders), and small steps leave parts closer to their budget: at 2 MP,
# budget 256, 1.25 kept 5,050 points and a mean IoU of 0.993 where 2 kept 3,357 and 0.991 (bench/polygons.py,
# before small parts scaled their borders' tolerances down).
LEVEL_STEP = 1.25
# Douglas-Peucker at tolerance t moves up to about AREA_MOVED_PER_TOLERANCE * t px² of area (gained or lost) per px
# of traced border: (1 - IoU) * A / (t * P) was 0.24 at most over 1,535 parts of 400+ px of model-like maps
# (tests/test_polygons.py's generator, seeds 0-399). So a part of area A and traced perimeter P keeps an IoU of
# about 1 - MAX_AREA_MOVED at a tolerance of at most MAX_AREA_MOVED * A / (AREA_MOVED_PER_TOLERANCE * P).
AREA_MOVED_PER_TOLERANCE = 0.25
MAX_AREA_MOVED = 0.03
# Candidate cuts tried per hole before settling for the shortest one even if it crosses something.
CUT_CANDIDATES = 64
CUTS_TESTED_AT_ONCE = 8


@dataclass(frozen=True)
class PolygonOptions:
    # Douglas-Peucker: a simplified border stays within tolerance_px of the traced one. 0.75 takes out one-pixel
    # stair steps (0.71 px off a diagonal); at 1, some parts of 400-500 px fell to an IoU of 0.93. 0: none.
    tolerance_px: float = 0.75
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
    points: np.ndarray  # [K, 2] float64 (x, y) in pixels of the original image, one ring, first != last
    area_px: float  # filled area of the region this ring draws (outer minus holes)
    region_id: int  # segment id (label-map value) or 1 for a single mask

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Polygon):
            return NotImplemented
        return (self.area_px, self.region_id) == (other.area_px, other.region_id) and np.array_equal(
            self.points, other.points
        )


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
    rings = _trace_rings(labels, dtype)
    parts = _parts(rings, options.min_area_px)
    # Holes turn the other way from the outer ring, so that their area subtracts in a keyhole ring.
    geometry = shapely.orient_polygons(_simplify(rings, parts, options))
    areas = shapely.area(geometry)
    points = _outer_rings(geometry)
    for index in np.flatnonzero(shapely.get_num_interior_rings(geometry)):
        points[index] = _keyhole_ring(geometry[index])
    order = np.lexsort((-areas, parts.labels))
    return [Polygon(points=points[i], area_px=float(areas[i]), region_id=int(parts.labels[i])) for i in order]


def _simplify(rings: _Rings, parts: _Parts, options: PolygonOptions) -> np.ndarray:
    """Shapely Polygons of `parts`, each border simplified once for the parts on both sides of it.

    Each border piece (see `_borders`) is simplified on its own with Douglas-Peucker, ends fixed, and both rings
    along it use the result, so neighbours keep sharing their borders exactly. Levels: 0 is the traced border,
    1 `options.tolerance_px`, each further level LEVEL_STEP times the last (at least 1 px). Every part starts at
    level 1; a part over the point budget goes one level up, and a border takes the level of the more demanding
    part along it, so a part never has more points than at its own level. A border's tolerances are those of its
    level scaled down to what the smallest or thinnest part along it can afford (see MAX_AREA_MOVED). Points count as
    in the final ring, with the holes kept at that level (see `_drawn_rings`); the others are filled, although the
    parts inside them stay.

    Douglas-Peucker may make a thin part cross itself. Such a part has the borders of its rings taken one level
    down, and again, until it is valid (at level 0 it is as traced, and valid). Parts that no level brings within
    budget (a ring keeps at least its cut points, and a hole costs at least MIN_POINTS_PER_HOLE) are finished on
    their own (`_fit_budget`), their borders no longer shared exactly.
    """
    part_count = len(parts.labels)
    if not part_count:
        return np.empty(0, object)
    borders = _borders(rings)
    occurrence_part = parts.part_of_ring[borders.occurrence_ring]
    drawn_occurrence = np.flatnonzero(occurrence_part >= 0)
    occurrence_border = borders.occurrence_border[drawn_occurrence]
    occurrence_part = occurrence_part[drawn_occurrence]
    # A small or thin part has much border for its area: its borders climb a ladder scaled down to the tolerance
    # it can afford, so a neighbour raised for its budget takes them only gradually harder.
    scale = np.ones(len(borders.lines))
    if options.tolerance_px > 0:
        perimeter = np.bincount(occurrence_part, shapely.length(borders.lines)[occurrence_border], part_count)
        affordable = MAX_AREA_MOVED * parts.areas / (AREA_MOVED_PER_TOLERANCE * perimeter)
        np.minimum.at(scale, occurrence_border, affordable[occurrence_part] / options.tolerance_px)
    tolerances = [0.0, options.tolerance_px]
    # Douglas-Peucker keeps nothing but the ends of a border beyond its diagonal.
    smallest_scale = scale.min()
    while tolerances[-1] * smallest_scale < rings.diagonal:
        tolerances.append(max(LEVEL_STEP * tolerances[-1], 1.0))
    tolerances = np.array(tolerances)
    top_level = len(tolerances) - 1

    simplified = borders.lines.copy()
    simplified_level = np.zeros(len(simplified), np.intp)
    simplified_tolerance = np.zeros(len(simplified))
    ceiling = np.full(len(simplified), top_level)

    def simplify_borders(part_level: np.ndarray) -> None:
        wanted = np.zeros(len(simplified), np.intp)
        np.maximum.at(wanted, occurrence_border, part_level[occurrence_part])
        np.minimum(wanted, ceiling, out=simplified_level)
        tolerance = tolerances[simplified_level] * scale
        changed = np.flatnonzero(tolerance != simplified_tolerance)
        exact, approximate = changed[tolerance[changed] == 0], changed[tolerance[changed] > 0]
        simplified[exact] = borders.lines[exact]
        simplified[approximate] = shapely.simplify(
            borders.lines[approximate], tolerance[approximate], preserve_topology=False
        )
        simplified_tolerance[changed] = tolerance[changed]

    def point_counts(drawn: np.ndarray) -> np.ndarray:
        points = shapely.get_num_coordinates(simplified)[borders.occurrence_border] - 1
        ring_points = np.bincount(borders.occurrence_ring, points, len(rings.labels)) + 2 * parts.is_hole
        return np.bincount(parts.part_of_ring[drawn], ring_points[drawn], part_count).astype(np.int64)

    part_level = np.ones(part_count, np.intp)
    while True:
        simplify_borders(part_level)
        drawn = _drawn_rings(parts, part_level, tolerances, options)
        raised = (point_counts(drawn) > options.max_points) & (part_level < top_level)
        if not raised.any():
            break
        part_level[raised] += 1

    geometry = _assemble(rings, parts, borders, simplified, drawn)
    broken = ~shapely.is_valid(geometry)
    while broken.any():
        lowered = occurrence_border[broken[occurrence_part]]
        ceiling[lowered] = np.maximum(simplified_level[lowered] - 1, 0)
        simplify_borders(part_level)
        geometry = _assemble(rings, parts, borders, simplified, drawn)
        broken = ~shapely.is_valid(geometry)
    for index in np.flatnonzero(point_counts(drawn) > options.max_points):
        geometry[index] = _fit_budget(geometry[index], options)
    return geometry


def _drawn_rings(parts: _Parts, part_level: np.ndarray, tolerances: np.ndarray, options: PolygonOptions) -> np.ndarray:
    """[R] bool: the rings each part is drawn with at its level, the outer ring and the holes it keeps.

    None without `keep_holes`. Otherwise those of at least t² area at a tolerance t above the first (below what
    it resolves, and each would cost at least MIN_POINTS_PER_HOLE points), and of those at most as many as a ring
    of `max_points` could hold, the largest.
    """
    level = part_level[parts.part_of_ring]
    smallest_hole = np.where(level > 1, tolerances[level] ** 2, 0.0)
    affordable = (options.max_points - 3) // MIN_POINTS_PER_HOLE if options.keep_holes else 0
    kept_hole = (parts.hole_area >= smallest_hole) & (parts.hole_rank < affordable)
    return (parts.part_of_ring >= 0) & (~parts.is_hole | kept_hole)


def _assemble(rings: _Rings, parts: _Parts, borders: _Borders, simplified: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """[P] shapely Polygons: each drawn ring put together from its border pieces as simplified."""
    xy, piece_of_point = shapely.get_coordinates(simplified, return_index=True)
    piece_points = np.bincount(piece_of_point, minlength=len(simplified))
    piece_start = np.r_[0, np.cumsum(piece_points)[:-1]]
    occurrences = np.flatnonzero(drawn[borders.occurrence_ring])
    piece = borders.occurrence_border[occurrences]
    # A piece's last point is the first of the next piece along the ring.
    taken = piece_points[piece] - 1
    occurrence_of_point = np.repeat(np.arange(len(occurrences)), taken)
    along = np.arange(len(occurrence_of_point)) - np.repeat(np.cumsum(taken) - taken, taken)
    point_piece = piece[occurrence_of_point]
    backwards = borders.occurrence_reversed[occurrences][occurrence_of_point]
    point = piece_start[point_piece] + np.where(backwards, piece_points[point_piece] - 1 - along, along)
    ring_of_point = borders.occurrence_ring[occurrences][occurrence_of_point]  # ascending
    new_ring = np.r_[True, ring_of_point[1:] != ring_of_point[:-1]]
    drawn_ring, ring_number = ring_of_point[new_ring], np.cumsum(new_ring) - 1
    ring_geometry = shapely.linearrings(xy[point], indices=ring_number)
    shell_first = np.lexsort((parts.is_hole[drawn_ring], parts.part_of_ring[drawn_ring]))
    return shapely.polygons(ring_geometry[shell_first], indices=parts.part_of_ring[drawn_ring][shell_first])


def _ring_points(part: shapely.Polygon) -> int:
    """Points of the keyhole ring `part` becomes: every ring without its closing point, plus 2 per cut to a hole."""
    holes = len(part.interiors)
    return shapely.get_num_coordinates(part) - (holes + 1) + 2 * holes


def _fit_budget(part: shapely.Polygon, options: PolygonOptions) -> shapely.Polygon:
    """Simplify `part` on its own, harder and harder, until its ring has at most `options.max_points` points.

    With `shapely.coverage_simplify` (Visvalingam-Whyatt) on the one part: it keeps every ring valid and can take
    it down to a triangle, where topology-preserving Douglas-Peucker stops at four points. The holes kept are those
    `_drawn_rings` would keep at each tolerance. If no tolerance simplifies it enough (simplification never makes
    an outer ring cross a hole), holes are dropped, smallest first.
    """
    affordable = (options.max_points - 3) // MIN_POINTS_PER_HOLE if options.keep_holes else 0
    holes = sorted(part.interiors, key=lambda ring: -shapely.Polygon(ring).area)[:affordable]
    x_min, y_min, x_max, y_max = part.bounds
    diagonal = float(np.hypot(x_max - x_min, y_max - y_min))
    tolerance = options.tolerance_px

    def simplified() -> shapely.Polygon:
        return shapely.coverage_simplify(shapely.Polygon(part.exterior, holes), tolerance)

    simple = simplified()
    while _ring_points(simple) > options.max_points and tolerance < diagonal:
        tolerance = max(LEVEL_STEP * tolerance, 1.0)
        holes = [ring for ring in holes if shapely.Polygon(ring).area >= tolerance**2]
        simple = simplified()
    while _ring_points(simple) > options.max_points and holes:
        holes.pop()
        simple = simplified()
    return simple


@dataclass
class _Rings:
    xy: np.ndarray  # [N, 2] float64 vertex coordinates (pixel corners) of all rings, one ring after the other
    ring_of_vertex: np.ndarray  # [N] ring index of each vertex, ascending
    labels: np.ndarray  # [R] label each ring bounds (on its right when walked)
    areas: np.ndarray  # [R] signed area: outer rings > 0, holes < 0
    corners: np.ndarray  # [N] int64 number of each vertex's pixel corner, the same in every ring through it
    junctions: np.ndarray  # [N] bool: three or four borders meet at the vertex (or two, at a saddle)
    diagonal: float  # of the map, in pixels


@dataclass
class _Parts:
    part_of_ring: np.ndarray  # [R] part each ring bounds (outer ring or hole), -1 for parts dropped as too small
    is_hole: np.ndarray  # [R] bool
    hole_area: np.ndarray  # [R] area inside each hole (0 for outer rings)
    hole_rank: np.ndarray  # [R] place of each hole among its part's holes, largest first (0 for outer rings)
    labels: np.ndarray  # [P] label of each part
    areas: np.ndarray  # [P] area of each part, its holes taken out


@dataclass
class _Borders:
    """The rings cut into border pieces, each piece simplified once for both rings along it.

    Rings are cut at junctions, so each piece separates the same two parts (or a part and void) all along. A
    ring with fewer than three junctions is also cut at its four extreme corners (first and last in row order,
    lowest on the left, highest on the right): they are never all on one line, so the ring stays at least a
    triangle when each piece is simplified down to its ends. The ring on the other side of those pieces is cut
    there too, since cuts are corners.
    """

    lines: np.ndarray  # [B] LineStrings, each piece as traced, walked as by its first occurrence
    occurrence_ring: np.ndarray  # [O] ring of each occurrence of a piece, ascending; in walking order within a ring
    occurrence_border: np.ndarray  # [O] piece of each occurrence
    occurrence_reversed: np.ndarray  # [O] bool: the ring walks the piece backwards (its second occurrence)


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
    # vertex v are flat[v + up_left], flat[v + up_right], ...; a step down adds padded_width.
    up_left, up_right, down_left, down_right = 0, 1, padded_width, padded_width + 1
    # Pixels ahead of a walker arriving at a vertex, on its right and on its left.
    ahead_right = np.array([down_right, down_left, up_left, up_right])
    ahead_left = np.array([up_right, down_right, down_left, up_left])

    # k in across: pixels k and k+1 differ, a vertical crack from vertex k - padded_width down to vertex k.
    # k in along: pixels k and k + padded_width differ, a horizontal crack from vertex k - 1 to vertex k.
    # The frame makes the row wrap-around of flat indices harmless: both ends of it are frame zeros.
    across = np.flatnonzero(flat[:-1] != flat[1:])
    along = np.flatnonzero(flat[:-padded_width] != flat[padded_width:])
    # Straight runs of cracks with the same two pixels' labels on either side: no other border meets them between
    # their ends, so each run is walked as one edge, between two vertices that rings keep. A run stops where the
    # pixels on one side change.
    left, right, above, below = flat[across], flat[across + 1], flat[along], flat[along + padded_width]
    across_first = across[(flat[across - padded_width] != left) | (flat[across - padded_width + 1] != right)]
    across_last = across[(flat[across + padded_width] != left) | (flat[across + padded_width + 1] != right)]
    along_first = along[(flat[along - 1] != above) | (flat[along - 1 + padded_width] != below)]
    along_last = along[(flat[along + 1] != above) | (flat[along + 1 + padded_width] != below)]
    # A column's vertical runs, top to bottom, start and stop alternately: pair them column by column (a stable
    # radix sort on 16-bit column numbers keeps the rows in order).
    column_type = np.uint16 if padded_width <= np.iinfo(np.uint16).max else np.int64
    by_column_first = np.argsort((across_first % padded_width).astype(column_type), kind="stable")
    by_column_last = np.argsort((across_last % padded_width).astype(column_type), kind="stable")
    last_of_first, first_of_last = np.empty_like(across_first), np.empty_like(across_last)
    last_of_first[by_column_first] = across_last[by_column_last]
    first_of_last[by_column_last] = across_first[by_column_first]
    # Each run is walked once per side, keeping the side's label on the walker's right. Within each direction the
    # walks are in row order of their start (and nearly so of their end), which keeps the sorts and searches
    # below cheap.
    starts = np.concatenate([along_first - 1, across_first - padded_width, along_last, across_last])
    ends = np.concatenate([along_last, last_of_first, along_first - 1, first_of_last - padded_width])
    directions = np.repeat(np.array([EAST, SOUTH, WEST, NORTH], np.intp), [len(along_first), len(across_first)] * 2)
    edge_labels = np.concatenate(
        [flat[along_first + padded_width], flat[across_first], flat[along_first], flat[across_last + 1]]
    )
    on_region = edge_labels != 0
    starts, ends, directions, edge_labels = (array[on_region] for array in (starts, ends, directions, edge_labels))
    keys = starts * 4 + directions  # unique: one walk leaves a vertex in a given direction
    by_key = np.argsort(keys, kind="stable")  # four already sorted runs: a merge, not a full sort
    sorted_keys = keys[by_key]

    # Where each walk goes next: keep the region on the right, separating regions that touch only at a corner
    # (4-connectivity): turn right when the pixel ahead-right is not ours, left when both pixels ahead are ours.
    # A run ends where the walk turns or another border meets it, so every walk ends at a vertex rings keep.
    ahead_right_ours = flat[ends + ahead_right[directions]] == edge_labels
    ahead_left_ours = flat[ends + ahead_left[directions]] == edge_labels
    turn = np.where(~ahead_right_ours, 1, np.where(ahead_left_ours, 3, 0))
    successor = by_key[np.searchsorted(sorted_keys, ends * 4 + (directions + turn) % 4)]

    ring_order = _cycles(successor)
    # A part whose outside reaches into it through a single corner (a "saddle": ours on one diagonal, others on the
    # other) comes back to that corner, and its ring would touch itself there, which polygon validity forbids.
    # Reconnecting the two walks through the corner splits that ring into an outer ring and a hole that touch.
    saddles = np.flatnonzero(~ahead_right_ours & ahead_left_ours)
    saddles = saddles[np.lexsort((edge_labels[saddles], ends[saddles]))].reshape(-1, 2)  # two walks per saddle
    first_of_ring = _ring_starts(ring_order, successor)
    ring_of_edge = np.empty(len(successor), np.intp)
    ring_of_edge[ring_order] = np.cumsum(first_of_ring) - 1
    pinched = saddles[ring_of_edge[saddles[:, 0]] == ring_of_edge[saddles[:, 1]]]
    if len(pinched):
        successor[pinched[:, 0]], successor[pinched[:, 1]] = successor[pinched[:, 1]], successor[pinched[:, 0]]
        ring_order = _cycles(successor)
        first_of_ring = _ring_starts(ring_order, successor)

    vertices = starts[ring_order]
    ring_of_vertex = np.cumsum(first_of_ring) - 1
    ring_labels = edge_labels[ring_order[first_of_ring]]
    # Shoelace; walked with the region on the right (y down), outer rings have positive area and holes negative.
    x, y = vertices % padded_width, vertices // padded_width
    following = _next_in_ring(ring_of_vertex, len(ring_labels))
    areas = np.bincount(ring_of_vertex, x * y[following] - x[following] * y, len(ring_labels)) / 2
    clockwise = [flat[vertices + offset] for offset in (up_left, up_right, down_right, down_left)]
    borders_meeting = sum((a != b).view(np.int8) for a, b in zip(clockwise, clockwise[1:] + clockwise[:1], strict=True))
    return _Rings(
        xy=np.column_stack([x, y]).astype(np.float64),
        ring_of_vertex=ring_of_vertex,
        labels=ring_labels,
        areas=areas,
        corners=vertices.astype(np.int64),
        junctions=borders_meeting > 2,
        diagonal=float(np.hypot(height, width)),
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
    # In the types csgraph works in (float64 weights, int32 indices), which spares it a converted copy.
    index_type = np.int32 if 2 * count < np.iinfo(np.int32).max else np.int64
    indptr = np.concatenate([[0], np.arange(count, 2 * count + 1, dtype=index_type)])
    indices = np.concatenate([np.arange(1, count + 1, dtype=index_type), successor.astype(index_type) + 1])
    graph = csr_matrix((np.ones(2 * count), indices, indptr), shape=(count + 1, count + 1))
    return depth_first_order(graph, 0, directed=True, return_predecessors=False)[1:] - 1


def _ring_starts(ring_order: np.ndarray, successor: np.ndarray) -> np.ndarray:
    """For each position of `ring_order`, whether a new cycle starts there."""
    starts = np.ones(len(ring_order), bool)
    starts[1:] = successor[ring_order[:-1]] != ring_order[1:]
    return starts


def _parts(rings: _Rings, min_area_px: float) -> _Parts:
    """Which rings bound which part: each hole goes to its outer ring; parts under `min_area_px` are dropped."""
    ring_count = len(rings.labels)
    signed_area = rings.areas
    is_hole = signed_area < 0
    shells, holes = np.flatnonzero(~is_hole), np.flatnonzero(is_hole)
    owner = np.arange(ring_count)
    if len(holes):
        # A hole's owner is the smallest outer ring of its label containing a point of the hole's border; the
        # middle of its first edge lies on no other ring of that label, so it is strictly inside the owner.
        first = np.searchsorted(rings.ring_of_vertex, holes)
        probes = shapely.points((rings.xy[first] + rings.xy[first + 1]) / 2)
        shell_polygons = shapely.polygons(shapely.linearrings(rings.xy, indices=rings.ring_of_vertex)[shells])
        hole_index, shell_index = shapely.STRtree(shell_polygons).query(probes, predicate="within")
        same_label = rings.labels[holes[hole_index]] == rings.labels[shells[shell_index]]
        hole_index, shell_index = hole_index[same_label], shell_index[same_label]
        smallest_first = np.lexsort((signed_area[shells[shell_index]], hole_index))
        hole_index, shell_index = hole_index[smallest_first], shell_index[smallest_first]
        first_match = np.r_[True, hole_index[1:] != hole_index[:-1]]
        owner[holes[hole_index[first_match]]] = shells[shell_index[first_match]]

    part_area = np.bincount(owner, signed_area, ring_count)
    kept_shells = np.flatnonzero(~is_hole & (part_area >= min_area_px))
    part_of_shell = np.full(ring_count, -1)
    part_of_shell[kept_shells] = np.arange(len(kept_shells))
    part_of_ring = part_of_shell[owner]
    hole_area = np.where(is_hole, -signed_area, 0.0)
    largest_first = np.lexsort((-hole_area, part_of_ring))
    hole_rank = np.empty(ring_count, np.intp)
    group_start = np.r_[0, np.flatnonzero(np.diff(part_of_ring[largest_first])) + 1]
    position = np.arange(ring_count) - np.repeat(group_start, np.diff(np.r_[group_start, ring_count]))
    hole_rank[largest_first] = position  # a part's holes come first, its outer ring (area 0) last
    hole_rank[~is_hole] = 0
    return _Parts(
        part_of_ring=part_of_ring,
        is_hole=is_hole,
        hole_area=hole_area,
        hole_rank=hole_rank,
        labels=rings.labels[kept_shells],
        areas=part_area[kept_shells],
    )


def _borders(rings: _Rings) -> _Borders:
    """Cut every ring into border pieces and find the two occurrences of each piece shared by two rings."""
    vertex_count, ring_count = len(rings.ring_of_vertex), len(rings.labels)
    ring_of_vertex, corners = rings.ring_of_vertex, rings.corners
    first = np.searchsorted(ring_of_vertex, np.arange(ring_count))
    length = np.diff(np.r_[first, vertex_count])

    cut = rings.junctions.copy()
    few_junctions = (np.bincount(ring_of_vertex, cut, ring_count) < 3)[ring_of_vertex]
    if few_junctions.any():
        x, y = rings.xy.astype(np.int64).T
        extreme = np.zeros(vertex_count, bool)
        for key in (corners, -corners, (x << 32) - y, (-x << 32) + y):
            extreme |= key == np.minimum.reduceat(key, first)[ring_of_vertex]
        cut |= np.isin(corners, corners[few_junctions & extreme], kind="table")

    # Walk each ring from its first cut, so that every piece is a run of consecutive positions.
    cut_positions = np.flatnonzero(cut)
    shift = cut_positions[np.searchsorted(cut_positions, first)] - first
    position = np.arange(vertex_count) - first[ring_of_vertex]
    walk = first[ring_of_vertex] + (position + shift[ring_of_vertex]) % length[ring_of_vertex]
    occurrence_start = np.flatnonzero(cut[walk])
    occurrence_ring = ring_of_vertex[occurrence_start]
    occurrence_stop = np.r_[occurrence_start[1:], vertex_count]
    ring_stop = (first + length)[occurrence_ring]
    end = walk[
        np.where(occurrence_stop == ring_stop, first[occurrence_ring], np.minimum(occurrence_stop, vertex_count - 1))
    ]

    # The two occurrences of a piece walk it in opposite directions: the first segment of one is the last of the
    # other. A segment belongs to one piece only, so the lesser of the two identifies the piece.
    second = np.where(
        occurrence_stop - occurrence_start > 1, walk[np.minimum(occurrence_start + 1, vertex_count - 1)], end
    )
    key = np.minimum(
        _segment_number(corners[walk[occurrence_start]], corners[second]),
        _segment_number(corners[walk[occurrence_stop - 1]], corners[end]),
    )
    by_key = np.argsort(key, kind="stable")
    first_of_piece = np.r_[True, key[by_key][1:] != key[by_key][:-1]]
    occurrence_border = np.empty(len(key), np.intp)
    occurrence_border[by_key] = np.cumsum(first_of_piece) - 1
    occurrence_reversed = np.ones(len(key), bool)
    occurrence_reversed[by_key[first_of_piece]] = False

    # The pieces as walked by their first occurrence: its positions, then the first vertex of the next piece.
    walked = by_key[first_of_piece]
    point_counts = occurrence_stop[walked] - occurrence_start[walked] + 1
    piece_of_point = np.repeat(np.arange(len(walked)), point_counts)
    along = np.arange(len(piece_of_point)) - np.repeat(np.cumsum(point_counts) - point_counts, point_counts)
    is_end = along == point_counts[piece_of_point] - 1
    vertex = np.where(
        is_end,
        end[walked][piece_of_point],
        walk[np.minimum(occurrence_start[walked][piece_of_point] + along, vertex_count - 1)],
    )
    return _Borders(
        lines=shapely.linestrings(rings.xy[vertex], indices=piece_of_point),
        occurrence_ring=occurrence_ring,
        occurrence_border=occurrence_border,
        occurrence_reversed=occurrence_reversed,
    )


def _segment_number(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One integer per undirected segment between two pixel corners."""
    return np.minimum(a, b) << 32 | np.maximum(a, b)


def _outer_rings(parts: np.ndarray) -> list[np.ndarray]:
    """[K, 2] outer ring of each of `parts`, without its closing point (views into one array)."""
    xy, part_of_point = shapely.get_coordinates(shapely.get_exterior_ring(parts), return_index=True)
    counts = np.bincount(part_of_point, minlength=len(parts))
    stops = np.cumsum(counts)
    starts = stops - counts
    return [xy[start : stop - 1] for start, stop in zip(starts.tolist(), stops.tolist(), strict=True)]


def _keyhole_ring(part: shapely.Polygon) -> np.ndarray:
    """[K, 2] one ring drawing `part` (oriented): its outer ring with a zero-width cut out to each hole and back.

    Each cut joins a hole to the ring built so far by the shortest segment that stays inside the part and crosses
    no earlier cut, so the result looks like the region with thin slits; the fill is right even when no such
    segment is found among the candidates and the shortest one is used.
    """
    ring = np.asarray(part.exterior.coords)[:-1]
    holes = [np.asarray(interior.coords)[:-1] for interior in part.interiors]
    shapely.prepare(part)
    nearest = cKDTree(ring)
    holes.sort(key=lambda hole: nearest.query(hole)[0].min())
    cuts: list[shapely.LineString] = []
    for hole in holes:
        ring_index, hole_index = _cut(part, ring, hole, shapely.multilinestrings(cuts) if cuts else None)
        ring = np.concatenate([ring[: ring_index + 1], hole[hole_index:], hole[: hole_index + 1], ring[ring_index:]])
        cuts.append(shapely.LineString([ring[ring_index], hole[hole_index]]))
    # A hole touching the outer ring at a corner gets a cut of length zero: drop the repeated point.
    return ring[np.any(ring != np.roll(ring, 1, axis=0), axis=1)]


def _cut(part: shapely.Polygon, ring: np.ndarray, hole: np.ndarray, cuts) -> tuple[int, int]:
    """(ring vertex, hole vertex) of the shortest segment between them inside `part`, crossing none of `cuts`."""
    neighbours = min(8, len(ring))
    distances, ring_indices = cKDTree(ring).query(hole, k=neighbours)
    distances, ring_indices = distances.reshape(len(hole), neighbours), ring_indices.reshape(len(hole), neighbours)
    by_length = np.argsort(distances, axis=None)[:CUT_CANDIDATES]
    hole_indices, neighbour = np.unravel_index(by_length, distances.shape)
    ring_indices = ring_indices[hole_indices, neighbour]
    segments = shapely.linestrings(np.stack([ring[ring_indices], hole[hole_indices]], axis=1))
    # Shortest first, a few at a time: each test costs about 10 us, and one of the first few is usually usable.
    for first in range(0, len(segments), CUTS_TESTED_AT_ONCE):
        batch = segments[first : first + CUTS_TESTED_AT_ONCE]
        usable = shapely.covered_by(batch, part)
        if cuts is not None:
            usable &= ~shapely.crosses(batch, cuts)
        if usable.any():
            chosen = first + int(np.argmax(usable))
            return int(ring_indices[chosen]), int(hole_indices[chosen])
    return int(ring_indices[0]), int(hole_indices[0])  # the shortest of all, when none is usable
