"""Every command-line option shared between commands, defined once.

Layer: ``cli/``, imported by the parser (``main.py``) and by the command modules; it imports
no command module, so the CLI has no import cycle.

An ``Option`` carries its flag, type, default and help. From the same objects come the
parser's arguments (``add_options``), the configuration a command builds, the command line
of a background mount daemon (``MOUNT_OPTIONS``, ``to_argv``) and the ``chunkfs mount``
command the CSI plugin runs per volume (``CSI_MOUNT_OPTIONS``): an option added here reaches
all of them, and ``tests/test_cli.py`` fails for any that does not survive the round trip.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from chunkfs.cache.block_cache import DEFAULT_CACHE_SIZE, VERIFY_CACHE_MODES
from chunkfs.errors import ChunkfsError, UsageError
from chunkfs.read.reader import DEFAULT_PREFETCH_PATTERNS
from chunkfs.store.base import StoreOptions
from chunkfs.units import parse_size
from chunkfs.vfs.profiles import PROFILE_MODES


def default_cache_dir() -> str:
    if os.geteuid() == 0:
        return "/var/cache/chunkfs"
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "chunkfs")


# -- value types (argparse ``type=``: a bad value is a one-line usage error) -------------------
def size(text: str) -> int:
    try:
        return parse_size(text)
    except ChunkfsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _checked(text: str, convert: Callable[[str], Any], expected: str, valid: Callable[[Any], bool],
             out_of_range: str) -> Any:
    """``convert(text)``, or a usage error: ``expected`` (what a good value looks like) when it
    does not convert, ``out_of_range`` (formatted with ``text`` and ``value``) when not ``valid``."""
    try:
        value = convert(text)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(out_of_range.format(text=text, value=value))
    return value


def positive_int(text: str) -> int:
    return int(_checked(text, int, "a whole number", lambda v: v >= 1, "expected a number of at least 1, got {value}"))


def _seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    return float(number) * units[unit]


def duration(text: str) -> float:
    return float(_checked(text, _seconds, "a duration like 90s, 30m, 1h or 2d", lambda v: v >= 0,
                          "a duration cannot be negative: {text}"))


def ratio(text: str) -> float:
    return float(_checked(text, float, "a number between 0 and 1", lambda v: 0 <= v < 1,
                          "expected a number from 0 up to (not including) 1, got {text}"))


@dataclass(frozen=True)
class Option:
    flag: str  # "--cache-size"
    help: str
    type: Callable[[str], Any] | None = None
    default: Any = None
    flag_only: bool = False  # present or not (store_true)
    repeated: bool = False  # may be given several times (append)
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    short: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser, *, default: Any = ..., help: str | None = None) -> None:
        """Add this option to ``parser`` (``default``/``help``: another command's own)."""
        names = [self.flag, *([self.short] if self.short else [])]
        text = help or self.help
        if self.flag_only:
            parser.add_argument(*names, action="store_true", help=text)
            return
        kwargs: dict[str, Any] = {"default": self.default if default is ... else default, "help": text}
        given = (("type", self.type), ("choices", self.choices), ("metavar", self.metavar))
        kwargs.update({key: value for key, value in given if value is not None})
        parser.add_argument(*names, action="append" if self.repeated else "store", **kwargs)

    def argv(self, value: Any) -> list[str]:
        """This option with ``value`` (as parsed) on a command line that parses back to it."""
        if self.flag_only:
            return [self.flag] if value else []
        if value is None:
            return []
        if self.repeated:
            return [part for item in value for part in (self.flag, str(item))]
        return [self.flag, str(value)]


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    for option in options:
        option.add_to(parser)


def to_argv(args: argparse.Namespace, options: Iterable[Option]) -> list[str]:
    """The command-line form of ``args``' values of ``options``."""
    return [part for option in options for part in option.argv(getattr(args, option.dest))]


# -- the options ---------------------------------------------------------------------------------
IO_RETRIES = Option("--io-retries", "tries per object-store request for temporary failures (default 5)",
                    positive_int, 5)
IO_TIMEOUT = Option("--io-timeout", "seconds per object-store request (default 30)", float, 30.0)
STORE_OPTIONS = (IO_RETRIES, IO_TIMEOUT)

CACHE_DIR = Option("--cache-dir", "block cache directory; repeat it or join with ':' for several disks "
                   f"(default {default_cache_dir()})", repeated=True, metavar="DIR")
CACHE_SIZE = Option("--cache-size", "most bytes the cache may hold; least recently used blocks are evicted "
                    f"(default {DEFAULT_CACHE_SIZE >> 30}G)", size, DEFAULT_CACHE_SIZE)
FREE_SPACE_RATIO = Option("--free-space-ratio", "keep at least this fraction of each cache disk free (default 0.1)",
                          ratio, 0.1)
VERIFY_CACHE = Option("--verify-cache", "cache entries written by another process (a warmup, an earlier mount): "
                      "'seal' serves those unchanged since chunkfs sealed them, 'full' hashes each one whole first "
                      "(default seal)", choices=VERIFY_CACHE_MODES, default="seal")
CACHE_OPTIONS = (CACHE_DIR, CACHE_SIZE, FREE_SPACE_RATIO, VERIFY_CACHE)

#: what a mount daemon runs with: every one is handed on to a background daemon, and the
#: tuning ones (all but --read-only and --cache-writes) to the CSI plugin's mounts
MOUNT_TUNING = (
    Option("--max-downloads", "concurrent block downloads (default 32)", positive_int, 32),
    Option("--buffer-size", "memory for blocks being downloaded; limits --max-downloads. Blocks just downloaded, "
           "or read in from the node cache ahead of a reader, stay in memory for their readers, in up to half as "
           "much again, and at least one block (default 128M)", size, 128 << 20),
    Option("--max-readahead", "how far a sequential reader is read ahead, at most (default 512M)", size, 512 << 20),
    Option("--prefetch", "comma-separated file-name patterns fetched whole, in parallel, when opened; 'none' turns "
           "it off (default: %(default)s)", default=",".join(DEFAULT_PREFETCH_PATTERNS), metavar="PATTERNS"),
    Option("--access-profile", "access profiles of model directories: 'auto' prefetches a directory in the order "
           "its profile recorded and records one for a directory without, 'use' only prefetches, 'record' records "
           "anew (replacing), 'off' (default auto)", choices=PROFILE_MODES, default="auto"),
    Option("--kernel-readahead", "the kernel's readahead for this mount, 0 to keep the kernel default "
           "(default 16M)", size, 16 << 20),
    Option("--fuse-transport", "'native': chunkfs speaks /dev/fuse itself and passes opens of model files through "
           "to node-local file images, filled whole before a cold open returns (FUSE passthrough; read-only mounts, "
           "as root); 'libfuse': "
           "pyfuse3 and libfuse serve every read; 'auto' (default): native where it can be, else libfuse",
           choices=("auto", "native", "libfuse"), default="auto"),
    Option("--attr-timeout", "kernel attribute cache seconds (default 300 read-only, 1 read-write)", float),
    Option("--entry-timeout", "kernel entry cache seconds (default 300 read-only, 1 read-write)", float),
)
READ_ONLY = Option("--read-only", "refuse every write with EROFS (what pods use); without it the mount is "
                   "read-write", flag_only=True)
CACHE_WRITES = Option("--cache-writes", "read-write mounts: also keep written blocks in the node cache (for "
                      "reading them back here)", flag_only=True)
METRICS = Option("--metrics", "serve Prometheus metrics at http://HOST:PORT/metrics, e.g. 127.0.0.1:9567",
                 metavar="HOST:PORT")

def address(text: str) -> str:
    _host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, e.g. 0.0.0.0:9570, got {text!r}")
    return text


#: fetching blocks from other nodes' caches (``chunkfs.peer``), for mounts and warmups
PEER_CLIENT_OPTIONS = (
    Option("--peers", "where the peers are: 'meta' (nodes serving this volume register in its metadata; the "
           "default with --peer-listen), 'dns:NAME:PORT' (e.g. a headless Service) or HOST:PORT,HOST:PORT,...",
           metavar="SPEC"),
    Option("--peer-secret-file", "file holding the fleet's shared peer secret (default: the "
           "CHUNKFS_PEER_SECRET environment variable); never on a command line", metavar="FILE"),
    Option("--peer-ca", "CA bundle to verify peers' TLS certificates; peers are then asked over https",
           metavar="FILE"),
    Option("--peer-timeout", "seconds a peer may stay silent before the store is asked (an owner loading the "
           "block says so every 2 s), and may take for a block beyond its length at 8 MiB/s (default 10)",
           float, 10.0),
)
#: serving this node's cache to the others (mounts, and warmups without a mount)
PEER_SERVER_OPTIONS = (
    Option("--peer-listen", "serve this node's cached blocks to peers on HOST:PORT, e.g. 0.0.0.0:9570",
           address, metavar="HOST:PORT"),
    Option("--peer-advertise", "the address peers reach this node at (default: the --peer-listen host if it "
           "is one, else $POD_IP, else this node's address)", address, metavar="HOST:PORT"),
    Option("--peer-max-uploads", "blocks sent to peers at a time; more requests are told to use the store "
           "(default 8)", positive_int, 8),
    Option("--peer-max-rate", "bytes per second sent to peers, at most (default 0: no cap), e.g. 500M", size, 0),
    Option("--peer-tls-cert", "serve peers over TLS with this certificate (PEM)", metavar="FILE"),
    Option("--peer-tls-key", "the private key of --peer-tls-cert (PEM)", metavar="FILE"),
)
PEER_OPTIONS = (*PEER_SERVER_OPTIONS, *PEER_CLIENT_OPTIONS)

MOUNT_OPTIONS = (READ_ONLY, *CACHE_OPTIONS, *MOUNT_TUNING, CACHE_WRITES, METRICS, *STORE_OPTIONS, *PEER_OPTIONS)
#: mount options the CSI plugin takes and hands to the mount of every volume it stages
CSI_MOUNT_OPTIONS = (*CACHE_OPTIONS, *MOUNT_TUNING, *STORE_OPTIONS)


def store_options(args: argparse.Namespace, concurrency: int) -> StoreOptions:
    if args.io_timeout <= 0:
        raise UsageError("--io-timeout must be positive")
    return StoreOptions(concurrency=concurrency, timeout=args.io_timeout, attempts=args.io_retries)


def cache_dirs(values: Sequence[str] | None, default: str | None = None) -> list[str]:
    """``--cache-dir`` values (repeated and/or ':'-joined) as absolute paths, duplicates removed."""
    dirs: list[str] = []
    for value in values or [default or default_cache_dir()]:
        for part in value.split(":"):
            if part and os.path.abspath(part) not in dirs:
                dirs.append(os.path.abspath(part))
    if not dirs:
        raise UsageError("--cache-dir needs a directory")
    return dirs
