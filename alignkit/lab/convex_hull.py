"""Two small pieces of geometry for ConvexDA (`alignkit.lab.convexda`): PCA to two dimensions and
the convex hull of 2-D points (Andrew's monotone chain). Written here so that alignkit needs
neither scikit-learn nor scipy (the official ConvexDA script uses `sklearn.decomposition.PCA`
and `scipy.spatial.ConvexHull`; which points are hull vertices is the same, since PCA's sign
and rotation conventions do not change hull membership).
"""

from __future__ import annotations

import torch
from torch import Tensor


def pca_2d(points: Tensor) -> Tensor:
    """Project `points` (N, D) onto their first two principal components -> (N, 2), float64.

    X_c = X - mean(X); X_c = U S V^T (thin SVD, singular values descending); the projection is
    X_c V[:, :2] (scikit-learn's `PCA(n_components=2).fit_transform` up to the sign of each
    column). With fewer than two directions of variance the missing columns are zero.

    Worked example: (2, 0, 0), (-2, 0, 0), (0, 1, 0), (0, -1, 0) have mean 0, the x axis holds
    variance 8/3 and the y axis 2/3, so the projection is (+-2, 0), (0, +-1) up to column signs.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"pca_2d needs a non-empty (N, D) matrix, got shape {tuple(points.shape)}")
    centred = points.double() - points.double().mean(dim=0, keepdim=True)  # (N, D)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # vh (min(N, D), D)
    projected = centred @ vh[:2].T  # (N, <= 2)
    if projected.shape[1] < 2:
        projected = torch.cat([projected, projected.new_zeros(points.shape[0], 2 - projected.shape[1])], dim=1)
    return projected


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    """z of (a - o) x (b - o): > 0 when o -> a -> b turns counter-clockwise."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def convex_hull_indices(points: Tensor, relative_tolerance: float = 1e-9) -> list[int]:
    """Indices of the convex-hull vertices of 2-D `points` (N, 2), counter-clockwise from the
    lowest (x, y) point (Andrew's monotone chain, O(N log N)).

    Points on an edge between two vertices are not vertices; repeated points count once (the
    lowest index); one distinct point is its own hull, two distinct points are both vertices.
    A turn whose cross product is within `relative_tolerance` x (coordinate scale)^2 of zero is
    treated as straight, so rounding noise in nearly collinear points adds no vertices.

    Worked example: the square (0,0), (2,0), (2,2), (0,2) with (1,1) inside and (1,0) on an
    edge -> [0, 1, 2, 3].
    """
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"convex_hull_indices needs (N, 2) points, got shape {tuple(points.shape)}")
    coordinates = [tuple(map(float, p)) for p in points.double().tolist()]
    first_of: dict[tuple[float, float], int] = {}
    for i, point in enumerate(coordinates):
        first_of.setdefault(point, i)
    order = sorted(first_of, key=lambda p: (p[0], p[1]))
    if len(order) <= 2:
        return [first_of[p] for p in order]
    scale = max(max(abs(c) for p in order for c in p), 1e-300)
    tolerance = relative_tolerance * scale * scale

    def chain(sequence: list[tuple[float, float]]) -> list[tuple[float, float]]:
        hull: list[tuple[float, float]] = []
        for point in sequence:
            while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) <= tolerance:
                hull.pop()
            hull.append(point)
        return hull

    lower, upper = chain(order), chain(order[::-1])
    vertices = lower[:-1] + upper[:-1]  # each chain's last point starts the other
    return [first_of[p] for p in vertices]


__all__ = ["convex_hull_indices", "pca_2d"]
