"""Implicit solids evaluated at RAS points (mm): the held-out family's building blocks.

Every shape answers ``inside(points) -> bool`` for ``points`` of shape (3, ...) in mm (x, y, z
first: per-component arrays keep the arithmetic elementwise and fast) and
gives a conservative axis-aligned bounding box ``bounds() -> (low, high)`` in mm, so that
the renderer evaluates it only where it can be. Shapes are plain data (numpy arrays and
floats) drawn by :mod:`.anatomy_plans`; nothing here is random.

The primitives (star-shaped blobs with low-frequency radial harmonics, superquadrics,
metaballs, tubes along cubic splines and along elliptic arcs, half-space cuts) are chosen to
differ from the training phantoms' construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np


class Shape(Protocol):
    def inside(self, points: np.ndarray) -> np.ndarray: ...

    def bounds(self) -> tuple[np.ndarray, np.ndarray]: ...


def _local(points: np.ndarray, centre: np.ndarray, rotation: np.ndarray) -> list[np.ndarray]:
    """Points in the shape's frame, ``rotation.T @ (p - centre)``, as three arrays (x, y, z)."""
    d = [points[a] - np.float32(centre[a]) for a in range(3)]
    r = np.asarray(rotation, dtype=np.float64)
    if np.allclose(r, np.eye(3)):
        return d
    return [np.float32(r[0, a]) * d[0] + np.float32(r[1, a]) * d[1] + np.float32(r[2, a]) * d[2] for a in range(3)]


def _dot(direction, points) -> np.ndarray:
    return np.float32(direction[0]) * points[0] + np.float32(direction[1]) * points[1] + \
        np.float32(direction[2]) * points[2]


def _box_around(centre: np.ndarray, half_extent: float) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(centre, dtype=np.float64)
    return c - half_extent, c + half_extent


def _rotated_box(centre: np.ndarray, rotation: np.ndarray, half_extents) -> tuple[np.ndarray, np.ndarray]:
    """World box around a frame box of ``half_extents`` (frame axes = columns of ``rotation``)."""
    half = np.abs(np.asarray(rotation, dtype=np.float64)) @ np.asarray(half_extents, dtype=np.float64)
    c = np.asarray(centre, dtype=np.float64)
    return c - half, c + half


@dataclass
class StarBlob:
    """A star-shaped solid: ``|q| < 1 + sum_m b_m cos(w_m . u + phase_m)``.

    ``q`` is the point in the blob's frame divided by ``radii`` (mm, frame axes x, y, z);
    ``u = q / |q|`` its direction; ``harmonics`` rows are (b, wx, wy, wz, phase) with small
    ``|w|`` so the surface stays smooth. ``shrink_mm`` moves the surface inwards by about
    that many mm (used for shells: cortex = blob minus blob shrunk).
    """

    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    harmonics: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    shrink_mm: float = 0.0

    def shrunk(self, mm: float) -> "StarBlob":
        return StarBlob(self.centre, self.radii, self.rotation, self.harmonics, self.shrink_mm + float(mm))

    def inside(self, points: np.ndarray) -> np.ndarray:
        radii = [np.float32(r) for r in self.radii]
        q = [c / r for c, r in zip(_local(points, self.centre, self.rotation), radii)]
        rho = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
        inv = np.float32(1.0) / np.maximum(rho, np.float32(1e-6))
        u = [c * inv for c in q]
        bound = np.ones_like(rho)
        for b, wx, wy, wz, phase in self.harmonics:
            bound += np.float32(b) * np.cos(_dot((wx, wy, wz), u) + np.float32(phase))
        if self.shrink_mm:
            # a shrink of s mm lowers the bound by s / (the blob's radius along u)
            radius_mm = np.sqrt((u[0] * radii[0]) ** 2 + (u[1] * radii[1]) ** 2 + (u[2] * radii[2]) ** 2)
            bound -= np.float32(self.shrink_mm) / radius_mm
        return rho < bound

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        scale = 1.0 + float(np.abs(self.harmonics[:, 0]).sum())
        return _rotated_box(self.centre, self.rotation, np.asarray(self.radii, dtype=np.float64) * scale)


