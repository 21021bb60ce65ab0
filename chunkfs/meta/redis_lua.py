"""Lua scripts of the Redis engine: every namespace change is one script, so it is atomic
on a standalone server and in a cluster (all keys of a volume share one hash tag, so one
slot, so one node). ``KEYS[1]`` is the volume's format key (for cluster routing);
``ARGV[1]`` is the key prefix. Errors are returned as ``"<ERRNO-NAME> detail"``.
"""

PRELUDE = r"""
local P = ARGV[1]
local S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 61440, 16384, 32768, 40960
local function ikey(ino) return P .. 'i:' .. ino end
local function dkey(ino) return P .. 'd:' .. ino end
local function ftype(mode) return bit.band(tonumber(mode), S_IFMT) end
local function parent_dir(parent)
  local mode = redis.call('HGET', ikey(parent), 'mode')
  if not mode then return redis.error_reply('ENOENT parent ' .. parent) end
  if ftype(mode) ~= S_IFDIR then return redis.error_reply('ENOTDIR parent ' .. parent) end
  return nil
end
-- an EROFS error reply if any of the given inodes (nil ones skipped) belongs to a snapshot
local function refuse_frozen(...)
  for k = 1, select('#', ...) do
    local ino = select(k, ...)
    if ino and redis.call('HEXISTS', ikey(ino), 'frozen') == 1 then
      return redis.error_reply('EROFS inode ' .. ino .. ' is in a snapshot (read-only)')
    end
  end
  return nil
end
local function touch(ino, now, nlink_delta)
  redis.call('HSET', ikey(ino), 'mtime', now, 'ctime', now)
  if nlink_delta ~= 0 then redis.call('HINCRBY', ikey(ino), 'nlink', nlink_delta) end
end
-- calls fn(index, id) for every stored block of a BlockList.pack() blob (dense: 32-byte ids
-- in slot order; sparse: 'CKS1', slot count, then 8-byte index + 32-byte id per stored block)
local function each_block(blob, fn)
  if not blob or #blob == 0 then return 0 end
  if #blob % 32 == 0 then
    local n = #blob / 32
    for i = 0, n - 1 do fn(i, string.sub(blob, i * 32 + 1, i * 32 + 32)) end
    return n
  end
  local n = 0
  for pos = 13, #blob, 40 do
    local hi, lo = struct.unpack('>I4I4', string.sub(blob, pos, pos + 7))
    fn(hi * 4294967296 + lo, string.sub(blob, pos + 8, pos + 39))
    n = n + 1
  end
  return n
end
local function change_refs(blob, size, bs, delta, now)
  local n = each_block(blob, function(i, id)
    local r = redis.call('HINCRBY', P .. 'refs', id, delta)
    if delta > 0 and r == 1 then
      local len = math.min(bs, size - i * bs)
      redis.call('HSET', P .. 'blen', id, len)
      redis.call('HINCRBY', P .. 'stats', 'ubytes', len)
    elseif r <= 0 then
      local len = tonumber(redis.call('HGET', P .. 'blen', id) or '0')
      redis.call('HDEL', P .. 'refs', id)
      redis.call('HDEL', P .. 'blen', id)
      redis.call('HSET', P .. 'freed', id, now)  -- the client's clock, like claims and gc's cutoff
      redis.call('HINCRBY', P .. 'stats', 'ubytes', -len)
    end
  end)
  if n > 0 then redis.call('HINCRBY', P .. 'stats', 'refs', delta * n) end
end
local function count(mode, delta, size)
  local t = ftype(mode)
  local field = (t == S_IFDIR and 'dirs') or (t == S_IFLNK and 'symlinks') or (t == S_IFREG and 'files') or 'specials'
  redis.call('HINCRBY', P .. 'stats', field, delta)
  local bytes = delta * tonumber(size)
  -- (-1 * 0 is -0 in Lua, which Redis refuses as an integer)
  if t == S_IFREG and bytes ~= 0 then redis.call('HINCRBY', P .. 'stats', 'bytes', bytes) end
end
local function new_inode(mode, uid, gid, size, mtime, now, nlink)
  local ino = redis.call('INCR', P .. 'next_ino')
  redis.call('HSET', ikey(ino), 'mode', mode, 'uid', uid, 'gid', gid, 'size', size, 'atime', mtime,
             'mtime', mtime, 'ctime', now, 'nlink', nlink)
  count(mode, 1, size)
  return ino
end
-- a > b for two decimal timestamps (nanoseconds exceed a double's exact range: compare digits)
local function later(a, b)
  a, b = tostring(a or '0'), tostring(b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local function xkey(ino) return P .. 'x:' .. ino end
local function delete_inode(ino, mode, size)
  count(mode, -1, size)
  redis.call('DEL', ikey(ino), xkey(ino))
  redis.call('HDEL', P .. 'profiles', ino)
end
-- delete an inode that has no name left, dropping its block references
local function forget_inode(ino, bs, now)
  local a = redis.call('HMGET', ikey(ino), 'mode', 'size', 'blocks')
  if ftype(a[1]) == S_IFREG then change_refs(a[3], tonumber(a[2]), bs, -1, now) end
  delete_inode(ino, a[1], a[2])
end
-- remove an entry; its inode goes with its last link unless it is inode `sustain` (open in
-- the mount of `session`), which stays as an orphan with nlink 0
local function drop_entry(parent, name, ino, bs, now, sustain, session)
  redis.call('HDEL', dkey(parent), name)
  local nlink = tonumber(redis.call('HGET', ikey(ino), 'nlink'))
  if nlink <= 1 and tostring(ino) ~= tostring(sustain) then
    forget_inode(ino, bs, now)
  else
    if nlink > 0 then redis.call('HINCRBY', ikey(ino), 'nlink', -1) end
    redis.call('HSET', ikey(ino), 'ctime', now)
    if nlink <= 1 then redis.call('HSET', P .. 'orphans', ino, session) end
  end
end
-- the orphan's last handle closed: forget it unless it was linked again
local function release_orphan(ino, bs, now)
  if redis.call('HDEL', P .. 'orphans', ino) == 0 then return end
  local nlink = redis.call('HGET', ikey(ino), 'nlink')
  if nlink and tonumber(nlink) == 0 then forget_inode(ino, bs, now) end
end
-- record where directory ino is named (its link for within)
local function link_dir(ino, parent, name)
  redis.call('HSET', ikey(ino), 'parent', parent, 'pname', name)
end
-- a new inode named parent/name (mkdir, symlink, create, mknod): the inode number, or an
-- error reply. In a set-gid parent it takes the parent's group, a new directory its set-gid bit.
local S_ISGID = 1024
local function add_entry(parent, name, mode, uid, gid, size, mtime, now)
  local err = parent_dir(parent) or refuse_frozen(parent) if err then return nil, err end
  local p = redis.call('HMGET', ikey(parent), 'mode', 'gid')
  if bit.band(tonumber(p[1]), S_ISGID) ~= 0 then
    gid = p[2]
    if ftype(mode) == S_IFDIR then mode = bit.bor(tonumber(mode), S_ISGID) end
  end
  if redis.call('HEXISTS', dkey(parent), name) == 1 then return nil, redis.error_reply('EEXIST ' .. name) end
  local is_dir = ftype(mode) == S_IFDIR
  local ino = new_inode(mode, uid, gid, size, mtime, now, is_dir and 2 or 1)
  redis.call('HSET', dkey(parent), name, ino)
  if is_dir then link_dir(ino, parent, name) end
  touch(parent, now, is_dir and 1 or 0)  -- a subdirectory's '..' links to its parent
  return ino
end
local function child_of(parent, name)
  local ino = redis.call('HGET', dkey(parent), name)
  if not ino then return nil, nil end
  return ino, redis.call('HGET', ikey(ino), 'mode')
end
-- true if directory ino is directory dir or lies below it, searched downwards from dir: the
-- whole subtree (only for directories made before parent links, until open_session links them)
local function within_subtree(dir, ino)
  local queue, i = {dir}, 1
  while queue[i] do
    if queue[i] == ino then return true end
    local entries = redis.call('HGETALL', dkey(queue[i]))
    for j = 2, #entries, 2 do
      if ftype(redis.call('HGET', ikey(entries[j]), 'mode') or '0') == S_IFDIR then
        table.insert(queue, entries[j])
      end
    end
    i = i + 1
  end
  return false
end
-- true if directory ino is directory dir or lies below it: walks up from ino by the links of
-- directories to their entry (parent, pname), as many steps as ino is deep, as the SQLite
-- engine does. A link is trusted only if that entry still names the directory, so a missing
-- or stale link (a directory made, or moved, by chunkfs before links) falls back to the
-- subtree search: right either way.
local function within(dir, ino)
  dir = tostring(dir)
  local cur = tostring(ino)
  for _ = 1, 1000000 do  -- deeper than any path: a cycle is never made, but this never loops
    if cur == dir then return true end
    if cur == '1' then return false end
    local link = redis.call('HMGET', ikey(cur), 'parent', 'pname')
    if not link[1] or redis.call('HGET', dkey(link[1]), link[2]) ~= cur then break end
    cur = link[1]
  end
  return within_subtree(dir, ino)
end
"""

