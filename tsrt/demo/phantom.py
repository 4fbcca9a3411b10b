"""A deterministic, HU-realistic synthetic CT phantom of the abdomen and lower thorax.

Why it exists: the demo model is trained on these phantoms, `make demo` segments one, and tests
need CT-like inputs of any size and geometry without shipping patient data. Everything is defined
in millimetres relative to the volume centre, so any voxel spacing or shape gives the same anatomy.
Only numpy is needed (the runtime-only install can generate it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Label numbers of the phantom's structures (TotalSegmentator's names where one exists).
PHANTOM_LABELS: dict[int, str] = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "liver",
    5: "aorta",
    6: "lung_left",
    7: "lung_right",
    8: "spine",
}


@dataclass(frozen=True)
class Phantom:
    """An image in HU and its ground-truth labels, both indexed (x, y, z) in LAS voxel order.

    The first axis runs from the patient's right to their left (LAS, as the voxel order of many
    scanner exports): the affine maps it to RAS+ world coordinates with a negative x step.
    """

    image: np.ndarray  # int16 HU
    labels: np.ndarray  # uint8, numbers from PHANTOM_LABELS
    affine: np.ndarray  # 4x4 voxel -> RAS+ mm
    spacing: tuple[float, float, float]


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre, radii) -> np.ndarray:
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (z - centre[2]) / radii[2]
    ) ** 2 <= 1.0


def make_phantom(
    shape: tuple[int, int, int] = (160, 128, 100),
    spacing: tuple[float, float, float] = (2.5, 2.5, 3.0),
    seed: int = 0,
    vary: bool = False,
    noise_hu: float = 12.0,
) -> Phantom:
    """Build a phantom of `shape` voxels at `spacing` mm (x, y, z in LAS order: x towards the patient's left).

    `seed` fixes the noise; `vary=True` also jitters body size, organ positions, sizes and
    intensities (used to make a training set with variety). The same arguments always give
    the same volume.
    """
    rng = np.random.default_rng(seed)

    def jitter(scale: float) -> float:
        return float(rng.uniform(-scale, scale)) if vary else 0.0

    sx, sy, sz = spacing
    nx, ny, nz = shape
    x = ((np.arange(nx) - (nx - 1) / 2.0) * sx)[:, None, None]
    y = ((np.arange(ny) - (ny - 1) / 2.0) * sy)[None, :, None]
    z = ((np.arange(nz) - (nz - 1) / 2.0) * sz)[None, None, :] + jitter(25.0)

    body_scale = 1.0 + jitter(0.1)
    image = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)

    # Body: an elliptic cylinder of soft tissue with a fat rim.
    body_rx, body_ry = 165.0 * body_scale, 115.0 * body_scale
    body = (x / body_rx) ** 2 + (y / body_ry) ** 2 <= 1.0
    body = np.broadcast_to(body, shape)
    fat = np.broadcast_to((x / (body_rx - 18)) ** 2 + (y / (body_ry - 15)) ** 2 > 1.0, shape)
    image[body] = 35.0 + jitter(8)
    image[body & fat] = -95.0 + jitter(10)
    # Organs stay inside the body wall, as in a patient: a lung never reaches the skin, so the air
    # outside the body is never next to lung without the fat rim in between.
    inside_wall = body & ~fat

    def organ(label: int, centre, radii, hu: float) -> None:
        centre = (centre[0] + jitter(10), centre[1] + jitter(8), centre[2] + jitter(10))
        radii = tuple(r * (1.0 + jitter(0.12)) for r in radii)
        mask = _ellipsoid(x, y, z, centre, radii) & inside_wall
        image[mask] = hu + jitter(12)
        labels[mask] = label

    # Portal-venous-phase contrast: every labelled soft-tissue organ has its own intensity band
    # (liver 100, spleen 140, kidney cortex 190, aorta 285 HU) wider apart than the per-case
    # jitter plus noise, so a small network can tell them apart; left/right pairs differ only
    # by position, with the heart (unlabelled, left-anterior) and the liver (right) as cues.
    # Thorax (superior, +z): lungs are air-filled. x points to the patient's left (the affine's x step is negative).
    # Lung parenchyma (about -820 HU) is threaded with vessels (blood, about +40 HU), so a lung has
    # a texture the uniform air around the body (-1000 HU) lacks: the network must not call air lung.
    organ(7, (-75.0, 5.0, 105.0), (62.0, 78.0, 110.0), -820.0)
    organ(6, (75.0, 5.0, 110.0), (58.0, 75.0, 105.0), -830.0)
    phase = [jitter(np.pi) for _ in range(3)]  # vessel positions: fixed unless varied, like the anatomy
    lattice = np.sin(x / 6.0 + phase[0]) * np.sin(y / 7.0 + phase[1]) * np.sin(z / 6.5 + phase[2])
    vessels = (lattice > 0.55) & ((labels == 6) | (labels == 7))
    image[vessels] = 40.0 + jitter(15)
    heart = _ellipsoid(x, y, z, (25.0 + jitter(6), 40.0 + jitter(6), 45.0 + jitter(8)), (55.0, 42.0, 45.0)) & body
    image[heart] = 150.0 + jitter(10)
    labels[heart] = 0
    # Abdomen.
    organ(4, (-60.0, 10.0, -5.0), (85.0, 75.0, 70.0), 100.0)
    organ(1, (85.0, -30.0, 20.0), (35.0, 45.0, 50.0), 140.0)
    for label, side in ((2, -1.0), (3, 1.0)):
        kidney_x = side * 55.0 + jitter(6)
        kidney_z = -72.0 - 8.0 * (side < 0) + jitter(8)  # the right kidney sits lower, under the liver
        organ(label, (kidney_x, -55.0, kidney_z), (28.0, 24.0, 50.0), 190.0)
        # The renal sinus: a darker core, so kidneys have the texture aorta and spleen lack.
        sinus = _ellipsoid(x, y, z, (kidney_x - side * 8.0, -55.0, kidney_z), (10.0, 9.0, 22.0)) & (labels == label)
        image[sinus] = 60.0

    # Inferior vena cava: an unlabelled tube right of the spine (the aorta runs left of it), a side cue.
    ivc = np.broadcast_to(((x + 24.0 + jitter(4)) ** 2 + (y + 28.0 + jitter(4)) ** 2) <= 11.0**2, shape) & body
    image[ivc & np.broadcast_to(z < 40.0, shape) & (labels == 0)] = 160.0 + jitter(15)

    # Aorta: a contrast-filled tube running the full length, anterior-left of the spine.
    ax, ay, ar = 18.0 + jitter(4), -30.0 + jitter(4), 12.0 * (1.0 + jitter(0.15))
    aorta = np.broadcast_to(((x - ax) ** 2 + (y - ay) ** 2) <= ar**2, shape) & body
    image[aorta] = 285.0 + jitter(20)
    labels[aorta] = 5

    # Spine: vertebral bodies (cortical rim, cancellous core) separated by discs every ~30 mm.
    spine_y, spine_r = -78.0 + jitter(4), 20.0 * (1.0 + jitter(0.1))
    radial = np.broadcast_to(np.sqrt(x**2 + (y - spine_y) ** 2), shape)
    z_full = np.broadcast_to(z, shape)
    in_column = (radial <= spine_r) & body
    disc = (np.mod(z_full + 1000.0, 30.0) < 6.0) & in_column
    vertebra = in_column & ~disc
    image[vertebra] = 280.0 + jitter(40)
    image[vertebra & (radial > spine_r - 4.0)] = 750.0 + jitter(80)
    image[disc] = 90.0
    labels[vertebra] = 8

    image += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    image = np.clip(np.round(image), -1024, 3071).astype(np.int16)

    return Phantom(image=image, labels=labels, affine=phantom_affine(shape, spacing), spacing=(sx, sy, sz))


def phantom_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """The phantom's voxel -> RAS+ affine: LAS voxels centred on the origin (world x = -x, so the liver is on the right)."""
    (sx, sy, sz), (nx, ny, nz) = spacing, shape
    affine = np.diag([-sx, sy, sz, 1.0])
    affine[:3, 3] = [(nx - 1) / 2.0 * sx, -(ny - 1) / 2.0 * sy, -(nz - 1) / 2.0 * sz]
    return affine


def is_phantom(image: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float]) -> bool:
    """Whether a volume is one of tsrt's (unvaried) phantoms, whatever its noise seed.

    The demo model is trained on phantoms only, so the UI warns when it runs on anything else. The
    geometry is checked first (no real scan sits exactly where the phantom does), so a real scan
    costs nothing; a matching one is compared with the noise-free phantom of its shape and spacing.
    """
    if image.ndim != 3 or not np.allclose(affine, phantom_affine(image.shape, spacing), atol=1e-3):
        return False
    expected = make_phantom(tuple(image.shape), tuple(spacing), noise_hu=0.0).image
    return float(np.mean(np.abs(image.astype(np.float32) - expected) <= 60.0)) >= 0.99  # noise is 12 HU