@dataclass
class Superquadric:
    """``|qx|^e + |qy|^e + |qz|^e < 1`` with ``q`` the frame point over (radii - shrink_mm):
    boxy for large ``exponent``, an ellipsoid at 2."""

    centre: np.ndarray
    radii: np.ndarray
    exponent: float = 2.0
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    shrink_mm: float = 0.0

    def shrunk(self, mm: float) -> "Superquadric":
        return Superquadric(self.centre, self.radii, self.exponent, self.rotation, self.shrink_mm + float(mm))

    def inside(self, points: np.ndarray) -> np.ndarray:
        radii = np.maximum(np.asarray(self.radii, np.float64) - self.shrink_mm, 1e-3)
        e = np.float32(self.exponent)
        total = None
        for c, r in zip(_local(points, self.centre, self.rotation), radii):
            term = np.abs(c * np.float32(1.0 / r))
            term = term * term if e == 2 else term ** e
            total = term if total is None else total + term
        return total < 1.0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return _rotated_box(self.centre, self.rotation, self.radii)


@dataclass
class Metaballs:
    """``sum_n w_n exp(-|p - c_n|^2 / s_n^2) > level``: smooth, lumpy, irregular solids."""

    centres: np.ndarray  # (N, 3) mm
    scales: np.ndarray  # (N,) mm
    weights: np.ndarray  # (N,)
    level: float = 0.5

    def inside(self, points: np.ndarray) -> np.ndarray:
        field_value = np.zeros(points.shape[1:], dtype=np.float32)
        for c, s, w in zip(self.centres, self.scales, self.weights):
            d2 = sum((points[a] - np.float32(c[a])) ** 2 for a in range(3))
            field_value += np.float32(w) * np.exp(d2 * np.float32(-1.0 / (s * s)))
        return field_value > self.level

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        # exp(-x^2) * w_max * N < level beyond this reach
        n, w = len(self.scales), float(np.max(self.weights))
        reach = float(np.max(self.scales)) * np.sqrt(max(np.log(n * w / self.level), 0.0) + 1e-6)
        return self.centres.min(axis=0) - reach, self.centres.max(axis=0) + reach


@dataclass
class SplineTube:
    """A tube whose centre line is a cubic spline over the frame's z: points with frame z in
    ``[z_knots[0], z_knots[-1]]`` and in-plane distance to the centre line below the radius
    (both splined from knots). A vessel, the trachea, the spinal canal."""

    centre: np.ndarray  # frame origin in RAS mm
    rotation: np.ndarray  # frame axes as columns; the tube runs along the frame z
    z_knots: np.ndarray  # (M,) mm, increasing
    xy_knots: np.ndarray  # (M, 2) mm, centre line in the frame
    radius_knots: np.ndarray  # (M,) mm
    shrink_mm: float = 0.0

    def shrunk(self, mm: float) -> "SplineTube":
        return SplineTube(self.centre, self.rotation, self.z_knots, self.xy_knots, self.radius_knots,
                          self.shrink_mm + float(mm))

    def inside(self, points: np.ndarray) -> np.ndarray:
        from scipy.interpolate import CubicSpline

        q = _local(points, self.centre, self.rotation)
        z = q[2]
        # the centre line and radius vary slowly: tabulate them on a 0.25 mm grid of z
        table_z = np.arange(self.z_knots[0], self.z_knots[-1] + 0.25, 0.25)
        table_xy = CubicSpline(self.z_knots, self.xy_knots, axis=0)(table_z).astype(np.float32)
        table_r = (np.interp(table_z, self.z_knots, self.radius_knots) - self.shrink_mm).astype(np.float32)
        row = np.clip(np.rint((z - np.float32(self.z_knots[0])) * 4.0), 0, len(table_z) - 1).astype(np.intp)
        d2 = (q[0] - table_xy[row, 0]) ** 2 + (q[1] - table_xy[row, 1]) ** 2
        r = table_r[row]
        return (d2 < r * r) & (z >= self.z_knots[0]) & (z <= self.z_knots[-1])

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        from scipy.interpolate import CubicSpline

        z = np.linspace(self.z_knots[0], self.z_knots[-1], 64)
        line = np.column_stack([CubicSpline(self.z_knots, self.xy_knots, axis=0)(z), z])
        world = line @ np.asarray(self.rotation).T + np.asarray(self.centre)
        reach = float(np.max(self.radius_knots)) + 1.0 + float(np.ptp(z)) / 64.0
        return world.min(axis=0) - reach, world.max(axis=0) + reach