# ARGV: P, before_ns, mark ttl ns -> drops freed records and upload claims older than
# before_ns, and delete marks older than that by the mark ttl (left by a gc that died)
FORGET_FREED = PRELUDE + r"""
local before = tonumber(ARGV[2])
for hash, cutoff in pairs({freed = before, claims = before, deleting = before - tonumber(ARGV[3])}) do
  local all = redis.call('HGETALL', P .. hash)
  for i = 1, #all, 2 do
    if tonumber(all[i + 1]) < cutoff then redis.call('HDEL', P .. hash, all[i]) end
  end
end
return 1
"""

# ARGV: P, block id, now_ns, mark ttl ns -> 'known' | 'busy' | 'claimed' (MetaStore.claim_upload)
CLAIM_UPLOAD = PRELUDE + r"""
local id = ARGV[2]
if redis.call('HEXISTS', P .. 'refs', id) == 1 then return 'known' end
local mark = redis.call('HGET', P .. 'deleting', id)
if mark and tonumber(ARGV[3]) - tonumber(mark) < tonumber(ARGV[4]) then return 'busy' end
redis.call('HSET', P .. 'claims', id, ARGV[3])
return 'claimed'
"""

# ARGV: P, block id, claims_since_ns, now_ns, mark ttl ns -> 1 if marked for deletion
# (MetaStore.begin_delete)
BEGIN_DELETE = PRELUDE + r"""
local id = ARGV[2]
if redis.call('HEXISTS', P .. 'refs', id) == 1 then return 0 end
local claim = redis.call('HGET', P .. 'claims', id)
if claim and tonumber(claim) >= tonumber(ARGV[3]) then return 0 end
local mark = redis.call('HGET', P .. 'deleting', id)
if mark and tonumber(ARGV[4]) - tonumber(mark) < tonumber(ARGV[5]) then return 0 end
redis.call('HSET', P .. 'deleting', id, ARGV[4])
return 1
"""

# ARGV: P, parent, name, mode, uid, gid, mtime, now
MKDIR = PRELUDE + r"""
local ino, err = add_entry(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], 0, ARGV[7], ARGV[8])
return ino or err
"""

# ARGV: P, parent, name, target, uid, gid, mtime, now
SYMLINK = PRELUDE + r"""
local target = ARGV[4]
local ino, err = add_entry(ARGV[2], ARGV[3], S_IFLNK + 511, ARGV[5], ARGV[6], #target, ARGV[7], ARGV[8])
if err then return err end
redis.call('HSET', ikey(ino), 'target', target)
return ino
"""

# ARGV: P, parent, name, mode, uid, gid, mtime, size, blocks, block_size, now
PUBLISH = PRELUDE + r"""
local parent, name, mode, size, blob, bs, now = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[8]), ARGV[9],
  tonumber(ARGV[10]), ARGV[11]
local err = parent_dir(parent) if err then return err end
local old = redis.call('HGET', dkey(parent), name)
err = refuse_frozen(parent, old) if err then return err end
local ino
if old then
  local a = redis.call('HMGET', ikey(old), 'mode', 'size', 'blocks')
  local t = ftype(a[1])
  if t == S_IFDIR then return redis.error_reply('EISDIR ' .. name) end
  if t == S_IFREG then
    change_refs(a[3], tonumber(a[2]), bs, -1, now)
    redis.call('HINCRBY', P .. 'stats', 'bytes', size - tonumber(a[2]))
    redis.call('HSET', ikey(old), 'mode', mode, 'uid', ARGV[5], 'gid', ARGV[6], 'size', size, 'mtime', ARGV[7],
               'ctime', now, 'blocks', blob)
    ino = old
  else
    drop_entry(parent, name, old, bs, now, '0', '')
  end
end
if not ino then
  ino = new_inode(mode, ARGV[5], ARGV[6], size, ARGV[7], now, 1)
  redis.call('HSET', ikey(ino), 'blocks', blob)
  redis.call('HSET', dkey(parent), name, ino)
end
change_refs(blob, size, bs, 1, now)
touch(parent, now, 0)
return ino
"""

