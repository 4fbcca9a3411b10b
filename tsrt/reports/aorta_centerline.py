"""The aorta's centerline, as TotalSegmentator's aorta report traces it (aorta_report/centerline.py).

Why each step: the smoothed aorta is thinned to a skeleton (skimage's 3D Lee thinning, the same
library call upstream makes, so the voxels are the same); each 26-connected skeleton piece becomes a
breadth-first spanning tree, and the longest tree path between two of its end voxels is the
centerline. It runs distal (lowest z) -> annulus; every position along the aorta is an index into
it. Points are kept as an (N, 3) float64 array of voxel coordinates (upstream: a list of vertices);
the index arithmetic, tie-breaking and off-by-one quirks below are upstream's, kept because they
decide where landmarks land.
"""

from __future__ import annotations

from collections import deque

import numpy as np

#: Neighbour offsets in the order upstream's breadth-first search visits them (z outer, then x, then y).
NEIGHBOURS = np.array(
    [(x, y, z) for z in (-1, 0, 1) for x in (-1, 0, 1) for y in (-1, 0, 1) if (x, y, z) != (0, 0, 0)]
)
#: The normal at a point averages chords to the points this many steps before and after it.
NORMAL_STEPS = (3, 10)


def skeleton(mask: np.ndarray) -> np.ndarray:
    """skimage's 3D skeleton of `mask` > 0 (bool)."""
    from tsrt.reports.aorta_geometry import require_scientific

    require_scientific()
    from skimage.morphology import skeletonize

    return skeletonize(np.asarray(mask) > 0)


def _spanning_trees(voxels: np.ndarray) -> list[tuple[list[tuple[int, int, int]], list[list[int]]]]:
    """Breadth-first spanning trees of the 26-connected skeleton: (nodes in discovery order, adjacency)."""
    unseen = voxels.astype(bool).copy()
    shape = np.array(unseen.shape)
    trees = []
    for start in np.argwhere(unseen):
        if not unseen[tuple(start)]:
            continue
        nodes = [tuple(int(v) for v in start)]
        adjacency: list[list[int]] = [[]]
        unseen[tuple(start)] = False
        queue = deque([0])
        while queue:
            current = queue.popleft()
            here = np.array(nodes[current])
            for offset in NEIGHBOURS:
                point = here + offset
                if np.any(point < 0) or np.any(point >= shape) or not unseen[tuple(point)]:
                    continue
                unseen[tuple(point)] = False
                nodes.append(tuple(int(v) for v in point))
                adjacency.append([current])
                adjacency[current].append(len(nodes) - 1)
                queue.append(len(nodes) - 1)
        trees.append((nodes, adjacency))
    return trees


