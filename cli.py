"""What every script shares on the command line: one config dataclass whose fields are the flags,
and one way to report a problem the user can fix.

    @dataclass
    class Config:
        data_dir: str = arg("data/qqp", "folder written by preprocess.py")
        batch_size: int = arg(128, "pairs per batch", aliases=["--bs"])
    cfg = parse_config(Config, argv, __doc__)

Flags are named like the fields (transformers' HfArgumentParser): `--help` shows each field's
help and default, Literal fields take only their choices, booleans switch on with `--flag` and off
with `--flag false` (or `--no_flag` when the default is on), unknown flags are errors.
"""
import argparse
import contextlib
import errno
import os
import signal
import sys
from dataclasses import MISSING, field, fields


class UserError(Exception):
    """A problem the user can fix: bad input, a bad flag, a missing or damaged file. Scripts print
    it as one line, `error: <problem>. Fix: <fix>`, and exit with code 2. Anything else is a bug
    and keeps its traceback."""

    def __init__(self, problem, fix):
        super().__init__(f"{problem}. Fix: {fix}")


def missing_packages(names):
    """Those of these importable names that are not installed."""
    import importlib.util
    return [name for name in names if importlib.util.find_spec(name) is None]


PIP_NAMES = {"faiss": "faiss-cpu"}  # where what pip installs is named other than what Python imports


def require_packages(names, what, other_way=""):
    """A one-line error, before any work, when `what` needs packages (import names) that are not
    installed."""
    missing = missing_packages(names)
    if missing:
        pip = " ".join(PIP_NAMES.get(name, name) for name in missing)
        raise UserError(f"{what}: {' and '.join(missing)} not installed",
                        f"pip install {pip}{', or ' + other_way if other_way else ''}")


def arg(default=MISSING, help="", **kwargs):
    """A config field: its default, its help text for --help, and argparse extras (aliases=...)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring as written, and each flag's default after its help."""


def parse_config(config_cls, argv=None, doc=None, positional=(), optional=()):
    """argv -> config_cls instance. Fields named in `positional` may also be given without their
    flag, in that order (`evaluate.py out/ckpt.pt` = `evaluate.py --checkpoint out/ckpt.pt`); they
    are required unless also named in `optional`."""
    from transformers import HfArgumentParser
    parser = HfArgumentParser(config_cls, description=doc, formatter_class=_HelpFormatter)
    helps = {f.name: f.metadata.get("help", "") for f in fields(config_cls)}
    for name in positional:
        parser.add_argument(f"{name}_", nargs="?", metavar=name, help=f"{helps[name]} (or --{name})")
    args = vars(parser.parse_args(argv))
    for name in positional:
        value = args.pop(f"{name}_")
        if value is not None:
            args[name] = value
        if not args[name] and name not in optional:
            parser.error(f"the argument {name} is required")
    return config_cls(**args)


def given_flags(config_cls, argv=None, positional=()):
    """Names of the fields set on the command line (as opposed to left at their defaults)."""
    from transformers import HfArgumentParser
    unset = object()
    parser = HfArgumentParser(config_cls)
    parser.set_defaults(**{f.name: unset for f in fields(config_cls)})
    for name in positional:
        parser.add_argument(f"{name}_", nargs="?", default=unset)
    args = vars(parser.parse_args(argv))
    return {name.rstrip("_") for name, value in args.items() if value is not unset}


def interval(spec):
    """"[0, 1)" -> (test, words) for check_ranges: "[" and "]" include the end, "(" and ")" leave
    it out; "inf" has no end."""
    low, high = (float(x) for x in spec[1:-1].split(","))
    low_in, high_in = spec[0] == "[", spec[-1] == "]"

    def ok(v):
        return (low <= v if low_in else low < v) and (v <= high if high_in else v < high)
    if high < float("inf"):
        words = f"in {spec}"
    else:
        words = (f"at least {low:g}" if low else "0 or more") if low_in else f"more than {low:g}"
    return ok, words


MAX_WORKERS = 64  # DataLoader worker processes: a few keep a GPU busy; thousands would hang the machine
WORKERS_RANGE = interval(f"[0, {MAX_WORKERS}]")  # --num_workers, every script


def check_ranges(cfg, ranges):
    """Every numeric flag in its range before any work: ranges {field: (test, words)}; NaN never
    passes. A one-line UserError naming the flag, its range and its default."""
    for name, (ok, words) in ranges.items():
        value = getattr(cfg, name)
        if value != value or not ok(value):
            raise UserError(f"--{name} {value}: out of range, must be {words}",
                            f"e.g. --{name} {getattr(type(cfg), name)}")


# A write that fails for a reason outside the program (full disk, read-only filesystem, quota,
# permissions) is the user's to fix, even after the work: one line, not a traceback.
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}


class Interrupted(BaseException):
    """SIGTERM or SIGINT during a run, raised where the run is, so that what it was writing is
    cleaned up on the way out (temp files, folder locks); args[0] is the signal."""


@contextlib.contextmanager
def stop_on_signals(signums=(signal.SIGINT, signal.SIGTERM)):
    """SIGTERM (whose default kills at once, leaving half-written temp files) and SIGINT raise
    Interrupted inside the block; later ones are ignored until the block is left, so that they
    cannot cut the clean-up short. Only where the signal has Python's default handling: one that
    is ignored (a job started with & ignores Ctrl-C) or handled by a host program stays so.
    (train.py's loop and serve.py's server put their own handlers in place while they run.)"""
    def stop(signum, frame):
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signal.Signals(signum))
    defaults = (signal.SIG_DFL, signal.default_int_handler)
    try:
        previous = {s: signal.signal(s, stop) for s in signums if signal.getsignal(s) in defaults}
    except ValueError:  # not the main thread (signals go to it only): nothing to install
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def is_program(fn):
    """Whether fn's file is the program Python was started with (python train.py, torchrun
    train.py), not a module some other code imported (a notebook, a test, python -c)."""
    code = getattr(fn, "__code__", None)
    return code is not None and os.path.realpath(sys.argv[0] or "") == os.path.realpath(code.co_filename)


def end_by_signal(sig, top_level):
    """Leave after a signal stopped the run and it cleaned up. The program the shell started ends
    by that signal, as a shell expects (a loop of commands stops at Ctrl-C; $? is 130 or 143); a
    script's main() called from other Python code raises SystemExit(128 + sig) instead, so that
    its caller (a notebook, a test) lives on."""
    sys.stdout.flush()  # what was printed to a file or pipe, before the process ends
    sys.stderr.flush()
    if top_level:
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(128 + sig)  # in-process, or the signal is blocked here


def run(fn, *args, again="run the same command again"):
    """Call a script's body; a UserError becomes one line on stderr and exit code 2, and so does
    an OSError of the disk or permissions kind (WRITE_ERRNOS), naming the path. Ctrl-C or SIGTERM
    stops it cleanly: temp files and locks go, one line naming `again` as the fix, then
    end_by_signal."""
    try:
        with stop_on_signals():
            return fn(*args)
    except Interrupted as e:
        # a second Ctrl-C must not cut the message short
        handlers = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        sig = e.args[0]
        print(f"error: stopped by {sig.name} before it finished (its temp files removed; what it had written "
              f"stays, maybe incomplete). Fix: {again}", file=sys.stderr)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        end_by_signal(sig, is_program(fn))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        where = e.filename or "an output"
        print(f"error: cannot write {where}: {e.strerror} (disk full? read-only? permissions?). Fix: free "
              "space or pass a writable output place, then run again", file=sys.stderr)
        sys.exit(2)