# ARGV: P, parent, name, now, block_size, sustain ino (0: none), session
UNLINK = PRELUDE + r"""
local parent, name = ARGV[2], ARGV[3]
local err = parent_dir(parent) if err then return err end
local ino = redis.call('HGET', dkey(parent), name)
if not ino then return redis.error_reply('ENOENT ' .. name) end
err = refuse_frozen(parent, ino) if err then return err end
if ftype(redis.call('HGET', ikey(ino), 'mode')) == S_IFDIR then return redis.error_reply('EISDIR ' .. name) end
drop_entry(parent, name, ino, tonumber(ARGV[5]), ARGV[4], ARGV[6], ARGV[7])
touch(parent, ARGV[4], 0)
return 1
"""

# ARGV: P, ino, mode, uid, gid, mtime, now, atime  (empty string: keep)
SET_ATTRS = PRELUDE + r"""
local k = ikey(ARGV[2])
local mode = redis.call('HGET', k, 'mode')
if not mode then return redis.error_reply('ENOENT inode ' .. ARGV[2]) end
local err = refuse_frozen(ARGV[2]) if err then return err end
if ARGV[3] ~= '' then redis.call('HSET', k, 'mode', ftype(mode) + tonumber(ARGV[3])) end
if ARGV[4] ~= '' then redis.call('HSET', k, 'uid', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSET', k, 'gid', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', k, 'mtime', ARGV[6]) end
if ARGV[8] and ARGV[8] ~= '' then redis.call('HSET', k, 'atime', ARGV[8]) end
redis.call('HSET', k, 'ctime', ARGV[7])
return 1
"""

# ARGV: P, parent, name, mode (with the type), rdev, uid, gid, mtime, now
MKNOD = PRELUDE + r"""
local ino, err = add_entry(ARGV[2], ARGV[3], ARGV[4], ARGV[6], ARGV[7], 0, ARGV[8], ARGV[9])
if err then return err end
redis.call('HSET', ikey(ino), 'rdev', ARGV[5])
return ino
"""

# ARGV: P, ino, block_size, now -> forgets the orphan unless it was linked again
RELEASE_ORPHAN = PRELUDE + r"""
release_orphan(ARGV[2], tonumber(ARGV[3]), ARGV[4])
return 1
"""

# ARGV: P, session, block_size, now -> releases the session's orphans and forgets the session
CLOSE_SESSION = PRELUDE + r"""
local all = redis.call('HGETALL', P .. 'orphans')
for i = 1, #all, 2 do
  if all[i + 1] == ARGV[2] then release_orphan(all[i], tonumber(ARGV[3]), ARGV[4]) end
end
redis.call('HDEL', P .. 'sessions', ARGV[2])
return 1
"""

# ARGV: P, parent, name, mode, uid, gid, mtime, now
CREATE = PRELUDE + r"""
local ino, err = add_entry(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], 0, ARGV[7], ARGV[8])
if err then return err end
redis.call('HSET', ikey(ino), 'blocks', '')
return ino
"""