def _tree_walk(adjacency: list[list[int]], root: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps from `root` to every node of a tree, and each node's parent on the way."""
    steps = np.full(len(adjacency), -1)
    parent = np.full(len(adjacency), -1)
    steps[root] = 0
    queue = deque([root])
    while queue:
        node = queue.popleft()
        for other in adjacency[node]:
            if steps[other] < 0:
                steps[other], parent[other] = steps[node] + 1, node
                queue.append(other)
    return steps, parent


def _longest_end_to_end_path(nodes: list, adjacency: list[list[int]]) -> np.ndarray | None:
    """The tree path between the two end voxels farthest apart in steps (first such pair in pair order)."""
    ends = [index for index, links in enumerate(adjacency) if len(links) == 1]
    if len(ends) < 2:
        return None
    best, pair, walks = -1, None, {}
    for i, first in enumerate(ends[:-1]):
        walks[first] = _tree_walk(adjacency, first)
        steps = walks[first][0]
        for second in ends[i + 1 :]:
            if steps[second] > best:
                best, pair = int(steps[second]), (first, second)
    first, second = pair
    parent = walks[first][1]
    path = [second]
    while path[-1] != first:
        path.append(int(parent[path[-1]]))
    return np.array([nodes[index] for index in reversed(path)], dtype=np.float64)


def path_length(points: np.ndarray) -> float:
    """Length of a polyline in voxel steps (no spacing); 0 for fewer than two points."""
    return float(arc_lengths(points)[-1]) if len(points) else 0.0


def arc_lengths(points: np.ndarray, spacing=None) -> np.ndarray:
    """Cumulative distance along the polyline from its first point (0 first); mm when `spacing` is given."""
    points = np.asarray(points, dtype=float)
    if not len(points):
        return np.empty(0)
    steps = np.diff(points, axis=0)
    if spacing is not None:
        steps *= np.asarray(spacing, dtype=float)
    return np.concatenate(([0.0], np.cumsum(np.linalg.norm(steps, axis=1))))


def path_length_mm(points: np.ndarray, spacing) -> np.float32:
    """Length in mm, as float32 like upstream's get_len_path_mm (its rounding shows in the JSON)."""
    lengths = arc_lengths(points, spacing)
    return np.float32(lengths[-1] if len(lengths) else 0.0)


def trace(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centerline voxels of a (smoothed) aorta mask: (uint8 image of the path, (N, 3) points)."""
    candidates = []
    for nodes, adjacency in _spanning_trees(skeleton(mask)):
        path = _longest_end_to_end_path(nodes, adjacency)
        if path is not None:
            candidates.append(path)
    if not candidates:
        from tsrt.errors import InputError

        raise InputError("The aorta mask has no centerline (its skeleton has no two ends): is the aorta in the image?")
    lengths = [path_length(path) for path in candidates]
    path = candidates[int(np.argmax(lengths))]
    image = np.zeros(mask.shape, dtype=np.uint8)
    image[tuple(path.astype(int).T)] = 1
    return image, path


def distal_first(points: np.ndarray) -> np.ndarray:
    """The centerline running from its lower (distal) end, as upstream orders it."""
    if len(points) >= 2 and points[0][2] > points[-1][2]:
        return points[::-1].copy()
    return points


def append_point(image: np.ndarray, points: np.ndarray, point: np.ndarray) -> np.ndarray:
    """`points` continued straight to `point`, with in-between points one voxel apart (also drawn in `image`)."""
    point = np.asarray(point, dtype=float)
    last = points[-1]
    distance = np.linalg.norm(last - point)
    added = []
    if distance > 1:
        count = int(distance)
        for step in range(1, count + 1):
            between = last + step / float(count + 1) * (point - last)
            image[tuple(between.astype(int))] = 1
            added.append(between)
    image[tuple(point.astype(int))] = 1
    added.append(point)
    return np.vstack([points, np.array(added)])


def extend(image: np.ndarray, points: np.ndarray, distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Copies of image and centerline, continued `distance` voxels along the last step's direction."""
    if len(points) < 2:
        raise ValueError("Not enough centerline points to determine a direction")
    direction = points[-1] - points[-2]
    direction = direction / np.linalg.norm(direction)
    image = image.copy()
    return image, append_point(image, points.copy(), points[-1] + distance * direction)


def index_of(points: np.ndarray, point) -> int | None:
    """First index of a point equal to `point`, None if there is none (or `point` is None)."""
    if point is None:
        return None
    hits = np.flatnonzero(np.all(points == np.asarray(point), axis=1))
    return int(hits[0]) if len(hits) else None


def closest_point(points: np.ndarray, point) -> np.ndarray | None:
    """The centerline point nearest to `point` (first on ties)."""
    if point is None or not len(points):
        return None
    return points[int(np.argmin(np.linalg.norm(points - np.asarray(point), axis=1)))]


def closest_index(centerline: np.ndarray, point, section: np.ndarray | None = None) -> int | None:
    """Index in `centerline` of the point of `section` (default: all of it) nearest to `point`."""
    return index_of(centerline, closest_point(centerline if section is None else section, point))


def midpoint_index(points: np.ndarray, a: int | None, b: int | None) -> int | None:
    """Index halfway (in voxel steps, rounded down) between indices a and b, upstream's get_mid_of_points.

    Upstream measures half of the path a..b-1 and starts summing at the step into max(1, a); kept as is.
    """
    if not len(points) or a is None or b is None or not (0 <= a < len(points) and 0 <= b < len(points)):
        return None
    if b < a:
        a, b = b, a
    target = path_length(points[a:b]) // 2
    length = 0.0
    for index in range(max(1, a), b):
        length += np.linalg.norm(points[index] - points[index - 1])
        if length >= target:
            return index
    return a if a == b else None


def index_at_distance(points: np.ndarray, start: int | None, distance: float, spacing) -> int | None:
    """Index about `distance` mm from `start` along the centerline (negative: backwards); None past its ends.

    Upstream's get_next_point_by_distance: forwards it never returns the last point, backwards it
    starts one step back from `start`; both kept.
    """
    if not len(points) or start is None or not 0 <= start < len(points):
        return None
    if distance == 0:
        return start
    spacing = np.asarray(spacing)
    length = 0.0
    if distance > 0:
        indices, previous = range(start + 1, len(points) - 1), -1
    else:
        indices, previous = reversed(range(0, start - 1)), 1
    for index in indices:
        length += np.sqrt(np.sum(((points[index] - points[index + previous]) * spacing) ** 2))
        if length >= abs(distance):
            return index
    return None


def normal_at(points: np.ndarray, index: int | None, steps: tuple[int, int] = NORMAL_STEPS) -> np.ndarray:
    """Direction of the centerline at `index` (pointing backwards), from chords 3..9 points to either side."""
    if len(points) < 2 or index is None or not 0 <= index < len(points):
        return np.array([0.0, 0.0, 1.0])
    last = len(points) - 1
    chords = [points[max(0, index - d)] - points[min(last, index + d)] for d in range(steps[0], steps[1])]
    normal = np.asarray(chords).mean(axis=0)
    if np.linalg.norm(normal) > 0:
        return normal
    for d in range(1, len(points)):
        normal = points[max(0, index - d)] - points[min(last, index + d)]
        if np.linalg.norm(normal) > 0:
            return normal
    return np.array([0.0, 0.0, 1.0])


def section_around(points: np.ndarray, point, length_mm: float, spacing: float) -> np.ndarray:
    """About `length_mm` of centerline centred on the point nearest to `point` (for T12's anchor)."""
    if not len(points):
        return points
    nearest = index_of(points, closest_point(points, point))
    if nearest is None:
        return points[:0]
    count = int(length_mm / spacing)
    start = max(nearest - count // 2, 0)
    end = min(nearest + count // 2, len(points) - 1)
    if end - start < count - 1:
        if start == 0:
            end = min(count - 1, len(points) - 1)
        elif end == len(points) - 1:
            start = max(end - count + 1, 0)
    return points[start : end + 1]


def resample_by_arc_length(points: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Points linearly interpolated at `positions` along the polyline's own (unit-free) arc length.

    Repeated points make the arc length flat; the first point and, later, the last point of each flat
    run are kept, so both ends stay put.
    """
    points, positions = np.asarray(points, dtype=float), np.asarray(positions, dtype=float)
    if not len(points) or not len(positions):
        return np.empty((0, 3))
    cumulative = arc_lengths(points)
    unique, first = np.unique(cumulative, return_index=True)
    last = np.searchsorted(cumulative, unique, side="right") - 1
    keep = np.where(unique == 0, first, last)
    return np.column_stack([np.interp(positions, unique, points[keep, axis]) for axis in range(3)])


def resample_evenly(points: np.ndarray, affine: np.ndarray, step_mm: float = 1.0) -> np.ndarray:
    """The centerline resampled every ~`step_mm` in world space (voxel coordinates back), for profiles."""
    import nibabel as nib

    if step_mm <= 0:
        raise ValueError("step_mm must be greater than zero")
    if len(points) < 2:
        return np.array(points, dtype=float)
    world = nib.affines.apply_affine(affine, points)
    total = np.linalg.norm(np.diff(world, axis=0), axis=1).sum()
    if total == 0:
        return np.array(points[:1], dtype=float)
    positions = np.linspace(0, total, max(2, int(total / step_mm)))
    return nib.affines.apply_affine(np.linalg.inv(affine), resample_by_arc_length(world, positions))
