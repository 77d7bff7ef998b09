"""Small file helpers shared by the loaders and savers: strict JSON reading, atomic writes, finding a
component (``unet/``, ``scheduler/``) inside a diffusers folder, and minidiff's cache directory."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

PathLike = str | os.PathLike
DIFFUSERS_VERSION = "0.42.1"  # written into saved configs; diffusers reads them as its own
# Keys diffusers writes into every config.json for its own bookkeeping; they never change a model or scheduler.
BOOKKEEPING_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})


def cache_dir(*parts: str) -> Path:
    """``$MINIDIFF_CACHE/<parts>`` when the variable is set, else ``$XDG_CACHE_HOME/minidiff/<parts>``
    (``~/.cache/minidiff/<parts>``)."""
    root = os.environ.get("MINIDIFF_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minidiff"
    return Path(root).joinpath(*parts)


def read_json(path: PathLike) -> dict[str, Any]:
    """Read a JSON object, naming the file in the error when it is missing or malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: malformed JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{path}: malformed JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds, so a crash
    never leaves a half-written file behind. The file is made readable as the umask allows (writers such as
    safetensors create it 0600) and flushed to disk before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as done:
            os.fsync(done.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as indented, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def component_dir(path: PathLike, subfolder: str, marker: str) -> Path:
    """The folder holding ``marker`` for a component: ``path/subfolder`` of a pipeline folder,
    or ``path`` itself (a component folder, or the flat layout of google/ddpm-* repos)."""
    if not isinstance(path, (str, os.PathLike)) or path == "":
        raise TypeError(f"path={path!r}: expected a folder path (a non-empty str or os.PathLike)")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    for candidate in (path / subfolder, path):
        if (candidate / marker).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no {marker} in it or in its '{subfolder}/' subfolder")