# ARGV: P, ino, size, blocks, mtime, block_size, ctime (never moved back)
COMMIT = PRELUDE + r"""
local ino, size, blob, bs, now = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[6]), ARGV[7]
local a = redis.call('HMGET', ikey(ino), 'mode', 'size', 'blocks')
if not a[1] then return redis.error_reply('ENOENT inode ' .. ino) end
local err = refuse_frozen(ino) if err then return err end
local t = ftype(a[1])
if t == S_IFDIR then return redis.error_reply('EISDIR inode ' .. ino) end
if t ~= S_IFREG then return redis.error_reply('EINVAL inode ' .. ino) end
change_refs(a[3], tonumber(a[2]), bs, -1, now)
redis.call('HINCRBY', P .. 'stats', 'bytes', size - tonumber(a[2]))
redis.call('HSET', ikey(ino), 'size', size, 'blocks', blob, 'mtime', ARGV[5])
if not later(redis.call('HGET', ikey(ino), 'ctime'), now) then redis.call('HSET', ikey(ino), 'ctime', now) end
change_refs(blob, size, bs, 1, now)
return 1
"""

# ARGV: P, parent, name, now
RMDIR = PRELUDE + r"""
local parent, name = ARGV[2], ARGV[3]
local err = parent_dir(parent) if err then return err end
local ino, mode = child_of(parent, name)
if not ino then return redis.error_reply('ENOENT ' .. name) end
err = refuse_frozen(parent, ino) if err then return err end
if ftype(mode) ~= S_IFDIR then return redis.error_reply('ENOTDIR ' .. name) end
if redis.call('HLEN', dkey(ino)) > 0 then return redis.error_reply('ENOTEMPTY ' .. name) end
redis.call('HDEL', dkey(parent), name)
redis.call('DEL', dkey(ino))
delete_inode(ino, mode, 0)
touch(parent, ARGV[4], -1)
return 1
"""

# ARGV: P, parent, name, new_parent, new_name, noreplace (0/1), block_size, now, sustain ino, session
RENAME = PRELUDE + r"""
local parent, name, np, nn, noreplace, bs, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6] == '1',
  tonumber(ARGV[7]), ARGV[8]
local err = parent_dir(parent) if err then return err end
err = parent_dir(np) if err then return err end
local src, smode = child_of(parent, name)
if not src then return redis.error_reply('ENOENT ' .. name) end
err = refuse_frozen(parent, np, src, redis.call('HGET', dkey(np), nn)) if err then return err end
if parent == np and name == nn then return 1 end
local src_is_dir = ftype(smode) == S_IFDIR
if src_is_dir and within(src, np) then  -- the destination may not be inside the directory being moved
  return redis.error_reply('EINVAL cannot move a directory into itself')
end
local dst, dmode = child_of(np, nn)
if dst then
  if noreplace then return redis.error_reply('EEXIST ' .. nn) end
  if dst == src then return 1 end
  if src_is_dir then
    if ftype(dmode) ~= S_IFDIR then return redis.error_reply('ENOTDIR ' .. nn) end
    if redis.call('HLEN', dkey(dst)) > 0 then return redis.error_reply('ENOTEMPTY ' .. nn) end
    redis.call('HDEL', dkey(np), nn)
    redis.call('DEL', dkey(dst))
    delete_inode(dst, dmode, 0)
    touch(np, now, -1)
  else
    if ftype(dmode) == S_IFDIR then return redis.error_reply('EISDIR ' .. nn) end
    drop_entry(np, nn, dst, bs, now, ARGV[9], ARGV[10])
  end
end
redis.call('HDEL', dkey(parent), name)
redis.call('HSET', dkey(np), nn, src)
local moved_dir = src_is_dir and parent ~= np
if src_is_dir then link_dir(src, np, nn) end
touch(parent, now, moved_dir and -1 or 0)
touch(np, now, moved_dir and 1 or 0)
redis.call('HSET', ikey(src), 'ctime', now)
return 1
"""

