"""Agnostic masks against the official Leffa outputs (shared fixture), and label conversions."""

import numpy as np
import pytest
from conftest import shared_path

from leffa_jax.data import masks


@pytest.fixture(scope="module")
def fixture_npz():
    return np.load(shared_path("fixtures", "masks", "agnostic_masks.npz"))


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("variant", ["hd", "dc"])
@pytest.mark.parametrize("category", masks.CATEGORIES)
def test_agnostic_mask_matches_official(fixture_npz, case, variant, category):
    parse = fixture_npz[f"case{case}_parse"]
    kp = fixture_npz[f"case{case}_keypoints"]
    ref = fixture_npz[f"case{case}_{variant}_{category}"]
    out = masks.agnostic_mask(parse, kp, category, variant)
    assert out.shape == ref.shape == (512, 384)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, ref)


def test_official_input_form_dict_keypoints(fixture_npz):
    # The official functions read {"pose_keypoints_2d": flat list}.
    kp = {"pose_keypoints_2d": fixture_npz["case1_keypoints"].flatten().tolist()}
    out = masks.agnostic_mask_hd(fixture_npz["case1_parse"], kp, "upper_body")
    np.testing.assert_array_equal(out, fixture_npz["case1_hd_upper_body"])


def test_hd_resizes_parse_with_nearest(fixture_npz):
    # A 2x nearest-upsampled parse map gives the same mask (the function resizes to 384x512).
    parse = fixture_npz["case0_parse"].repeat(2, 0).repeat(2, 1)
    out = masks.agnostic_mask_hd(parse, fixture_npz["case0_keypoints"], "lower_body")
    np.testing.assert_array_equal(out, fixture_npz["case0_hd_lower_body"])


def test_protect_fixed_removes_fixed_regions(fixture_npz):
    # The README notes the trousers of case 0 end up ~99% inside the official upper_body mask;
    # the corrected variant keeps every pants pixel out of it.
    parse = fixture_npz["case0_parse"]
    kp = fixture_npz["case0_keypoints"]
    pants = parse == masks.PANTS
    official = masks.agnostic_mask_hd(parse, kp, "upper_body")
    assert official[pants].mean() > 0.9
    fixed = masks.agnostic_mask_hd(parse, kp, "upper_body", protect_fixed=True)
    assert fixed[pants].sum() == 0
    assert fixed[parse == masks.UPPER].mean() == 1.0


def test_lip_to_atr_hand_table():
    lip = np.arange(20, dtype=np.uint8)[None]
    # LIP: bg hat hair glove sunglasses upper dress coat socks pants torso scarf skirt face
    #      larm rarm lleg rleg lshoe rshoe
    expected = [0, 1, 2, 14, 3, 4, 7, 4, 12, 6, 18, 17, 5, 11, 14, 15, 12, 13, 9, 10]
    assert masks.lip_to_atr(lip)[0].tolist() == expected
    with pytest.raises(ValueError, match="out of range"):
        masks.lip_to_atr(np.array([[20]], np.uint8))


def test_atr_lip_round_trip_for_shared_labels():
    shared = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 17, 18]
    atr = np.array([shared], np.uint8)
    assert masks.lip_to_atr(masks.atr_to_lip(atr)).tolist() == atr.tolist()


def test_garment_region_hand_example():
    parse = np.array([[0, 4, 5], [6, 7, 14]], np.uint8)
    assert masks.garment_region(parse, "upper_body", "dc").tolist() == [[0, 1, 0], [0, 0, 0]]
    assert masks.garment_region(parse, "upper_body", "hd").tolist() == [[0, 1, 0], [0, 1, 0]]
    assert masks.garment_region(parse, "lower_body").tolist() == [[0, 0, 1], [1, 0, 0]]
    assert masks.garment_region(parse, "dresses", "dc").tolist() == [[0, 0, 0], [0, 1, 0]]
    with pytest.raises(ValueError, match="category"):
        masks.garment_region(parse, "hats")
