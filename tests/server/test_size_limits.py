"""`sdgraph serve --max-image-megapixels/--max-batch-megapixels` reach the limits validation uses (issue #11)."""

from __future__ import annotations

from engine.sizes import MEGAPIXEL, SizeLimits
from service.options import build_parser, config_from_args


def test_serve_flags_set_the_size_limits():
    default = config_from_args(build_parser().parse_args([]))
    assert default.limits.sizes == SizeLimits(16 * MEGAPIXEL, 64 * MEGAPIXEL)
    config = config_from_args(build_parser().parse_args(["--max-image-megapixels", "2", "--max-batch-megapixels",
                                                         "4"]))
    assert config.limits.sizes == SizeLimits(2 * MEGAPIXEL, 4 * MEGAPIXEL)