# ARGV: P, parent, name, other_parent, other_name, now (renameat2 RENAME_EXCHANGE)
EXCHANGE = PRELUDE + r"""
local parent, name, op, on, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local err = parent_dir(parent) if err then return err end
err = parent_dir(op) if err then return err end
local a, amode = child_of(parent, name)
if not a then return redis.error_reply('ENOENT ' .. name) end
local b, bmode = child_of(op, on)
if not b then return redis.error_reply('ENOENT ' .. on) end
err = refuse_frozen(parent, op, a, b) if err then return err end
if a == b then return 1 end
local a_dir, b_dir = ftype(amode) == S_IFDIR, ftype(bmode) == S_IFDIR
if parent ~= op and ((a_dir and within(a, op)) or (b_dir and within(b, parent))) then
  return redis.error_reply('EINVAL cannot move a directory into itself')
end
redis.call('HSET', dkey(parent), name, b)
redis.call('HSET', dkey(op), on, a)
if a_dir then link_dir(a, op, on) end
if b_dir then link_dir(b, parent, name) end
local delta = 0  -- a directory that changes parent takes its '..' link along
if parent ~= op and a_dir ~= b_dir then delta = a_dir and 1 or -1 end
touch(parent, now, -delta)
touch(op, now, delta)
redis.call('HSET', ikey(a), 'ctime', now)
redis.call('HSET', ikey(b), 'ctime', now)
return 1
"""

# ARGV: P, ino, new_parent, new_name, now
LINK = PRELUDE + r"""
local ino, np, nn, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local mode = redis.call('HGET', ikey(ino), 'mode')
if not mode then return redis.error_reply('ENOENT inode ' .. ino) end
if ftype(mode) == S_IFDIR then return redis.error_reply('EPERM hard links to directories are not allowed') end
local err = parent_dir(np) or refuse_frozen(ino, np) if err then return err end
if redis.call('HEXISTS', dkey(np), nn) == 1 then return redis.error_reply('EEXIST ' .. nn) end
redis.call('HSET', dkey(np), nn, ino)
redis.call('HINCRBY', ikey(ino), 'nlink', 1)
redis.call('HSET', ikey(ino), 'ctime', now)
touch(np, now, 0)
return 1
"""

# ARGV: P, ino, name, value, mode ('' | 'create' | 'replace' | 'remove'), now
XATTR = PRELUDE + r"""
local ino, name, mode = ARGV[2], ARGV[3], ARGV[5]
if redis.call('EXISTS', ikey(ino)) == 0 then return redis.error_reply('ENOENT inode ' .. ino) end
local err = refuse_frozen(ino) if err then return err end
local exists = redis.call('HEXISTS', xkey(ino), name) == 1
if mode == 'create' and exists then return redis.error_reply('EEXIST xattr') end
if (mode == 'replace' or mode == 'remove') and not exists then return redis.error_reply('ENODATA xattr') end
if mode == 'remove' then redis.call('HDEL', xkey(ino), name) else redis.call('HSET', xkey(ino), name, ARGV[4]) end
redis.call('HSET', ikey(ino), 'ctime', ARGV[6])
return 1
"""

# ARGV: P, format json, uid, gid, now
FORMAT = PRELUDE + r"""
redis.call('SET', P .. 'format', ARGV[2])
if redis.call('EXISTS', ikey(1)) == 0 then
  redis.call('SET', P .. 'next_ino', 1)
  redis.call('HSET', ikey(1), 'mode', S_IFDIR + 493, 'uid', ARGV[3], 'gid', ARGV[4], 'size', 0, 'atime', ARGV[5],
             'mtime', ARGV[5], 'ctime', ARGV[5], 'nlink', 2)
  redis.call('HINCRBY', P .. 'stats', 'dirs', 1)
  redis.call('SET', P .. 'parents', '1')  -- every directory of a new volume is linked
end
return 1
"""

