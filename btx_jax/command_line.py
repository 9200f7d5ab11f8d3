"""The command lines' one error path (every `btx` command, btx_jax/cli/, and the scripts): library errors, usage
errors and flag typos become one stderr line and exit code 2; signals become clean exits.

    run_cli(fn)                      user errors (bad config, checkpoint, data, disk faults) -> `error: ...`, 2
    ArgumentParser(prog="btx generate")       argparse: usage errors -> `error: btx generate: ...`, 2
    parse_flags(argv, flag_values, doc)       absl / ml_collections flags (--config=expert:wiki, --config.a.b=1):
                                              --help -> doc + the flags, 0; typos and bad values -> one line, 2
    p.add_argument("--device-memory", type=size_flag)     # '80GB', '141GiB' -> bytes; bad sizes -> one line, 2
    with stopping_cleanly(dst):      # SIGTERM / SIGINT: `finally` blocks run (temporaries removed), one line, 143 / 130
    with deferred_stops() as stop:   # a loop inside it polls stop.signum instead (the trainer)
"""
from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import threading
from typing import Callable, Iterator

from btx_jax import disk
from btx_jax.config import ConfigError
from btx_jax.errors import UserError

USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors as one stderr line (`error: <prog>: ...`, as `fail`) and exit 2."""

    def error(self, message):
        fail(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    """argparse `type=` for counts and sizes (>= 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def fail(message: str) -> None:
    """Print `error: <message>` as one line on stderr and exit 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def run_cli(fn: Callable[[], object]) -> object:
    """Run `fn`; on a user error or a disk fault print `error: <message>` (one line) to stderr and exit 2."""
    try:
        return fn()
    except USER_ERRORS as e:
        fail(str(e))
    except KeyboardInterrupt:          # Ctrl-C outside a training loop (which saves and exits 130 itself)
        print("interrupted: the work in progress was not finished (earlier checkpoints and outputs are kept)",
              file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        fault = disk.fault_of(e)
        if fault is None:
            raise
        fail(disk.message(fault[1] or "(output)", fault[0]))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A stop signal raised where the main thread is, so that every `finally` on the way out runs.  `kept`:
    what interrupted store builds left finished (btx_jax/data/store.py adds to it); `reported`: the code that
    stopped already said what it saved (the training loop), so nothing more is printed."""

    def __init__(self, signum: int, reported: bool = False):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.kept, self.reported = signum, [], reported


class StopRequest:
    """A stop signal received inside `deferred_stops()`: `signum` (None until one arrives)."""
    signum: int | None = None


_DEFERRED: list[StopRequest] = []      # innermost last: the loops that poll for a stop instead of being raised in


@contextlib.contextmanager
def deferred_stops() -> Iterator[StopRequest]:
    """Within the block a stop signal that `stopping_cleanly` catches is recorded in the yielded request
    instead of raised: the code polls `request.signum` and stops at a safe point (the training loop: after the
    step in flight, with a checkpoint), raising `Stopped(signum, reported=True)`.  Installs nothing: outside
    `stopping_cleanly` the request never fills and signals act as usual."""
    request = StopRequest()
    _DEFERRED.append(request)
    try:
        yield request
    finally:
        _DEFERRED.remove(request)


def build_line(e: Stopped) -> str:
    """The line of a stop during data store builds: which shards were kept (a rerun resumes after them)."""
    kept = f"kept {'; '.join(e.kept)}" if e.kept else "no store shard was finished"
    return f"interrupted by {e} during the data store build: {kept}; rerun the same command to resume"


@contextlib.contextmanager
def stopping_cleanly(dst=None, line: Callable[[Stopped], str] | None = None) -> Iterator[None]:
    """Opt-in, for entry points: within the block SIGTERM and SIGINT raise `Stopped` in the main thread (a
    second signal acts as usual), or are recorded for a `deferred_stops()` block; it ends in one stderr line
    and exit 128 + the signal (143, 130).  The line: `line(stopped)` when given; else the store build's
    (`build_line`) when a build was interrupted, nothing when the code that stopped reported it, else that
    `dst` was not written.  Writers clean up in `finally` (btx_jax/checkpoint/tensor_files.py
    `atomic_directory` removes its temporary directory).  Only the main thread can set signal handlers:
    elsewhere the block runs without them."""
    if threading.current_thread() is not threading.main_thread():     # signals reach the main thread only
        yield
        return
    previous = {}

    def stop(signum, frame):
        if _DEFERRED:
            _DEFERRED[-1].signum = _DEFERRED[-1].signum or signum
            return
        for s, handler in previous.items():
            signal.signal(s, handler)
        raise Stopped(signum)

    previous.update({s: signal.signal(s, stop) for s in STOP_SIGNALS})
    try:
        yield
    except Stopped as e:
        text = (line(e) if line is not None else build_line(e) if e.kept else None if e.reported else
                f"interrupted by {e}: {dst} was not written (no partial output is left; earlier outputs are kept)")
        if text:
            print(text, file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _flag_error(e: Exception, argv: list[str]) -> str:
    """One line for an absl / ml_collections flag-parsing error."""
    text = str(e).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":      # KeyError's repr of its message
        text = text[1:-1]
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text.replace("\\", ""))
    if suggestion:                                     # ml_collections: an unknown --config.a.b key
        good, bad = suggestion.groups()
        flag = next((a.split("=")[0] for a in argv if re.search(rf"\.{re.escape(bad)}(\.|=|$)", a)), bad)
        key = flag.lstrip("-").split(".", 1)[-1]
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        return f"{flag}: unknown config key {key!r} (did you mean {parent}{good}?)"
    if isinstance(e, (AttributeError, KeyError)):
        missing = re.findall(r"'([^'\\]+)'", text)
        flag = next((a.split("=")[0] for a in argv if missing and f".{missing[-1]}" in a), "--config")
        return f"{flag}: unknown config key {missing[-1] if missing else text!r}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Failed loading config file" in text:                    # missing / unreadable config file
        return f"--config: cannot load the config file: {lines[-1]}"
    if "Error whilst parsing config file" in text and lines:    # the config file's own error is the last line
        head = lines[0].split(": Error whilst")[0]
        return f"{head}: {lines[-1]}"
    return " ".join(lines)


def resolve_config_flag(argv: list[str]) -> list[str]:
    """argv with each `--config` value (`--config=X`, `--config X`) resolved by btx_jax.configs.resolve: a
    packaged config by name (`expert:wiki`, `configs/expert.py:wiki`) becomes its file's path."""
    from btx_jax.configs import resolve
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = "--config=" + resolve(a[len("--config="):])
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
    return out


def parse_flags(argv: list[str], flag_values=None, doc: str = "") -> list[str]:
    """Parse absl flags (`argv[0]` the program; config files by name or path and overrides included) into
    `flag_values` (absl's global FLAGS by default): `-h` / `--help` prints `doc` and the flags, exit 0; any error
    is one line on stderr and exit 2.  Returns the arguments left over (argv[0] first)."""
    from absl import flags
    fv = flags.FLAGS if flag_values is None else flag_values
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        flag_help = fv.get_help(include_special_flags=False)
        print(f"usage: {argv[0]} [--flag=value ...]\n\n{doc.strip()}\n\nflags:\n{flag_help}")
        raise SystemExit(0)
    argv = resolve_config_flag(argv)
    try:
        rest = fv(argv)
        for value in fv.flag_values_dict().values():
            hasattr(value, "to_dict")        # a config flag whose file failed to load raises here, not above
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        fail(_flag_error(e, argv))
    if len(rest) > 1:
        fail(f"{argv[0]}: unexpected argument {rest[1]!r} (flags are --name=value)")
    return rest


def parse_bytes(text: str) -> int:
    """Bytes of a size flag: '5GB' or '5G' (10^9, Hugging Face's convention), '141GiB' or '141Gi' (2^30), '1000';
    ConfigError (one line) otherwise."""
    units = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    unit = unit[:-1] if len(unit) > 1 and unit.endswith("b") else unit
    if not m or unit not in units or float(m.group(1)) <= 0:
        raise ConfigError(f"{text!r} is not a size (examples: 5GB, 500MB, 2GiB, 1000000)")
    return max(1, int(float(m.group(1)) * units[unit]))


def size_flag(text: str) -> int:
    """argparse `type=` for byte sizes (parse_bytes): a bad size is a usage error (one line, exit 2)."""
    try:
        return parse_bytes(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
