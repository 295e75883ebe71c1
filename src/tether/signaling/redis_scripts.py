"""The Lua scripts of :class:`~tether.signaling.redis_table.RedisConversationTable`.

Every change to a conversation is one script, so it is atomic in Redis: two relays cannot both
take the last slot of a conversation, and a signal is either published to the live recipient
or held, never both and never neither. Keys (``P`` is the table's prefix, default ``tether:``):

=========================  ===================================================================
``P c:CID``                hash peer id -> ``NODE \\n CONN \\n sha1(credential)``
``P m:CID``                hash ``creator`` -> the address that created the conversation
``P h:CID``                list of held signals (JSON ``[sender, at_ms, size, key, signal]``)
``P hk:CID`` / ``P hb:CID``  the held (sender, session, seq) keys / held bytes
``P convs``                set of live conversation ids (the cluster-wide count)
``P addr``                 hash address -> conversations it created (across relays)
``P node:NODE``            a relay's heartbeat (expires: the relay is dead)
``P nodes``                set of relay node ids that may still own peers
``P np:NODE``              set of ``CID \\n PEER \\n CONN`` a relay owns (to clean up after it)
=========================  ===================================================================

Held signals expire (``PEXPIRE`` of the held keys, and entries older than the TTL are never
handed out). Messages to a relay go to its pub/sub channel ``P ch:NODE`` as
``TYPE \\n CID \\n PEER \\n CONN \\n REST`` (ids are printable, so they contain no newline).
Scripts build key names from their arguments: fine for a single Redis (or a replica set),
not for Redis Cluster.
"""

from __future__ import annotations

_PRELUDE = r"""
local P = ARGV[1]
local function split3(v)
  local a, b, c = string.match(v, '^([^\n]*)\n([^\n]*)\n(.*)$')
  return a, b, c
end
local function alive(node)
  return redis.call('EXISTS', P .. 'node:' .. node) == 1
end
-- live peers of a conversation (entries of dead relays are removed on the way)
local function live_peers(cid)
  local ck = P .. 'c:' .. cid
  local raw = redis.call('HGETALL', ck)
  local out = {}
  local n = 0
  for i = 1, #raw, 2 do
    local node, conn, cred = split3(raw[i + 1])
    if node and alive(node) then
      out[raw[i]] = {node, conn, cred}
      n = n + 1
    else
      redis.call('HDEL', ck, raw[i])
      if node then
        redis.call('SREM', P .. 'np:' .. node, cid .. '\n' .. raw[i] .. '\n' .. conn)
      end
    end
  end
  return out, n
end
local function drop(cid)
  if redis.call('SREM', P .. 'convs', cid) == 1 then
    local creator = redis.call('HGET', P .. 'm:' .. cid, 'creator')
    if creator then
      if redis.call('HINCRBY', P .. 'addr', creator, -1) <= 0 then
        redis.call('HDEL', P .. 'addr', creator)
      end
    end
  end
  redis.call('DEL', P .. 'c:' .. cid, P .. 'm:' .. cid, P .. 'h:' .. cid,
             P .. 'hk:' .. cid, P .. 'hb:' .. cid)
end
local function tell(node, kind, cid, peer, conn, rest)
  redis.call('PUBLISH', P .. 'ch:' .. node,
             kind .. '\n' .. cid .. '\n' .. peer .. '\n' .. conn .. '\n' .. rest)
end
local function current(cid, peer, conn)
  local v = redis.call('HGET', P .. 'c:' .. cid, peer)
  if not v then return false end
  local _, c = split3(v)
  return c == conn
end
"""

JOIN = _PRELUDE + r"""
-- ARGV: P cid peer conn node cred_sha resume_sha address max_conv max_per_addr now_ms ttl_ms dry
local cid, peer, conn, node = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local cred_sha, resume_sha, address = ARGV[6], ARGV[7], ARGV[8]
local max_conv, max_addr = tonumber(ARGV[9]), tonumber(ARGV[10])
local now, ttl, dry = tonumber(ARGV[11]), tonumber(ARGV[12]), ARGV[13] == '1'
local peers, n = live_peers(cid)
local exists = redis.call('SISMEMBER', P .. 'convs', cid) == 1
if not exists then
  if redis.call('SCARD', P .. 'convs') >= max_conv then return {'full'} end
  if tonumber(redis.call('HGET', P .. 'addr', address) or '0') >= max_addr then
    return {'address'}
  end
end
local cur = peers[peer]
if cur then
  if resume_sha == '' or resume_sha ~= cur[3] then return {'taken'} end
  cred_sha = cur[3]
elseif n >= 2 then
  return {'crowded'}
end
if dry then return {'ok'} end
if not exists then
  redis.call('SADD', P .. 'convs', cid)
  redis.call('HINCRBY', P .. 'addr', address, 1)
  redis.call('HSET', P .. 'm:' .. cid, 'creator', address)
end
redis.call('HSET', P .. 'c:' .. cid, peer, node .. '\n' .. conn .. '\n' .. cred_sha)
redis.call('SADD', P .. 'np:' .. node, cid .. '\n' .. peer .. '\n' .. conn)
local replaced = 0
if cur then
  replaced = 1
  redis.call('SREM', P .. 'np:' .. cur[1], cid .. '\n' .. peer .. '\n' .. cur[2])
  tell(cur[1], 'X', cid, peer, cur[2], node .. '\n' .. conn)
end
local present = 0
for pid, e in pairs(peers) do
  if pid ~= peer then
    present = 1
    tell(e[1], 'P', cid, pid, e[2], 'joined')
  end
end
-- held signals: hand over those of other senders that did not expire, keep this peer's own
local hk, hl, hb = P .. 'hk:' .. cid, P .. 'h:' .. cid, P .. 'hb:' .. cid
local out = {'ok', tostring(present), tostring(replaced)}
local held = redis.call('LRANGE', hl, 0, -1)
if #held > 0 then
  redis.call('DEL', hl, hk, hb)
  local kept_bytes = 0
  for _, raw in ipairs(held) do
    local e = cjson.decode(raw)
    if now - e[2] < ttl then
      if e[1] ~= peer then
        out[#out + 1] = e[5]
      else
        redis.call('RPUSH', hl, raw)
        if e[4] ~= '' then redis.call('SADD', hk, e[4]) end
        kept_bytes = kept_bytes + e[3]
      end
    end
  end
  if kept_bytes > 0 then
    redis.call('SET', hb, kept_bytes)
    redis.call('PEXPIRE', hl, ttl)
    redis.call('PEXPIRE', hk, ttl)
    redis.call('PEXPIRE', hb, ttl)
  end
end
return out
"""