# ARGV: P, ino -> flat array: name, child ino, mode, uid, gid, size, atime, mtime, ctime, nlink, rdev ...
# One command per directory instead of one per entry (readdir of a 100-file model directory).
READDIR = PRELUDE + r"""
local mode = redis.call('HGET', ikey(ARGV[2]), 'mode')
if not mode then return redis.error_reply('ENOENT inode ' .. ARGV[2]) end
if ftype(mode) ~= S_IFDIR then return redis.error_reply('ENOTDIR inode ' .. ARGV[2]) end
local entries = redis.call('HGETALL', dkey(ARGV[2]))
local out = {}
for i = 1, #entries, 2 do
  local a = redis.call('HMGET', ikey(entries[i + 1]), 'mode', 'uid', 'gid', 'size', 'atime', 'mtime', 'ctime',
                       'nlink', 'rdev')
  if a[1] then
    table.insert(out, entries[i])
    table.insert(out, entries[i + 1])
    for j = 1, 8 do table.insert(out, a[j]) end
    table.insert(out, a[9] or '0')
  end
end
return out
"""

# ARGV: P, dir -> the directory's subdirectories, each given its parent link (volumes made
# before parent links: ``RedisMeta.open_session`` runs it over every directory, top down; one
# directory per script, so a rename running meanwhile never sees a wrong link)
LINK_PARENTS = PRELUDE + r"""
local dir = ARGV[2]
local entries = redis.call('HGETALL', dkey(dir))
local subdirs = {}
for j = 2, #entries, 2 do
  if ftype(redis.call('HGET', ikey(entries[j]), 'mode') or '0') == S_IFDIR then
    link_dir(entries[j], dir, entries[j - 1])
    table.insert(subdirs, entries[j])
  end
end
return subdirs
"""

# ARGV: P, src dir, parent, name, now, block_size, snapshot record JSON -> the copy's root inode
# (MetaStore.snapshot: the whole tree in one script, so the copy is one point in time; it
# holds the server for as long as the tree is large, a few ms per thousand entries)
SNAPSHOT = PRELUDE + r"""
local src, parent, name, now, bs = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local err = parent_dir(parent) or refuse_frozen(parent) if err then return err end
local smode = redis.call('HGET', ikey(src), 'mode')
if not smode then return redis.error_reply('ENOENT inode ' .. src) end
if ftype(smode) ~= S_IFDIR then return redis.error_reply('ENOTDIR inode ' .. src) end
if within(src, parent) then return redis.error_reply('EINVAL a snapshot cannot be placed inside its source') end
if redis.call('HEXISTS', dkey(parent), name) == 1 then return redis.error_reply('EEXIST ' .. name) end
local copies, links = {}, {}
local function copy(old)
  local fields = redis.call('HGETALL', ikey(old))
  local ino = redis.call('INCR', P .. 'next_ino')
  local kept = {}
  local mode, size, blob = '0', '0', nil
  for j = 1, #fields, 2 do
    local f = fields[j]
    if f ~= 'parent' and f ~= 'pname' then
      table.insert(kept, f)
      table.insert(kept, fields[j + 1])
    end
    if f == 'mode' then mode = fields[j + 1] elseif f == 'size' then size = fields[j + 1]
    elseif f == 'blocks' then blob = fields[j + 1] end
  end
  redis.call('HSET', ikey(ino), unpack(kept))
  redis.call('HSET', ikey(ino), 'frozen', '1')
  local x = redis.call('HGETALL', xkey(old))
  for j = 1, #x, 200 do  -- 100 pairs a call: unpack has a bound, an inode's xattrs do not
    redis.call('HSET', xkey(ino), unpack(x, j, math.min(j + 199, #x)))
  end
  count(mode, 1, size)
  if ftype(mode) == S_IFREG then change_refs(blob, tonumber(size), bs, 1, now) end
  local profile = redis.call('HGET', P .. 'profiles', old)
  if profile then redis.call('HSET', P .. 'profiles', ino, profile) end
  copies[old] = ino
  return ino
end
copy(src)
local queue, i = {src}, 1
while queue[i] do
  local old_dir = queue[i]
  local entries = redis.call('HGETALL', dkey(old_dir))
  for j = 1, #entries, 2 do
    local cname, child = entries[j], entries[j + 1]
    local cmode = redis.call('HGET', ikey(child), 'mode')
    if cmode then  -- (an entry whose inode is gone is skipped, as READDIR does)
      local is_dir = ftype(cmode) == S_IFDIR
      if not copies[child] then
        copy(child)
        if is_dir then table.insert(queue, child) end
      end
      local new = copies[child]
      redis.call('HSET', dkey(copies[old_dir]), cname, new)
      if is_dir then link_dir(new, copies[old_dir], cname) else links[new] = (links[new] or 0) + 1 end
    end
  end
  i = i + 1
end
for ino, n in pairs(links) do redis.call('HSET', ikey(ino), 'nlink', n) end
local root = copies[src]
redis.call('HSET', dkey(parent), name, root)
link_dir(root, parent, name)
touch(parent, now, 1)
redis.call('HSET', P .. 'snapshots', root, ARGV[7])
return root
"""

