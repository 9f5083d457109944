"""The CorCOCO recipe: an out-of-domain copy of an evaluation set.

Every image gets one of the 15 common corruptions of Hendrycks & Dietterich (ICLR 2019) at a severity from
1 to 5, both drawn at random per image; the ground truth is unchanged. The draw for an image depends only on
``(base_seed, image_id)``, so it is reproducible and independent of the order or subset of images. The
corruptions come from the ``imagecorruptions-imaug`` package (module ``imagecorruptions``), the maintained
fork: the original 1.1.2 fails glass_blur, fog and gaussian_blur on numpy 2.

Measured on 96x96 images (imagecorruptions-imaug 1.1.5, numpy 2.4, shared 2-core CPU): all 15 corruptions
run at every severity, keep the shape and change the image; nothing needed working around. Severities were
tuned on 224 px ImageNet images, so the blurs are relatively stronger on small images. glass_blur compiles a
numba kernel on its first call in a process (about 3 s, plus 0.4 s for severity 3, whose parameters are all
integers), then takes 1 to 3 ms per image; the slowest corruption afterwards is zoom_blur (about 15 ms), the
average about 3 ms. Images smaller than 32 px are refused by the package (a ``ValueError`` here).

Randomness: most corruptions draw from numpy's global random state, which is seeded per image here and
restored afterwards (so this is not thread-safe); glass_blur and impulse_noise take the seed as an argument
and would otherwise draw from an unseeded generator.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import numpy as np

SEVERITIES = (1, 2, 3, 4, 5)
MIN_IMAGE_PX = 32  # imagecorruptions refuses smaller images
# These two ignore numpy's global state unless given a seed.
_SEEDED_BY_ARGUMENT = {"glass_blur", "impulse_noise"}


def common_corruptions() -> list[str]:
    """The 15 corruption names of the benchmark, in the package's order."""
    from imagecorruptions import get_corruption_names

    return list(get_corruption_names("common"))


def corruption_for_image(image_id: int, base_seed: int = 0, corruptions: list[str] | None = None) -> dict:
    """The corruption drawn for one image: ``{"image_id", "corruption", "severity", "seed"}``.

    ``seed`` seeds the corruption's own randomness (noise, frost crop, ...).
    """
    if not isinstance(image_id, (int, np.integer)) or image_id < 0:
        raise ValueError(f"image_id must be a non-negative integer to seed its corruption, got {image_id!r}")
    names = corruptions if corruptions is not None else common_corruptions()
    rng = np.random.default_rng((base_seed, int(image_id)))
    return {
        "image_id": int(image_id),
        "corruption": names[int(rng.integers(len(names)))],
        "severity": int(rng.integers(1, 6)),
        "seed": int(rng.integers(2**32)),
    }


@contextlib.contextmanager
def _global_numpy_seed(seed: int):
    """Seed numpy's global random state for the block, then put the caller's state back."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """One corrupted copy of a uint8 ``[H, W, 3]`` image, deterministic given ``seed``.

    Raises:
        ValueError: an unknown corruption, a severity outside 1..5, an image smaller than 32 px.
    """
    from imagecorruptions import corrupt, get_corruption_names

    if corruption not in get_corruption_names("all"):
        raise ValueError(f"unknown corruption {corruption!r}; expected one of {get_corruption_names('all')}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {list(image.shape)}")
    if min(image.shape[:2]) < MIN_IMAGE_PX:
        raise ValueError(
            f"imagecorruptions needs images of at least {MIN_IMAGE_PX} px, got {list(image.shape[:2])}"
        )
    extra = {"seed": seed} if corruption in _SEEDED_BY_ARGUMENT else {}
    with _global_numpy_seed(seed):
        return corrupt(image, corruption_name=corruption, severity=severity, **extra)


def _apply_assignment(image: np.ndarray, assignment: dict) -> np.ndarray:
    """``corrupt_image`` with one image's drawn assignment; an error names the image id."""
    try:
        return corrupt_image(image, assignment["corruption"], assignment["severity"], assignment["seed"])
    except ValueError as error:
        raise ValueError(f"image id {assignment['image_id']}: {error}") from None


def _manifest_entry(assignment: dict) -> dict:
    """The saved form of an assignment: what the recipe promises, without the internal seed."""
    return {key: assignment[key] for key in ("image_id", "corruption", "severity")}


def corrupt_images(
    images: np.ndarray, image_ids: list[int], base_seed: int = 0, corruptions: list[str] | None = None
) -> tuple[np.ndarray, list[dict]]:
    """The array fast path: corrupt uint8 ``[N, H, W, 3]`` images; returns the copies and the manifest."""
    names = corruptions if corruptions is not None else common_corruptions()
    corrupted = np.empty_like(images)
    manifest = []
    for index, image_id in enumerate(image_ids):
        assignment = corruption_for_image(image_id, base_seed, names)
        corrupted[index] = _apply_assignment(images[index], assignment)
        manifest.append(_manifest_entry(assignment))
    return corrupted, manifest


def corrupt_dataset(
    dataset, base_seed: int = 0, corruptions: list[str] | None = None
) -> tuple[Any, list[dict]]:
    """A corrupted copy of a ``datasets.Dataset`` in the detection schema, and its manifest.

    Only ``image`` changes; ``image_id`` and ``objects`` (the ground truth) are kept as they are.

    Returns:
        ``(dataset, manifest)``, the manifest a list of ``{"image_id", "corruption", "severity"}`` in row
        order, ready for ``save_manifest``.
    """
    from .schema import png_bytes

    names = corruptions if corruptions is not None else common_corruptions()
    assignments = [corruption_for_image(image_id, base_seed, names) for image_id in dataset["image_id"]]

    def corrupt_row(image, index):
        pixels = _apply_assignment(np.asarray(image.convert("RGB")), assignments[index])
        return {"image": {"bytes": png_bytes(pixels), "path": None}}

    corrupted = dataset.map(
        corrupt_row,
        input_columns=["image"],
        with_indices=True,
        features=dataset.features,
        desc="corrupting images",
    )
    return corrupted, [_manifest_entry(assignment) for assignment in assignments]


def save_manifest(manifest: list[dict], path: str, base_seed: int | None = None) -> None:
    """Write the manifest as JSON: ``{"base_seed", "images": [{"image_id", "corruption", "severity"}]}``."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump({"base_seed": base_seed, "images": manifest}, file, indent=1)


def load_manifest(path: str) -> list[dict]:
    """The ``images`` list of a manifest written by ``save_manifest``.

    Raises:
        ValueError: the file is not such a manifest (the message names the file).
    """
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON: {error.msg} (line {error.lineno})") from None
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise ValueError(f"{path}: not a corruption manifest (expected an object with an 'images' list)")
    return content["images"]