LEAVE = _PRELUDE + r"""
-- ARGV: P cid peer conn node
local cid, peer, conn, node = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if not current(cid, peer, conn) then return 0 end
redis.call('HDEL', P .. 'c:' .. cid, peer)
redis.call('SREM', P .. 'np:' .. node, cid .. '\n' .. peer .. '\n' .. conn)
local peers, n = live_peers(cid)
if n == 0 then
  drop(cid)
else
  for pid, e in pairs(peers) do tell(e[1], 'P', cid, pid, e[2], 'left') end
end
return 1
"""

RELAY = _PRELUDE + r"""
-- ARGV: P cid sender conn stamp payload
-- -1: the sender is not the current connection; else how many live recipients got it
local cid, sender, conn = ARGV[2], ARGV[3], ARGV[4]
local raw = redis.call('HGETALL', P .. 'c:' .. cid)
local me, sent = false, 0
for i = 1, #raw, 2 do
  local node, c = split3(raw[i + 1])
  if raw[i] == sender then
    if c == conn then me = true end
  elseif node and alive(node) then
    tell(node, 'S', cid, raw[i], c, ARGV[5] .. '\n' .. ARGV[6])
    sent = sent + 1
  end
end
if not me then return -1 end
return sent
"""

HOLD = _PRELUDE + r"""
-- ARGV: P cid sender conn stamp payload now_ms ttl_ms max_held max_bytes, then per signal:
-- key size entry. Publishes instead if the recipient joined meanwhile. Returns -1 (not
-- current), -2 (published), or a list of {index, why} for signals not held.
local cid, sender, conn = ARGV[2], ARGV[3], ARGV[4]
if not current(cid, sender, conn) then return -1 end
local peers, n = live_peers(cid)
local sent = false
for pid, e in pairs(peers) do
  if pid ~= sender then
    tell(e[1], 'S', cid, pid, e[2], ARGV[5] .. '\n' .. ARGV[6])
    sent = true
  end
end
if sent then return -2 end
local now, ttl = tonumber(ARGV[7]), tonumber(ARGV[8])
local max_held, max_bytes = tonumber(ARGV[9]), tonumber(ARGV[10])
local hk, hl, hb = P .. 'hk:' .. cid, P .. 'h:' .. cid, P .. 'hb:' .. cid
-- drop expired entries from the front
while true do
  local first = redis.call('LINDEX', hl, 0)
  if not first then break end
  local e = cjson.decode(first)
  if now - e[2] < ttl then break end
  redis.call('LPOP', hl)
  if e[4] ~= '' then redis.call('SREM', hk, e[4]) end
  redis.call('DECRBY', hb, e[3])
end
local count = redis.call('LLEN', hl)
local bytes = tonumber(redis.call('GET', hb) or '0')
local refused = {}
local i = 11
local index = 0
while i + 2 <= #ARGV do
  local key, size, entry = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  if key ~= '' and redis.call('SISMEMBER', hk, key) == 1 then
    -- a resend of a signal already held
  elseif count >= max_held then
    refused[#refused + 1] = {index, 'count'}
  elseif bytes + size > max_bytes then
    refused[#refused + 1] = {index, 'bytes'}
  else
    redis.call('RPUSH', hl, entry)
    if key ~= '' then redis.call('SADD', hk, key) end
    count = count + 1
    bytes = bytes + size
  end
  i = i + 3
  index = index + 1
end
redis.call('SET', hb, bytes)
redis.call('PEXPIRE', hl, ttl)
redis.call('PEXPIRE', hk, ttl)
redis.call('PEXPIRE', hb, ttl)
return refused
"""

FORWARD = _PRELUDE + r"""
-- ARGV: P cid sender conn to message
local cid, sender, conn, to = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if to == sender or not current(cid, sender, conn) then return 0 end
local v = redis.call('HGET', P .. 'c:' .. cid, to)
if not v then return 0 end
local node, c = split3(v)
if not alive(node) then return 0 end
tell(node, 'F', cid, to, c, ARGV[6])
return 1
"""

REAP = _PRELUDE + r"""
-- ARGV: P node. Forget everything a dead relay owned; tell the peers left behind.
local node = ARGV[2]
if alive(node) then return 0 end
local owned = redis.call('SMEMBERS', P .. 'np:' .. node)
for _, item in ipairs(owned) do
  local cid, peer, conn = split3(item)
  if cid and current(cid, peer, conn) then
    redis.call('HDEL', P .. 'c:' .. cid, peer)
    local peers, n = live_peers(cid)
    if n == 0 then
      drop(cid)
    else
      for pid, e in pairs(peers) do tell(e[1], 'P', cid, pid, e[2], 'left') end
    end
  end
end
redis.call('DEL', P .. 'np:' .. node)
redis.call('SREM', P .. 'nodes', node)
return #owned
"""