# ARGV: P, dir, data ('' with drop = '1'), replace ('1'/'0'), drop ('1'/'0') -> 1 if stored or dropped
# (MetaStore.set_profile: the directory checked and the profile set at once)
SET_PROFILE = PRELUDE + r"""
local ino = ARGV[2]
local mode = redis.call('HGET', ikey(ino), 'mode')
if not mode then return redis.error_reply('ENOENT inode ' .. ino) end
if ftype(mode) ~= S_IFDIR then return redis.error_reply('ENOTDIR inode ' .. ino) end
if ARGV[5] == '1' then return redis.call('HDEL', P .. 'profiles', ino) end
if ARGV[4] == '1' then redis.call('HSET', P .. 'profiles', ino, ARGV[3]) return 1 end
return redis.call('HSETNX', P .. 'profiles', ino, ARGV[3])
"""

# ARGV: P, root dir, snapshot record JSON (MetaStore.freeze_tree: a loaded dump's snapshot)
FREEZE_TREE = PRELUDE + r"""
local root = ARGV[2]
local mode = redis.call('HGET', ikey(root), 'mode')
if not mode then return redis.error_reply('ENOENT inode ' .. root) end
if ftype(mode) ~= S_IFDIR then return redis.error_reply('ENOTDIR inode ' .. root) end
local queue, i = {root}, 1
while queue[i] do
  redis.call('HSET', ikey(queue[i]), 'frozen', '1')
  local entries = redis.call('HGETALL', dkey(queue[i]))
  for j = 2, #entries, 2 do
    local cmode = redis.call('HGET', ikey(entries[j]), 'mode')
    if cmode and ftype(cmode) == S_IFDIR then
      table.insert(queue, entries[j])
    elseif cmode then
      redis.call('HSET', ikey(entries[j]), 'frozen', '1')
    end
  end
  i = i + 1
end
redis.call('HSET', P .. 'snapshots', root, ARGV[3])
return 1
"""

# ARGV: P, root dir, block_size, now (MetaStore.delete_snapshot)
DELETE_SNAPSHOT = PRELUDE + r"""
local root, bs, now = ARGV[2], tonumber(ARGV[3]), ARGV[4]
if redis.call('HEXISTS', P .. 'snapshots', root) == 0 then
  return redis.error_reply('EINVAL inode ' .. root .. ' is not a snapshot')
end
local link = redis.call('HMGET', ikey(root), 'parent', 'pname')
local queue, i, gone = {root}, 1, {}
while queue[i] do
  local entries = redis.call('HGETALL', dkey(queue[i]))
  for j = 2, #entries, 2 do
    local child = entries[j]
    if not gone[child] then
      gone[child] = true
      local a = redis.call('HMGET', ikey(child), 'mode', 'size', 'blocks')
      if ftype(a[1] or '0') == S_IFDIR then
        table.insert(queue, child)
      else
        if ftype(a[1] or '0') == S_IFREG then change_refs(a[3], tonumber(a[2]), bs, -1, now) end
        if a[1] then delete_inode(child, a[1], a[2]) end
      end
    end
  end
  i = i + 1
end
for _, dir in ipairs(queue) do
  local mode = redis.call('HGET', ikey(dir), 'mode')
  redis.call('DEL', dkey(dir))
  if mode then delete_inode(dir, mode, 0) end
end
if link[1] and redis.call('HGET', dkey(link[1]), link[2]) == root then
  redis.call('HDEL', dkey(link[1]), link[2])
  touch(link[1], now, -1)
end
redis.call('HDEL', P .. 'snapshots', root)
return 1
"""
