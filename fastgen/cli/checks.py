"""Up-front checks of the things around a generation that a user names: the device, the output file,
checkpoint files, a port. Each raises a ``ValueError`` with one line (option, value, what is allowed)
before any model is loaded, so nothing is computed for an output that could not be written.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import zipfile

from fastgen.cli.options import OUTPUT_EXTENSIONS


class UsageError(ValueError):
    """One or more problems with what the user typed (exit status 2); one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class RuntimeFailure(Exception):
    """A failure of the run itself (not of what the user typed): the command exits with status 1."""


def check_device(device: str | None, flag: str = "--device") -> None:
    """``cpu``, ``cuda``, ``cuda:N`` (with CUDA present and ``N`` a present GPU) or ``mps`` (when present)."""
    if device is None:
        return
    import torch

    allowed = (
        "cpu"
        + (", cuda, cuda:N" if torch.cuda.is_available() else "")
        + (", mps" if torch.backends.mps.is_available() else "")
    )
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{flag}={device!r} is not a device; allowed: {allowed}") from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{flag}={device!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                f"no usable GPU); allowed: {allowed}"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"{flag}={device!r}: there are {count} GPU(s); allowed: cuda:0..cuda:{count - 1}"
            )
        return
    if parsed.type == "mps" and torch.backends.mps.is_available():
        return
    raise ValueError(f"{flag}={device!r} is not supported here; allowed: {allowed}")


def check_output_file(path: str, family: str, *, overwrite: bool, flag: str = "--out") -> str:
    """Check ``path`` before any work: the extension fits the family (``.mp4`` video, ``.txt`` text), it
    is not a folder, an existing file is only replaced with ``--overwrite``, and its folder exists (it is
    created) and is writable. Returns the path."""
    allowed = OUTPUT_EXTENSIONS[family]
    ext = os.path.splitext(path)[1].lower()
    if ext not in allowed:
        raise ValueError(
            f"{flag}={path!r} has extension {ext or '(none)'!r}; allowed for "
            f"{'text' if family == 'text' else 'video'}: {', '.join(allowed)}"
        )
    if os.path.isdir(path):
        raise ValueError(f"{flag}={path!r} is a folder; allowed: a file name ending in {', '.join(allowed)}")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{flag}={path!r} exists; pass --overwrite to replace it, or choose another name")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), flag=flag, shown=path)
    return path


def check_writable_folder(folder: str, *, flag: str, shown: str | None = None) -> str:
    """Create ``folder`` if missing and check that files can be created in it; a ``ValueError`` naming
    ``flag`` and the value otherwise."""
    shown = folder if shown is None else shown
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{flag}={shown!r}: {folder!r} is a file, not a folder; allowed: a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag}={shown!r}: cannot create folder {folder!r} ({err.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}={shown!r}: folder {folder!r} is not writable; allowed: a writable folder")
    return folder


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """``port`` in 1..65535 (else ``ValueError``) and free on ``host`` (else :class:`RuntimeFailure`)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"--port={port} is not allowed; allowed: 1..65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise RuntimeFailure(
                f"--port={port}: cannot listen on {host}:{port} ({err.strerror}); choose another port"
            ) from None


# ----------------------------------------------------------------------------------------------------
# checkpoint files: read their headers before handing them to a loader whose error names no file


def check_safetensors_file(path: str) -> None:
    """A ``RuntimeFailure`` naming ``path`` when its safetensors header is unreadable or the file is
    shorter than the header says (truncated). Reads the header only."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
        raise RuntimeFailure(f"checkpoint file {path!r} is not a readable safetensors file ({err})") from None
    if 8 + n + end > size:
        raise RuntimeFailure(
            f"checkpoint file {path!r} is truncated: {size} bytes, its header promises {8 + n + end}"
        )


def check_torch_file(path: str, flag: str) -> None:
    """A ``RuntimeFailure`` naming ``path`` when a PyTorch ``.pt`` file is not a complete zip archive
    (torch's own message for such a file names no file and suggests ``weights_only=False``)."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag}={path!r} does not exist; allowed: a .pt/.pth file")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if not any(n.endswith("data.pkl") for n in names):
                raise zipfile.BadZipFile("no data.pkl")
    except (zipfile.BadZipFile, OSError) as err:
        raise RuntimeFailure(
            f"{flag}={path!r} is not a complete PyTorch checkpoint (truncated or corrupt: {err})"
        ) from None


def check_checkpoint_folder(folder: str) -> None:
    """Check the headers of every ``*.safetensors`` file under a local checkpoint folder."""
    if not os.path.isdir(folder):
        return
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".safetensors"):
                check_safetensors_file(os.path.join(root, name))


def friendly_load_error(err: BaseException) -> str | None:
    """One line for a loader's failure on a user's file, without torch's advice to unpickle untrusted
    data (``weights_only=False``); ``None`` when ``err`` is not such a failure."""
    import pickle

    text = str(err).strip()
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in text or "PytorchStreamReader" in text:
        first = next((line for line in text.splitlines() if line.strip()), type(err).__name__)
        if "weights_only" in first:
            first = "not a plain tensor checkpoint"
        return f"the checkpoint could not be read ({first.strip()})"
    if type(err).__name__ == "SafetensorError" or "deserializing header" in text:
        return f"a .safetensors file of the checkpoint is unreadable ({text.splitlines()[0]})"
    return None


__all__ = [
    "RuntimeFailure",
    "check_checkpoint_folder",
    "check_device",
    "check_output_file",
    "check_port",
    "check_safetensors_file",
    "check_torch_file",
    "check_writable_folder",
    "friendly_load_error",
]
