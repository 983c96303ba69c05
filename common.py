"""
Plumbing every script shares, and nothing about diffusion: the one error type for bad input and its exit
path, checks that an output can be written before slow work starts, atomic writes, reading files a user
hands us, checked downloads, the device and its name in words.

    from common import UsageError, exit_on_usage_error
    with exit_on_usage_error():      # a UsageError -> "error: <message>" on stderr, exit code 2, no traceback
        ...
    writable_file("out/grid.png", "--out")           # UsageError now, not a traceback after an hour of work
    write_json("out/results.json", record)           # temp file + rename (atomic_write)
"""
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import pickle
import platform
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading

import numpy as np
import torch


CACHE_DIR = os.environ.get("DIT_NANO_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
"""Where downloads and computed files are cached (toy pairs and networks, CIFAR-10, FID statistics): data/ beside
the scripts, or $DIT_NANO_CACHE. Read at call time, so a test can point it elsewhere."""


class UsageError(ValueError):
    """Bad input a user can fix (a flag, a file, a folder): the message names the problem and the fix.
    Scripts print it as one paragraph and exit with code 2; a ValueError for code that calls the library."""


def fail(message):
    """The exit path for bad input: one paragraph on stderr (a message quoting a library's multi-line error
    is joined into one line), exit code 2."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def exit_on_usage_error():
    """The one exit path for bad input: a UsageError inside ends the program with its message and code 2."""
    try:
        yield
    except UsageError as e:
        fail(e)


# ----------------------------------------------------------------------------------------------
# Checking what the user typed

def check_number(value, flag, low=None, high=None, low_open=False, integer=False):
    """A flag's value must be finite and within [low, high] (or (low, high] with low_open); None passes."""
    if value is None:
        return
    too_low = low is not None and (value <= low if low_open else value < low)
    if math.isfinite(value) and not too_low and (high is None or value <= high):
        return
    if integer and low == 1 and high is None:
        raise UsageError(f"{flag} must be a positive integer, got {value:g}.")
    bounds = [f"{'greater than' if low_open else 'at least'} {low:g}"] if low is not None else []
    bounds += [f"at most {high:g}"] if high is not None else []
    raise UsageError(f"{flag} must be {'an integer' if integer else 'a number'} {' and '.join(bounds)}, "
                     f"got {value:g}.")


def positive_ints(args, *flags):
    """Each named integer flag of args (attribute names) must be >= 1 when given."""
    for name in flags:
        check_number(getattr(args, name), "--" + name.replace("_", "-"), low=1, integer=True)


def parse_numbers(text, flag, kind, example, sep=","):
    """A flag's list 'a,b,c' -> [kind(a), kind(b), kind(c)], or a UsageError naming the flag and an example."""
    try:
        return [kind(v) for v in text.split(sep)]
    except ValueError:
        raise UsageError(f"{flag} {text}: expected {kind.__name__}s separated by '{sep}', e.g. {flag} {example}.")


def check_blocks(blocks, depth, flag, who="the student"):
    """A flag's block numbers (1-based; ta.py, mi1.py) must increase and lie in 1..depth; raises UsageError."""
    if any(not 1 <= b <= depth for b in blocks):
        raise UsageError(f"{flag}: blocks {blocks} are not all among {who}'s blocks 1..{depth}.")
    if any(b <= a for a, b in zip(blocks, blocks[1:])):
        raise UsageError(f"{flag}: blocks {blocks} must be increasing (each of {who}'s blocks is mapped "
                         f"at most once, in order).")


def writable_dir(path, flag):
    """Make sure folder `path` exists (creating it) and can hold new files; UsageError otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file, not a folder: choose a folder path.")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write files there ({e.strerror or e}); choose another path.")


def writable_file(path, flag):
    """Make sure file `path` can be written (its folder is made if needed) before any slow work."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder: give a file path.")
    writable_dir(os.path.dirname(os.path.abspath(path)), flag)


def atomic_write(path, write):
    """write(temp_path), then rename it over `path`: a reader, or a crash, never sees half a file, and the old
    file stays whole until the new one is complete. The temp name holds the host and process id, so processes
    writing the same path at once (runs started together, each building the shared toy cache) do not clobber
    each other's temp: each renames a whole one, and the last rename wins. `write` may make a folder at the temp
    path instead (GET's converted arrays): it replaces the old folder, and a process beaten to that rename keeps
    the other's. A temp of this host's process that was killed mid-write is removed by the next write of `path`."""
    prefix = f"{path}.{socket.gethostname()}."
    remove_dead_temps(prefix)
    tmp = f"{prefix}{os.getpid()}.tmp"
    try:
        write(tmp)
        if os.path.isdir(tmp):
            shutil.rmtree(path, ignore_errors=True)  # os.replace cannot replace a folder that holds files
        try:
            os.replace(tmp, path)
        except OSError:  # a folder: another process renamed its whole one in between; else a real error
            if not (os.path.isdir(tmp) and os.path.isdir(path)):
                raise
    finally:  # interrupted, or beaten to the rename: nothing left behind
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def remove_dead_temps(prefix):
    """atomic_write's temps PREFIX + PID.tmp whose process is gone. Only this host's are named by PREFIX: a pid
    says nothing about a process on another machine sharing the folder."""
    parent, name = os.path.split(prefix)
    for entry in os.listdir(parent or "."):
        pid = entry[len(name):-len(".tmp")]
        if entry.startswith(name) and entry.endswith(".tmp") and pid.isdigit() and not pid_alive(int(pid)):
            dead = os.path.join(parent, entry)
            if os.path.isdir(dead):
                shutil.rmtree(dead, ignore_errors=True)
            else:
                os.remove(dead)


