"""`sdgraph serve` shares the disk cache with `sdgraph run`: the same flags, the same default directory."""

from __future__ import annotations

import pytest

from service.options import build_parser, config_from_args


def test_the_server_uses_base_user_cache_by_default_and_the_same_flags_as_run(tmp_path):
    config = config_from_args(build_parser().parse_args(["--base-dir", str(tmp_path)]))
    assert config.disk_cache.root == tmp_path / "user" / "cache" and config.disk_cache.max_bytes == 10 << 30
    config = config_from_args(build_parser().parse_args(["--base-dir", str(tmp_path), "--cache-dir",
                                                         str(tmp_path / "c"), "--cache-size", "2G"]))
    assert (config.disk_cache.root, config.disk_cache.max_bytes) == (tmp_path / "c", 2 << 30)
    assert config_from_args(build_parser().parse_args(["--no-disk-cache"])).disk_cache is None


def test_a_cache_size_that_cannot_work_names_the_flag():
    with pytest.raises(ValueError, match="--cache-size"):
        config_from_args(build_parser().parse_args(["--cache-size", "0"]))
