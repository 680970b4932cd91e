"""Training checkpoints: written atomically, loaded safely, and complete enough to resume bitwise.

A checkpoint is one ``torch.save``-d dict (see ``llm.train.pretrain._checkpoint_state`` for the keys): the
model and optimizer state, the step (the schedule is a function of it), every RNG the run draws
from, the data loader's position and both configs.  Everything in it is a tensor or a plain Python
value, so it loads with ``torch.load(weights_only=True)`` -- no pickled code runs on load.
"""
from __future__ import annotations

import errno
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

FORMAT = "llm-pretrain-v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or not one of ours; the message says which file and why."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(f)`` on a temp file in the same folder, fsync it, then ``os.replace`` it into place.

    ``os.replace`` is atomic on POSIX and Windows, so a reader (or a crash) sees either the old
    file or the complete new one, never a half-written mix; the fsyncs make sure the bytes are on
    disk before the rename is.  On any error the temp file is removed and the old file is untouched.
    Every file a run writes (checkpoint, metrics log, plot) goes through here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f"{_temp_prefix(path)}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        full = isinstance(exc, Exception) and _disk_full(path.parent, exc)  # asked before the temp is gone
        tmp.unlink(missing_ok=True)
        if full:
            kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
            raise OSError(errno.ENOSPC, f"no space left on {path.parent} while writing {path.name} ({kept}); "
                                        "free some space, then --resume") from exc
        raise
    _fsync_dir(path.parent)


def _disk_full(folder: Path, exc: Exception) -> bool:
    """Whether a failed write failed for want of space (torch.save says only "enforce fail at
    inline_container.cc"): ENOSPC itself, or under 1 MiB left on the file system."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files of ``path`` left by writers that died mid-write (e.g. SIGKILL).

    A temp file is named ``.<name>.tmp-<pid>``; it is stale when no process ``<pid>`` is alive
    (a live pid may be another run writing right now, so its file is kept).  Our own pid's temp
    can only be a leftover too: this process writes one file at a time.  Returns what was removed.
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(_temp_prefix(path) + "*"):
        pid = tmp.name[len(_temp_prefix(path)):]
        if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but is not ours (or we cannot tell): keep its file
    return True


def _fsync_dir(folder: Path) -> None:
    # Persist the rename itself; not every platform lets a directory be opened for this.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a training checkpoint written by :func:`llm.train.pretrain.train`; CheckpointError if it can't."""
    path = Path(path)
    if not path.is_file():
        hint = " (train one with `python -m llm pretrain`)" if path.name == "ckpt.pt" else ""
        raise CheckpointError(f"checkpoint not found: {path}{hint}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, not a pickle traceback
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of this package (format {FORMAT!r})")
    return ckpt


RESUME_KEYS = ("model", "model_config", "optimizer", "step", "tokens", "rng", "loader", "loader_mode",
               "train_config", "initial_val_loss")


def check_resumable(ckpt: dict, path: str | os.PathLike) -> None:
    """CheckpointError naming what a pretraining checkpoint lacks to be resumed (not a KeyError)."""
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"cannot resume from {path}: the checkpoint has no {', '.join(missing)} "
                              "(damaged, or written by something else); start a new run with --overwrite")
    if not isinstance(ckpt["rng"], list) or not ckpt["rng"]:
        raise CheckpointError(f"cannot resume from {path}: its RNG state is empty (one entry per process "
                              "expected); start a new run with --overwrite")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """The GPT stored in a training checkpoint, on ``device``, in eval mode."""
    return model_from_checkpoint(load_checkpoint(path, map_location="cpu"), device)


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu"):
    """The GPT of an already loaded checkpoint dict, on ``device``, in eval mode."""
    from ..model import GPT, GPTConfig

    missing = [k for k in ("model", "model_config") if k not in ckpt]
    if missing:
        raise CheckpointError(f"the checkpoint holds no {' or '.join(missing)}: not a model checkpoint, or damaged")
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# RNG state: every generator the training loop draws from (dropout, data order, sampling).


def capture_rng() -> dict:
    """The state of Python's, NumPy's and torch's global RNGs (CPU and every CUDA device)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # NumPy's state holds an ndarray; as a list it stays loadable with weights_only=True.
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def restore_rank_rng(rng: list[dict], rank: int, world_size: int, seed: int, step: int) -> None:
    """Each rank continues its own saved RNG streams (``rng``: one entry per rank of the saved run).

    When the world size changed there is no saved state for most ranks: all take rank 0's (Python and
    NumPy streams stay in step), and ranks > 0 then reseed torch, or every rank would draw the same
    dropout masks.  The step keeps the seed from repeating a run start's.
    """
    if len(rng) == world_size:
        restore_rng(rng[rank])
        return
    restore_rng(rng[0])
    if rank > 0:
        torch.manual_seed(seed + rank + step)


def check_resume_settings(saved: dict, now: dict, fixed: Callable[[str], bool], saved_world_size: int = 1,
                          world_size: int = 1) -> dict[str, tuple]:
    """Compare a resumed run's settings ``now`` with the ``saved`` ones of its checkpoint.

    Raises ValueError naming the flag and both values when a setting for which ``fixed(name)`` is true
    differs; returns ``{name: (saved, now)}`` of the other settings that changed.  ``batch_size`` is
    per process, so what must stay is ``batch_size * world_size`` (the global batch).
    """
    changed = {}
    for name, value in now.items():
        if name not in saved:
            continue
        was = saved[name]
        same = was * saved_world_size == value * world_size if name == "batch_size" else was == value
        if same:
            continue
        if fixed(name):
            flag = "--" + name.replace("_", "-")
            worlds = f" (world size {saved_world_size} then, {world_size} now)" if name == "batch_size" else ""
            raise ValueError(f"{flag} cannot change when resuming: the checkpoint's run used {name}={was!r}, "
                             f"this run asks for {value!r}{worlds}; it decides the model or the training data, "
                             "so start a new run (another --out-dir) to change it")
        changed[name] = (was, value)
    return changed


def _as_tuple(x):
    # random.setstate wants tuples all the way down; a save/load round trip may turn them to lists.
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def to_plain(obj: Any) -> Any:
    """Recursively turn NumPy arrays/scalars into lists/Python numbers (for weights_only loading)."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ---------------------------------------------------------------------------------------------
# One run per output folder at a time.


class RunLock:
    """An exclusive lock on ``<out_dir>/.lock`` for as long as a run writes there: a second run
    started in the same folder fails at once with a message, instead of two runs interleaving their
    checkpoints and logs.  An OS file lock (flock; msvcrt on Windows): it goes away with the process,
    even when that is killed, so a crashed run never leaves the folder locked (only, then, the empty
    ``.lock`` file, which the next run takes over)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() if hasattr(os, "pread") else ""
            os.close(fd)
            raise FileExistsError(f"another run is writing to {self.path.parent} ({holder or 'pid unknown'}): "
                                  "wait for it to finish, or use another --out-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: the folder is left as the run made it
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
