"""DoubleRoundingConfig: validated once, defaults from core, serialisable the way transformers stores it."""

import pytest

from abs_llm import DoubleRoundingConfig, core


def test_defaults_come_from_core():
    cfg = DoubleRoundingConfig()
    assert cfg.master_bits == core.DEFAULT_MASTER_BITS and cfg.group_size == core.DEFAULT_GROUP_SIZE
    assert tuple(cfg.candidate_bits) == core.DEFAULT_CANDIDATE_BITS and cfg.bits == max(core.DEFAULT_CANDIDATE_BITS)


def test_bits_defaults_to_the_highest_candidate():
    """An INT4 master, or a candidate set without 8, needs no explicit ``bits``."""
    assert DoubleRoundingConfig(master_bits=4, candidate_bits=[4, 3, 2]).bits == 4
    assert DoubleRoundingConfig(candidate_bits=[6, 4]).bits == 6
    again = DoubleRoundingConfig.from_dict(DoubleRoundingConfig(candidate_bits=[6, 3]).to_dict())
    assert again.bits == 6 and again.candidate_bits == [6, 3]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"master_bits": 6}, r"master_bits=6 .* \[4, 8\]"),
        ({"bits": 5, "candidate_bits": [8, 4]}, r"bits=5 .* \[4, 8\]"),
        ({"candidate_bits": [8, 9]}, r"candidate_bits entry=9 .* \[2, 3, 4, 5, 6, 7, 8\]"),
        ({"master_bits": 4, "candidate_bits": [8, 4], "bits": 4}, r"candidate_bits entry=8 .* \[2, 3, 4\]"),
        ({"candidate_bits": []}, "non-empty"),
        ({"candidate_bits": [8, 8]}, "duplicates"),
        ({"group_size": 48}, r"power of two in \[16, 1024\]"),
        ({"group_size": 2048}, r"power of two in \[16, 1024\]"),
        ({"layer_bits": {"x": 5}, "candidate_bits": [8, 4]}, r"layer_bits\['x'\]=5"),
        ({"modules_to_not_convert": "lm_head"}, "list of names"),
        ({"format_version": 99}, "newer than this abs_llm supports"),
        ({"nonsense": 1}, "unknown fields"),
    ],
)
def test_config_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DoubleRoundingConfig(**kwargs)



def test_config_kernel_field_is_optional_and_serialisable():
    assert "kernel" not in DoubleRoundingConfig().to_dict()  # default checkpoints look as before
    cfg = DoubleRoundingConfig(kernel="dequant")
    again = DoubleRoundingConfig.from_dict(cfg.to_dict())
    assert again.kernel == "dequant"
    assert DoubleRoundingConfig.from_dict({"quant_method": "double_rounding", "bits": 8}).kernel == "auto"
    with pytest.raises(ValueError, match="kernel"):
        DoubleRoundingConfig(kernel="fast")

