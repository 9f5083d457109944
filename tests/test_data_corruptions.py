"""The CorCOCO recipe: every corruption on a 96x96 image, per-image seeding, the manifest."""

import time

import numpy as np
import pytest

from hf_caldetr.data import (
    common_corruptions,
    corrupt_dataset,
    corrupt_image,
    corrupt_images,
    corruption_for_image,
    generate_digit_scenes,
    load_digits_detection,
    load_manifest,
    save_manifest,
)


@pytest.fixture(scope="module")
def scene():
    return generate_digit_scenes(1, seed=0).images[0]


def test_the_fifteen_common_corruptions():
    names = common_corruptions()
    assert len(names) == 15 and len(set(names)) == 15
    assert {"glass_blur", "fog", "gaussian_noise", "jpeg_compression", "elastic_transform"} <= set(names)


@pytest.mark.parametrize("name", common_corruptions())
def test_every_corruption_and_severity_runs_on_a_96px_image(scene, name):
    for severity in range(1, 6):
        corrupted = corrupt_image(scene, name, severity, seed=11)
        assert corrupted.shape == (96, 96, 3) and corrupted.dtype == np.uint8
        assert not np.array_equal(corrupted, scene), f"{name} at severity {severity} left the image unchanged"
        assert np.array_equal(corrupted, corrupt_image(scene, name, severity, seed=11)), "not deterministic"


@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise", "glass_blur", "frost"])
def test_the_seed_drives_the_randomness(scene, name):
    assert not np.array_equal(corrupt_image(scene, name, 3, seed=1), corrupt_image(scene, name, 3, seed=2))


def test_global_numpy_state_is_left_alone(scene):
    np.random.seed(5)
    expected = np.random.rand(3)
    np.random.seed(5)
    corrupt_image(scene, "gaussian_noise", 2, seed=9)
    assert np.array_equal(np.random.rand(3), expected)


def test_glass_blur_is_fast_once_compiled(scene):
    corrupt_image(scene, "glass_blur", 1, seed=0)  # numba compiles on first use (seconds, once per process)
    corrupt_image(scene, "glass_blur", 3, seed=0)  # integer-only parameters: a second compilation
    start = time.perf_counter()
    for severity in range(1, 6):
        corrupt_image(scene, "glass_blur", severity, seed=0)
    assert (time.perf_counter() - start) / 5 < 0.1


def test_bad_arguments_are_refused(scene):
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        corrupt_image(scene, "rain", 1, seed=0)
    with pytest.raises(ValueError, match="severity must be one of"):
        corrupt_image(scene, "fog", 6, seed=0)
    with pytest.raises(ValueError, match="at least 32 px"):
        corrupt_image(scene[:20, :20], "fog", 1, seed=0)
    with pytest.raises(ValueError, match="non-negative integer"):
        corruption_for_image(-1)
    with pytest.raises(ValueError, match="image id 7: imagecorruptions needs images of at least 32 px"):
        corrupt_images(np.zeros((1, 20, 20, 3), dtype=np.uint8), [7])


def test_assignment_depends_only_on_seed_and_image_id():
    first = [corruption_for_image(image_id, base_seed=4) for image_id in range(300)]
    again = [corruption_for_image(image_id, base_seed=4) for image_id in reversed(range(300))][::-1]
    assert first == again
    assert {entry["corruption"] for entry in first} == set(common_corruptions())
    assert {entry["severity"] for entry in first} == {1, 2, 3, 4, 5}
    other = [corruption_for_image(image_id, base_seed=5) for image_id in range(300)]
    assert first != other


def test_array_path_is_order_independent():
    scenes = generate_digit_scenes(6, split="validation", seed=2)
    corrupted, manifest = corrupt_images(scenes.images, scenes.image_ids.tolist(), base_seed=1)
    order = [5, 2, 0, 3, 1, 4]
    shuffled, shuffled_manifest = corrupt_images(scenes.images[order], [int(i) for i in order], base_seed=1)
    assert np.array_equal(shuffled, corrupted[order])
    assert shuffled_manifest == [manifest[i] for i in order]
    assert [entry["image_id"] for entry in manifest] == list(range(6))


def test_dataset_path_keeps_ground_truth_and_matches_arrays(tmp_path):
    validation = load_digits_detection(num_train=0, num_validation=5, seed=2)["validation"]
    corrupted, manifest = corrupt_dataset(validation, base_seed=3)
    assert corrupted["objects"] == validation["objects"] and corrupted["image_id"] == validation["image_id"]
    assert corrupted.features == validation.features
    arrays, array_manifest = corrupt_images(
        generate_digit_scenes(5, split="validation", seed=2).images, list(range(5)), base_seed=3
    )
    assert manifest == array_manifest
    for index in range(5):
        assert np.array_equal(np.asarray(corrupted[index]["image"]), arrays[index])

    path = tmp_path / "manifest.json"
    save_manifest(manifest, str(path), base_seed=3)
    assert load_manifest(str(path)) == manifest
    assert set(manifest[0]) == {"image_id", "corruption", "severity"}
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON"):
        load_manifest(str(tmp_path / "bad.json"))
