"""Atomic checkpoint and JSON files: a kill at any moment leaves the previous version readable."""

from __future__ import annotations

import json
import os
import pickle
import signal
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from mq.core.errors import ConfigError, first_line

if TYPE_CHECKING:  # torch is imported where a checkpoint is written or read: the sweep ledger
    import torch  # (mq.job.ledger, hence Hydra's plugin scan at every start-up) needs JSON only


def _tmp_name(path: Path) -> Path:
    # Unique per process and call: two writers never share (and clobber) one temporary file.
    return path.with_name(f"{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")


def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def _ctrl_c_after_write() -> Iterator[None]:
    """Hold a Ctrl-C back until the file is written: raised inside torch.save it surfaces as
    torch's "unexpected pos" RuntimeError and loses the checkpoint the run just paid for."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be changed in the main thread (which runs training)
        return
    received: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):
        previous(signal.SIGINT, received[0])  # Python's default raises KeyboardInterrupt here


def _write(path: Path, write: Any) -> None:
    """``write(tmp)``, then rename tmp over ``path``; on any failure (a full disk) the
    temporary file is removed and ``path`` keeps its previous version."""
    tmp = _tmp_name(path)
    try:
        with _ctrl_c_after_write():
            write(tmp)
            _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _KeepError:
    """A file for torch.save that remembers the OSError of a failed write: torch reports a
    full disk as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos"."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


def _compact(value: Any) -> Any:
    """``value`` with every tensor that is a view into a larger storage copied out: torch.save
    writes a view's whole storage (a packed run's weights are views into K runs' tensors)."""
    import torch

    if isinstance(value, torch.Tensor):
        whole = value.untyped_storage().nbytes()
        return value.clone() if whole > value.numel() * value.element_size() else value
    if isinstance(value, dict):
        return type(value)((k, _compact(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_compact(v) for v in value)
    return value


def _torch_save(state: dict[str, Any], tmp: Path) -> None:
    state = _compact(state)
    with open(tmp, "wb") as f:
        writer = _KeepError(f)
        try:
            import torch

            torch.save(state, writer)  # type: ignore[arg-type]  # any object with write()
        except RuntimeError as exc:
            if writer.error is not None:
                raise writer.error from exc  # "No space left on device", not torch's words
            raise


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename."""
    _write(path, lambda tmp: _torch_save(state, tmp))


def load_tensors(path: Path | str, device: torch.device | str = "cpu") -> Any:
    """``torch.load`` with ``weights_only``: tensors and plain Python values only, so a planted
    or copied file cannot run code. Raises whatever torch raises for a bad file."""
    with warnings.catch_warnings():  # e.g. "pickle protocol 4": the error says it all
        warnings.simplefilter("ignore")
        import torch

        return torch.load(path, map_location=device, weights_only=True)


def load_error(exc: BaseException) -> str:
    """Why ``load_tensors`` failed, in one line (torch raises many types for a bad file)."""
    reason = first_line(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in reason:
        return "it holds objects other than tensors and plain values, which are not loaded"
    return reason


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint written by save_checkpoint (see load_tensors). An unreadable file is a
    ConfigError saying what to do."""
    try:
        state = load_tensors(path, device)
    except Exception as exc:
        raise ConfigError(
            f"{path} is unreadable ({load_error(exc)}); move it away to start the run over"
        ) from exc
    if not isinstance(state, dict) or "progress" not in state:
        raise ConfigError(f"{path} is not an mq checkpoint; move it away to start the run over")
    return state


def json_text(data: dict[str, Any]) -> str:
    """How summary.json and the other JSON files are written."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json(data: dict[str, Any], path: Path) -> None:
    text = json_text(data)
    _write(path, lambda tmp: tmp.write_text(text))


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file is missing, unreadable or holds
    something else (a list, a number: not what any mq file holds)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
