"""Redis metadata engine: ``redis://`` and ``rediss://`` (TLS), standalone or cluster
(Redis Cluster, AWS MemoryDB).

URL: ``redis[s]://[user][:password]@host[:port][/db][?options]``. Options: ``prefix=NAME``
(several volumes in one database; default ``v``), ``cluster=auto|true|false`` (default
auto: asks the server), ``ca=PATH`` (CA bundle), ``cert=PATH`` and ``key=PATH`` (client
certificate), ``tls_verify=false`` (trust any server certificate). A password missing from
the URL is taken from ``CHUNKFS_META_PASSWORD`` (or ``REDIS_PASSWORD``).

Key schema (every key shares the hash tag ``{prefix}``, so a volume lives in one cluster
slot and every multi-key update is atomic)::

    chunkfs{P}:format          string   VolumeFormat JSON
    chunkfs{P}:next_ino        integer  last inode number handed out (root is 1)
    chunkfs{P}:i:<ino>         hash     mode uid gid size atime mtime ctime nlink [rdev]
                                        [target: symlink bytes] [blocks: BlockList.pack()]
                                        [parent, pname: where a directory is named]
    chunkfs{P}:d:<ino>         hash     entry name -> child inode
    chunkfs{P}:x:<ino>         hash     extended attribute name -> value
    chunkfs{P}:refs            hash     block id -> (file, index) slots naming it
    chunkfs{P}:blen            hash     block id -> plain length
    chunkfs{P}:stats           hash     files dirs symlinks specials bytes refs ubytes
    chunkfs{P}:freed           hash     block id -> when (ns) its last reference went away
    chunkfs{P}:claims          hash     block id -> when (ns) a writer last claimed its upload
    chunkfs{P}:deleting        hash     block id -> when (ns) gc began deleting its object
    chunkfs{P}:sessions        hash     writable mount session -> last heartbeat (ns)
    chunkfs{P}:orphans         hash     inode unlinked while open (nlink 0) -> its session
    chunkfs{P}:parents         string   "1" once every directory has its link
    chunkfs{P}:snapshots       hash     snapshot root inode -> SnapshotRecord JSON
    chunkfs{P}:profiles        hash     directory inode -> its access profile

An inode of a snapshot has the field ``frozen`` (``"1"``); every script that changes an inode
or a directory's entries refuses a frozen one with EROFS.

Directory links (``parent``, ``pname``) let a rename check "not into its own subtree" by
walking up from the destination (bounded by its depth, as on SQLite) instead of searching
the subtree inside one script (blocking Redis for as long as the subtree is large). A link
is trusted only while its entry still names the directory; a missing or stale one (a
volume made, or a directory moved, by chunkfs before links) falls back to the subtree
search, so the check is right either way. Volumes made before links get them at their
first writable mount (``open_session``).

Every change is one Lua script (``redis_lua``). Reads are plain commands, pipelined.
Connection errors and timeouts are retried with exponential backoff by redis-py (a bounded
number of times: nothing waits forever); the error that remains is a one-line
``ChunkfsError``.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote

import redis
import redis.exceptions as rexc
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from chunkfs.blocklist import BlockList
from chunkfs.errors import ChunkfsError, FsError, NotFormatted, UsageError
from chunkfs.meta import redis_lua
from chunkfs.meta.base import (
    DELETE_MARK_TTL_NS,
    ROOT_INODE,
    Attr,
    MetaStore,
    SnapshotRecord,
    VolumeFormat,
    VolumeStats,
    as_block_list,
    check_name,
    check_profile,
    check_special,
    check_xattr,
    is_device,
)
from chunkfs.urls import mask_url, split_url

T = TypeVar("T")
_ATTR_FIELDS = ("mode", "uid", "gid", "size", "atime", "mtime", "ctime", "nlink", "rdev")
_OPTIONS = {"prefix", "cluster", "ca", "cert", "key", "tls_verify"}
PASSWORD_ENVS = ("CHUNKFS_META_PASSWORD", "REDIS_PASSWORD")


def connect(url: str, *, timeout: float = 5.0, retries: int = 8) -> tuple[redis.Redis | RedisCluster, str]:
    """A client for ``url`` (cluster detected or asked for) and the volume key prefix."""
    parts = split_url(url)
    params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(params) - _OPTIONS
    if unknown:
        raise UsageError(f"unknown Redis URL option(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(_OPTIONS))})")
    if not parts.hostname:
        raise UsageError(f"{mask_url(url)!r} needs a host, e.g. redis://host:6379/1")
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise UsageError(f"Redis database must be a number, not {db_text!r}")
    password = unquote(parts.password) if parts.password else next(
        (os.environ[e] for e in PASSWORD_ENVS if os.environ.get(e)), None)
    kwargs: dict[str, Any] = {
        "host": parts.hostname, "port": parts.port or 6379,
        "username": unquote(parts.username) if parts.username else None, "password": password,
        "socket_timeout": timeout, "socket_connect_timeout": timeout,
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), retries),
        "retry_on_error": [rexc.ConnectionError, rexc.TimeoutError],
    }
    if parts.scheme == "rediss":
        kwargs.update(ssl=True, ssl_ca_certs=params.get("ca"), ssl_certfile=params.get("cert"),
                      ssl_keyfile=params.get("key"),
                      ssl_cert_reqs="none" if params.get("tls_verify") == "false" else "required",
                      ssl_check_hostname=params.get("tls_verify") != "false" and not parts.hostname[0].isdigit())
    mode = params.get("cluster", "auto")
    if mode not in ("auto", "true", "false"):
        raise UsageError("Redis URL option cluster= takes auto, true or false")
    prefix = params.get("prefix", "v")
    if not prefix.replace("-", "").replace("_", "").isalnum():
        raise UsageError("Redis URL option prefix= takes letters, digits, '-' and '_'")
    key_prefix = f"chunkfs{{{prefix}}}:"
    where = mask_url(url)
    try:
        if mode == "auto":
            probe = redis.Redis(**kwargs, db=int(db_text))
            try:
                clustered = probe.info("cluster").get("cluster_enabled") == 1
            finally:
                probe.close()
        else:
            clustered = mode == "true"
        if clustered:
            if db_text != "0":
                raise UsageError(f"{where}: Redis Cluster has only database 0")
            kwargs.pop("retry_on_error")
            client: redis.Redis | RedisCluster = RedisCluster(**kwargs)
        else:
            client = redis.Redis(**kwargs, db=int(db_text))
        client.ping()
    except rexc.AuthenticationError:
        raise ChunkfsError(f"authentication to {where} failed: wrong user or password") from None
    except rexc.ResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc) or "NOPERM" in str(exc):
            raise ChunkfsError(f"authentication to {where} failed: {str(exc).split(',')[0]}") from None
        raise ChunkfsError(f"{where}: {exc}") from None
    except (rexc.ConnectionError, rexc.TimeoutError, rexc.RedisClusterException, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ChunkfsError(f"cannot connect to {where}: {reason}") from None
    return client, key_prefix


def _errno_of(exc: rexc.ResponseError) -> FsError | None:
    name, _, detail = str(exc).partition(" ")
    code = getattr(errno, name, None) if name.isupper() and name.startswith("E") else None
    return FsError(code, detail) if code else None


def _bytes(value: bytes | str) -> bytes:
    """A reply as bytes (the client never decodes replies: ``decode_responses`` is off)."""
    return value if isinstance(value, bytes) else value.encode()


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisMeta(MetaStore):
    def __init__(self, url: str, *, create: bool = False) -> None:
        self.url = mask_url(url)
        self.client, self.prefix = connect(url)
        self._format_key = self.prefix + "format"
        self._scripts = {name: self.client.register_script(getattr(redis_lua, name))
                         for name in ("MKDIR", "SYMLINK", "PUBLISH", "UNLINK", "SET_ATTRS", "FORMAT", "READDIR",
                                      "CREATE", "COMMIT", "RMDIR", "RENAME", "EXCHANGE", "LINK", "XATTR",
                                      "FORGET_FREED", "CLAIM_UPLOAD", "BEGIN_DELETE", "MKNOD", "RELEASE_ORPHAN",
                                      "CLOSE_SESSION", "LINK_PARENTS", "SNAPSHOT", "FREEZE_TREE",
                                      "DELETE_SNAPSHOT", "SET_PROFILE")}
        if not create and self._call(self.client.get, self._format_key) is None:
            raise NotFormatted(f"no chunkfs volume at {self.url} (run 'chunkfs format')")

    # -- plumbing --------------------------------------------------------------------------
    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except rexc.ResponseError as exc:
            fs_error = _errno_of(exc)
            if fs_error is not None:
                raise fs_error from None
            raise ChunkfsError(f"{self.url}: {exc}") from None
        except (rexc.ConnectionError, rexc.TimeoutError, rexc.RedisClusterException) as exc:
            raise ChunkfsError(f"metadata engine {self.url} unavailable: {str(exc).splitlines()[0]}") from None

    def _run(self, script: str, *args: Any) -> Any:
        return self._call(lambda: self._scripts[script](keys=[self._format_key], args=[self.prefix, *args]))

    def _ikey(self, ino: int) -> str:
        return f"{self.prefix}i:{ino}"

    def _dkey(self, ino: int) -> str:
        return f"{self.prefix}d:{ino}"

    @staticmethod
    def _attr(ino: int, values: Sequence[bytes | str | None]) -> Attr:
        if values[0] is None:
            raise FsError(errno.ENOENT, f"inode {ino}")
        return Attr(ino, *(0 if v is None else int(v) for v in values))  # rdev is missing on old inodes

    # -- volume ----------------------------------------------------------------------------
    def load_format(self) -> VolumeFormat | None:
        raw = self._call(self.client.get, self._format_key)
        return VolumeFormat.from_json(raw) if raw else None

    def save_format(self, fmt: VolumeFormat) -> None:
        self._run("FORMAT", fmt.to_json(), os.getuid(), os.getgid(), time.time_ns())
        self._block_size = fmt.block_size

    def is_empty(self) -> bool:
        return self._call(self.client.hlen, self._dkey(ROOT_INODE)) == 0

    def stats(self) -> VolumeStats:
        raw = self._call(self.client.hgetall, self.prefix + "stats")
        get = {_str(k): int(v) for k, v in raw.items()}.get
        unique = self._call(self.client.hlen, self.prefix + "refs")
        return VolumeStats(files=get("files", 0), directories=get("dirs", 0), symlinks=get("symlinks", 0),
                           logical_bytes=get("bytes", 0), block_refs=get("refs", 0), unique_blocks=unique,
                           unique_bytes=get("ubytes", 0), specials=get("specials", 0))

    # -- reads -----------------------------------------------------------------------------
    def getattr(self, ino: int) -> Attr:
        return self._attr(ino, self._call(self.client.hmget, self._ikey(ino), _ATTR_FIELDS))

    def lookup(self, parent: int, name: bytes) -> Attr:
        child = self._call(self.client.hget, self._dkey(parent), name)
        if child is None:
            parent_attr = self.getattr(parent)
            if not parent_attr.is_dir:
                raise FsError(errno.ENOTDIR, f"inode {parent}")
            raise FsError(errno.ENOENT, f"{name!r} in inode {parent}")
        return self.getattr(int(child))

    def readdir(self, ino: int) -> list[tuple[bytes, Attr]]:
        flat = self._run("READDIR", ino)  # one round trip for the whole directory
        width = 2 + len(_ATTR_FIELDS)
        out = [(bytes(flat[i]), Attr(*(int(v) for v in flat[i + 1 : i + width])))  # rdev sent as 0 when missing
               for i in range(0, len(flat), width)]
        out.sort(key=lambda entry: entry[0])
        return out

    def readlink(self, ino: int) -> bytes:
        mode, target = self._call(self.client.hmget, self._ikey(ino), ["mode", "target"])
        if mode is None:
            raise FsError(errno.ENOENT, f"inode {ino}")
        if target is None:
            raise FsError(errno.EINVAL, f"inode {ino} is not a symlink")
        return _bytes(target)

    def read_blocks(self, ino: int) -> BlockList:
        mode, blob = self._call(self.client.hmget, self._ikey(ino), ["mode", "blocks"])
        if mode is None:
            raise FsError(errno.ENOENT, f"inode {ino}")
        return BlockList.unpack(None if blob is None else _bytes(blob))

    def claim_upload(self, bid: bytes, now_ns: int) -> str:
        return self._run("CLAIM_UPLOAD", bid, now_ns, DELETE_MARK_TTL_NS).decode()

    def begin_delete(self, bid: bytes, intents_since_ns: int, now_ns: int) -> bool:
        return bool(self._run("BEGIN_DELETE", bid, intents_since_ns, now_ns, DELETE_MARK_TTL_NS))

    def end_delete(self, bid: bytes) -> None:
        self._call(self.client.hdel, self.prefix + "deleting", bid)

    def referenced_blocks(self) -> set[bytes]:
        return {_bytes(k) for k in self._call(self.client.hkeys, self.prefix + "refs")}

    def freed_blocks(self, since_ns: int) -> set[bytes]:
        freed = self._call(self.client.hgetall, self.prefix + "freed")
        return {_bytes(k) for k, v in freed.items() if int(v) >= since_ns}

    def forget_freed(self, before_ns: int) -> None:
        self._run("FORGET_FREED", before_ns, DELETE_MARK_TTL_NS)

    # -- namespace changes -----------------------------------------------------------------
    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int, mtime_ns: int) -> Attr:
        check_name(name)
        ino = self._run("MKDIR", parent, name, 0o040000 | (mode & 0o7777), uid, gid, mtime_ns, time.time_ns())
        return self.getattr(int(ino))

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int, mtime_ns: int) -> Attr:
        check_name(name)
        ino = self._run("SYMLINK", parent, name, target, uid, gid, mtime_ns, time.time_ns())
        return self.getattr(int(ino))

    def publish_file(self, parent: int, name: bytes, *, mode: int, uid: int, gid: int, mtime_ns: int,
                     size: int, blocks: BlockList | list[bytes]) -> Attr:
        check_name(name)
        ino = self._run("PUBLISH", parent, name, 0o100000 | (mode & 0o7777), uid, gid, mtime_ns, size,
                        as_block_list(blocks).pack(), self.block_size, time.time_ns())
        return self.getattr(int(ino))

    def unlink(self, parent: int, name: bytes, *, sustain: int = 0, session: str = "") -> None:
        self._run("UNLINK", parent, name, time.time_ns(), self.block_size, sustain, session)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int, mtime_ns: int) -> Attr:
        check_name(name)
        check_special(mode)
        ino = self._run("MKNOD", parent, name, mode, rdev if is_device(mode) else 0, uid, gid, mtime_ns,
                        time.time_ns())
        return self.getattr(int(ino))

    # -- sessions and orphans --------------------------------------------------------------
    def open_session(self, session: str, now_ns: int) -> None:
        self._link_parents()
        self._call(self.client.hset, self.prefix + "sessions", session, now_ns)

    def _link_parents(self) -> None:
        """Give every directory its parent link, once per volume (made before them)."""
        if self._call(self.client.get, self.prefix + "parents") is not None:
            return
        todo = [ROOT_INODE]
        while todo:
            todo.extend(int(sub) for sub in self._run("LINK_PARENTS", todo.pop()))
        self._call(self.client.set, self.prefix + "parents", "1")

    def register_peer(self, address: str, expires_ns: int) -> None:
        self._call(self.client.zadd, self.prefix + "peers", {address: expires_ns})
        self._call(self.client.zremrangebyscore, self.prefix + "peers", "-inf", time.time_ns() - 1)

    def drop_peer(self, address: str) -> None:
        self._call(self.client.zrem, self.prefix + "peers", address)

    def live_peers(self, now_ns: int) -> list[str]:
        found = self._call(self.client.zrangebyscore, self.prefix + "peers", now_ns, "+inf")
        return sorted(_str(a) for a in found if isinstance(a, bytes | str))

    def sessions(self) -> dict[str, int]:
        raw = self._call(self.client.hgetall, self.prefix + "sessions")
        return {_str(k): int(v) for k, v in raw.items()}

    def orphans(self) -> dict[int, str]:
        raw = self._call(self.client.hgetall, self.prefix + "orphans")
        return {int(k): _str(v) for k, v in raw.items()}

    def release_orphan(self, ino: int) -> None:
        self._run("RELEASE_ORPHAN", ino, self.block_size, time.time_ns())

    def close_session(self, session: str) -> None:
        self._run("CLOSE_SESSION", session, self.block_size, time.time_ns())

    def set_attrs(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                  gid: int | None = None, mtime_ns: int | None = None, atime_ns: int | None = None) -> Attr:
        def opt(v: int | None) -> int | str:
            return "" if v is None else v

        self._run("SET_ATTRS", ino, opt(None if mode is None else mode & 0o7777), opt(uid), opt(gid),
                  opt(mtime_ns), time.time_ns(), opt(atime_ns))
        return self.getattr(ino)

    # -- writable mounts ---------------------------------------------------------------------
    def create_file(self, parent: int, name: bytes, mode: int, uid: int, gid: int, mtime_ns: int) -> Attr:
        check_name(name)
        ino = self._run("CREATE", parent, name, 0o100000 | (mode & 0o7777), uid, gid, mtime_ns, time.time_ns())
        return self.getattr(int(ino))

    def commit_file(self, ino: int, *, size: int, blocks: BlockList, mtime_ns: int,
                    ctime_ns: int | None = None) -> Attr:
        self._run("COMMIT", ino, size, as_block_list(blocks).pack(), mtime_ns, self.block_size,
                  time.time_ns() if ctime_ns is None else ctime_ns)
        return self.getattr(ino)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._run("RMDIR", parent, name, time.time_ns())

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, *, noreplace: bool = False,
               sustain: int = 0, session: str = "") -> None:
        check_name(new_name)
        self._run("RENAME", parent, name, new_parent, new_name, int(noreplace), self.block_size, time.time_ns(),
                  sustain, session)

    def exchange(self, parent: int, name: bytes, other_parent: int, other_name: bytes) -> None:
        self._run("EXCHANGE", parent, name, other_parent, other_name, time.time_ns())

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        check_name(new_name)
        self._run("LINK", ino, new_parent, new_name, time.time_ns())
        return self.getattr(ino)

    def _xkey(self, ino: int) -> str:
        return f"{self.prefix}x:{ino}"

    def get_xattr(self, ino: int, name: bytes) -> bytes:
        exists, value = self._call(self._pipeline_exists_hget, ino, name)
        if not exists:
            raise FsError(errno.ENOENT, f"inode {ino}")
        if value is None:
            raise FsError(errno.ENODATA, repr(name))
        return bytes(value)

    def _pipeline_exists_hget(self, ino: int, name: bytes) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(self._ikey(ino))
        pipe.hget(self._xkey(ino), name)
        return pipe.execute()

    def list_xattrs(self, ino: int) -> list[bytes]:
        self.getattr(ino)
        return sorted(_bytes(k) for k in self._call(self.client.hkeys, self._xkey(ino)))

    def set_xattr(self, ino: int, name: bytes, value: bytes, *, create: bool = False, replace: bool = False) -> None:
        check_xattr(name, value)
        self._run("XATTR", ino, name, value, "create" if create else "replace" if replace else "", time.time_ns())

    def remove_xattr(self, ino: int, name: bytes) -> None:
        self._run("XATTR", ino, name, b"", "remove", time.time_ns())

    # -- snapshots ----------------------------------------------------------------------------
    def snapshot(self, src: int, parent: int, name: bytes, *, source: str, created_ns: int) -> Attr:
        check_name(name)
        self._link_parents()  # a snapshot's path is found by its directories' links
        record = SnapshotRecord(0, source, created_ns)
        root = self._run("SNAPSHOT", src, parent, name, time.time_ns(), self.block_size, record.to_json())
        return self.getattr(int(root))

    def freeze_tree(self, root: int, *, source: str, created_ns: int) -> None:
        self._run("FREEZE_TREE", root, SnapshotRecord(root, source, created_ns).to_json())

    def delete_snapshot(self, root: int) -> None:
        self._run("DELETE_SNAPSHOT", root, self.block_size, time.time_ns())

    def snapshots(self) -> list[SnapshotRecord]:
        raw = self._call(self.client.hgetall, self.prefix + "snapshots")
        return sorted((SnapshotRecord.from_json(int(k), v) for k, v in raw.items()), key=lambda r: r.ino)

    def is_frozen(self, ino: int) -> bool:
        return bool(self._call(self.client.hexists, self._ikey(ino), "frozen"))

    def get_profile(self, ino: int) -> bytes | None:
        data = self._call(self.client.hget, self.prefix + "profiles", str(ino))
        return None if data is None else _bytes(data)

    def set_profile(self, ino: int, data: bytes | None, *, replace: bool = True) -> bool:
        check_profile(data)
        return bool(self._run("SET_PROFILE", ino, data or b"", int(replace), int(data is None)))

    def dir_path(self, ino: int) -> str | None:
        """Walks up the directories' links (a snapshot's root and every directory made or moved
        since links exist has one); None when a link is missing or stale."""
        names: list[str] = []
        while ino != ROOT_INODE:
            parent, pname = self._call(self.client.hmget, self._ikey(ino), ["parent", "pname"])
            if parent is None or pname is None or len(names) > 4096:
                return None
            if self._call(self.client.hget, self._dkey(int(parent)), pname) not in (str(ino).encode(), str(ino)):
                return None
            names.append(os.fsdecode(_bytes(pname)))
            ino = int(parent)
        return "/" + "/".join(reversed(names))

    def close(self) -> None:
        self.client.close()


def open_url(url: str, create: bool) -> RedisMeta:
    return RedisMeta(url, create=create)