@dataclass
class ArcTube:
    """A tube along an elliptic arc in the frame's x-y plane (a rib, a mandible-like curve):
    ``|rho - 1| * min(a, b) < r`` and ``|z| < r``, with ``rho`` the elliptic radius of the
    frame point and its polar angle within ``[angle_from, angle_to]`` (radians)."""

    centre: np.ndarray
    rotation: np.ndarray
    semi_axes: np.ndarray  # (a, b) mm
    radius: float  # mm
    angle_from: float
    angle_to: float
    shrink_mm: float = 0.0

    def shrunk(self, mm: float) -> "ArcTube":
        return ArcTube(self.centre, self.rotation, self.semi_axes, self.radius, self.angle_from, self.angle_to,
                       self.shrink_mm + float(mm))

    def inside(self, points: np.ndarray) -> np.ndarray:
        q = _local(points, self.centre, self.rotation)
        a, b = (np.float32(v) for v in self.semi_axes)
        r = np.float32(self.radius - self.shrink_mm)
        near = np.abs(q[2]) < r
        out = np.zeros(near.shape, dtype=bool)
        if not near.any():
            return out
        x, y = q[0][near] / a, q[1][near] / b
        rho = np.sqrt(x * x + y * y)
        span = (np.arctan2(y, x) - np.float32(self.angle_from)) % np.float32(2 * np.pi)
        in_arc = span <= np.float32((self.angle_to - self.angle_from) % (2 * np.pi))
        out[near] = (np.abs(rho - 1.0) * min(a, b) < r) & in_arc
        return out

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        span = (self.angle_to - self.angle_from) % (2 * np.pi)
        angle = self.angle_from + np.linspace(0.0, span, 64)
        a, b = self.semi_axes
        arc = np.column_stack([a * np.cos(angle), b * np.sin(angle), np.zeros_like(angle)])
        world = arc @ np.asarray(self.rotation).T + np.asarray(self.centre)
        reach = self.radius + 1.0 + float(max(a, b)) * span / 64.0
        return world.min(axis=0) - reach, world.max(axis=0) + reach


@dataclass
class Cut:
    """``shape`` restricted to the half-spaces ``n . (p - point) >= 0`` (rows of ``planes``:
    nx, ny, nz, px, py, pz); lung lobes, the brain above the skull base."""

    shape: Shape
    planes: np.ndarray

    def shrunk(self, mm: float) -> "Cut":
        return Cut(self.shape.shrunk(mm), self.planes)  # type: ignore[attr-defined]

    def inside(self, points: np.ndarray) -> np.ndarray:
        keep = self.shape.inside(points)
        for nx, ny, nz, px, py, pz in self.planes:
            keep &= _dot((nx, ny, nz), points) >= np.float32(nx * px + ny * py + nz * pz)
        return keep

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.shape.bounds()


@dataclass
class Difference:
    """Inside ``outer`` and not inside ``inner``: a shell (bone cortex, organ wall)."""

    outer: Shape
    inner: Shape

    def inside(self, points: np.ndarray) -> np.ndarray:
        return self.outer.inside(points) & ~self.inner.inside(points)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.outer.bounds()


def shell(shape, thickness_mm: float) -> Difference:
    """The outer ``thickness_mm`` of a shape that can be shrunk."""
    return Difference(shape, shape.shrunk(thickness_mm))


@dataclass
class Deformation:
    """A smooth random displacement: ``p + sum_m a_m sin(w_m . p + phase_m)`` (mm).

    Rows of ``terms``: (ax, ay, az, wx, wy, wz, phase), wave numbers in rad / mm.
    """

    terms: np.ndarray

    @property
    def max_displacement_mm(self) -> float:
        return float(np.linalg.norm(self.terms[:, :3], axis=1).sum()) if len(self.terms) else 0.0

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Displaced copy of (3, ...) float32 points."""
        points = np.asarray(points, dtype=np.float32)
        out = points.copy()
        for ax, ay, az, wx, wy, wz, phase in self.terms:
            s = np.sin(_dot((wx, wy, wz), points) + np.float32(phase))
            for axis, amplitude in enumerate((ax, ay, az)):
                out[axis] += np.float32(amplitude) * s
        return out


def rotation_matrix(angles_xyz: Sequence[float]) -> np.ndarray:
    """Rz @ Ry @ Rx for angles in radians (the frame's axes are its columns)."""
    ax, ay, az = (float(a) for a in angles_xyz)
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx
