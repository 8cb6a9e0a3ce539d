"""Generic helpers with no knowledge of diffusion (configs, URLs, caches, logging)."""

from .util import EasyDict, make_cache_dir_path  # noqa: F401