def pid_alive(pid):
    if os.name == "nt":  # Windows' os.kill would end the process, not ask about it: keep its temp
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        pass
    return True


def write_json(path, record):
    """A JSON file, written atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
    atomic_write(path, write)


def save_npz(path, **arrays):
    """np.savez to exactly `path` (through a file object, so no .npz is appended), atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def load_torch_file(path, what, flag, **kwargs):
    """torch.load(weights_only=True) of a file the user names; a missing, truncated or foreign file is a
    UsageError saying it is not `what`. Never unpickles arbitrary objects."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file (expected {what}).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as e:  # truncated, not a torch file, a pickle of objects, a legacy format, ...
        raise UsageError(f"{flag} {path} is not {what}: it cannot be read ({load_error(e)}). "
                         f"Check the path, or write the file again.")


def load_error(e, limit=200):
    """A torch.load failure in a few words for a message: its type and first line. An unpickling error's own
    text advises weights_only=False, which would run code from a file the user was handed: not repeated."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, pickle.UnpicklingError):
        first = "it holds Python objects, not only tensors and plain containers, or it is not a torch file"
    return f"{type(e).__name__}: {first[:limit]}"


# ----------------------------------------------------------------------------------------------
# Downloads: one checked path for every file fetched (LPIPS trunks, the FID Inception, CIFAR-10)

def file_digest(path, algorithm="sha256"):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_file(url, path, sha256_prefix=None, md5=None):
    """url -> path via a temp file, checked by sha256 prefix (as torch hub does) or md5, with a 60 s socket
    timeout so that an offline machine fails in a minute, not never. Any failure raises OSError and leaves
    no file at path; callers turn it into a message that names the file, the URL and the offline flag."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    print(f"downloading {url} -> {path}", file=sys.stderr)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        def fetch(tmp):
            torch.hub.download_url_to_file(url, tmp, hash_prefix=sha256_prefix)
            if md5 and file_digest(tmp, "md5") != md5:
                raise OSError(f"md5 is not {md5}")
        atomic_write(path, fetch)
    except Exception as e:
        raise OSError(f"{type(e).__name__}: {e}") from e
    finally:
        socket.setdefaulttimeout(old)


def weights_file(path, flag, name, url, download=True, offline_hint=""):
    """A pretrained network's weights file (LPIPS's trunks, the FID Inception): `path` when the user names one
    (flag), else torch hub's cache (TORCH_HOME/hub/checkpoints/name), else downloaded there, checked against the
    sha256 prefix in its name (name-PREFIX.pth). None when it is not cached and download is False; a UsageError
    naming the file, the folder and the offline way (offline_hint) when it cannot be had."""
    if path:
        if not os.path.isfile(path):
            raise UsageError(f"{flag} {path}: no such file (expected {name}, {url}).")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if os.path.isfile(cached) or not download:
        return cached if os.path.isfile(cached) else None
    try:
        download_file(url, cached, sha256_prefix=name.rsplit("-", 1)[-1].split(".")[0])
    except OSError as e:
        raise UsageError(f"{name} is needed, but it is not in the cache folder {os.path.dirname(cached)} and could not "
                         f"be downloaded from {url} ({e}). Put the file there, or pass {flag} FILE{offline_hint}.")
    return cached


# ----------------------------------------------------------------------------------------------
# Device

def pick_device(name=None):
    """--device NAME checked against this machine, else the first available of cuda, mps, cpu."""
    if name:
        kind, _, index = str(name).partition(":")
        if kind not in ("cuda", "mps", "cpu") or (index and (kind != "cuda" or not index.isdigit())):
            raise UsageError(f"--device {name} is not available here: expected cuda, cuda:N, mps or cpu.")
        if kind == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {name}, but this machine has no CUDA device; use --device cpu.")
        if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
            raise UsageError(f"--device {name}, but this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0.")
        if kind == "mps" and not torch.backends.mps.is_available():
            raise UsageError("--device mps, but MPS is not available here; use --device cpu.")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def hardware(device):
    """The device in words: the GPU's name, or the CPU's model and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    threads = torch.get_num_threads()
    return f"{name}, {threads} thread{'s' * (threads != 1)}" if device.type == "cpu" else f"{name} ({device.type})"


def sigterm_as_interrupt():
    """A scheduler's SIGTERM (a job's time limit, preemption, `timeout`) then raises KeyboardInterrupt, as Ctrl-C
    does, so one handler saves the work of both. Only the main thread can set it."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def prefetched(make, steps, depth=4, pin=False):
    """make(step) for each step of `steps`, made by a background thread up to `depth` steps ahead (in pinned memory
    when pin, so the copy to a GPU overlaps its work); the consumer only takes a finished item. An error in make()
    is raised at that step, in the consumer. Close the generator (or let it end) to stop the thread: it is waited
    for, as a thread still inside torch when the interpreter exits aborts the process."""
    ready = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry):  # put, unless the consumer has gone: True when it was put
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for step in steps:
                if not offer((tuple(t.pin_memory() for t in make(step)) if pin else make(step), None)):
                    return
        except Exception as e:  # raised in the consumer's thread, where it belongs
            offer((None, e))

    worker = threading.Thread(target=work, daemon=True, name="prefetch")
    worker.start()
    try:
        for _ in steps:
            item, error = ready.get()
            if error is not None:
                raise error
            yield item
    finally:
        stop.set()
        worker.join()


def compile_problem(device):
    """Why torch.compile cannot run here, or None: it needs Triton on CUDA and a C++ compiler on a CPU."""
    kind = torch.device(device).type
    if kind == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs Triton, which this install lacks (Jetson wheels often do)"
    if kind == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
        return "torch.compile on a CPU needs a C++ compiler (g++ or clang++), and none is on PATH"
    return None
