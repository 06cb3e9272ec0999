//! The Lua scripts behind every Redis write that must be atomic or fenced:
//! each runs as one step on the server, so a retried call whose reply was
//! lost never counts twice, and a replica that lost a stream's lease cannot
//! write for it.

/// The fencing check every lease-guarded script starts with: the stream's
/// latest claim is the caller's (`token`), and its lease is the caller's or
/// has lapsed with no claim since, in which case the caller takes it back.
/// Taking back a lapsed lease is safe because the token proves that nobody
/// claimed the stream in between.
pub(super) const HOLDS_LUA: &str = r"
local function holds(lease, record, owner, token, ttl)
  if redis.call('HGET', record, 'fence') ~= token then
    return false
  end
  local holder = redis.call('GET', lease)
  if holder == owner then
    return true
  end
  if holder then
    return false
  end
  redis.call('SET', lease, owner, 'PX', ttl)
  return true
end
";

/// A fenced write to one hash (the record or the chunks): delete the named
/// fields, then set the given pairs, only if the caller holds the stream;
/// then, if asked, drop the stream's chunk records and give the lease up;
/// then, with seven keys, queue an event in the outbox in the same step (see
/// [`ENQUEUE_LUA`]). Every key has a fixed place. KEYS: lease, record,
/// target hash, the stream's chunk hash, [event marker, outbox, outbox due
/// set]. ARGV: owner, token, ttl, release (1 or 0), drop the chunk hash (1
/// or 0), the number of fields to delete, their names, then field/value
/// pairs, then with seven keys the event's id, JSON and marker ttl. Returns
/// 1 when written, 0 when the caller does not hold the stream, -1 when the
/// record is gone (Redis lost its data; the owner writes it back).
pub(super) const FENCED_WRITE_LUA: &str = r"
if redis.call('HEXISTS', KEYS[2], 'id') == 0 then
  return -1
end
if not holds(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then
  return 0
end
local announces = #KEYS == 7
local last = #ARGV
if announces then
  last = last - 3
end
local deleted = tonumber(ARGV[6])
for i = 7, 6 + deleted do
  redis.call('HDEL', KEYS[3], ARGV[i])
end
if last > 6 + deleted then
  redis.call('HSET', KEYS[3], unpack(ARGV, 7 + deleted, last))
end
if ARGV[5] == '1' then
  redis.call('DEL', KEYS[4])
end
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[1])
end
if announces then
  enqueue(KEYS[5], KEYS[6], KEYS[7], ARGV[last + 1], ARGV[last + 2], ARGV[last + 3])
end
return 1
";

/// Claim a stream that has a record and no other holder: set the lease and
/// bump the fencing token. A holder that is an earlier incarnation of the
/// caller's `INSTANCE_ID` (ARGV[3], `ID#`, empty without one) counts as no
/// holder once the caller holds the instance's liveness key (KEYS[3]): that
/// process is gone, and this is instant resume. Returns {token, owner, ttl
/// ms}; token 0 when someone else holds it, -1 when there is no record.
pub(super) const CLAIM_LUA: &str = r"
if redis.call('HEXISTS', KEYS[2], 'id') == 0 then
  return {-1, '', 0}
end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  local predecessor = ARGV[3] ~= '' and string.sub(holder, 1, #ARGV[3]) == ARGV[3]
    and redis.call('GET', KEYS[3]) == ARGV[1]
  if not predecessor then
    return {0, holder, redis.call('PTTL', KEYS[1])}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {redis.call('HINCRBY', KEYS[2], 'fence', 1), ARGV[1], tonumber(ARGV[2])}
";

/// Heartbeat in the replica set (dropping members that expired), then renew
/// each lease. KEYS: the replica set, then (lease, record) per stream. ARGV:
/// owner, ttl, then one token per stream. Returns the live replica count,
/// then per stream 1 (held), 0 (lost) or 2 (no record).
pub(super) const RENEW_LUA: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local result = {redis.call('ZCARD', KEYS[1])}
for i = 2, #KEYS, 2 do
  local token = ARGV[2 + i / 2]
  if redis.call('HEXISTS', KEYS[i + 1], 'id') == 0 then
    table.insert(result, 2)
  elseif holds(KEYS[i], KEYS[i + 1], ARGV[1], token, ARGV[2]) then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    table.insert(result, 1)
  else
    table.insert(result, 0)
  end
end
return result
";

/// Take an `INSTANCE_ID`'s liveness key unless another incarnation holds it,
/// and drop earlier incarnations from the replica set. KEYS: the liveness
/// key, the replica set. ARGV: owner, ttl, the incarnation prefix `ID#`.
/// Returns {1, owner, ttl} when taken, else {0, holder, its PTTL}.
pub(super) const INSTANCE_CLAIM_LUA: &str = r"
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  return {0, current, redis.call('PTTL', KEYS[1])}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if member ~= ARGV[1] and string.sub(member, 1, #ARGV[3]) == ARGV[3] then
    redis.call('ZREM', KEYS[2], member)
  end
end
return {1, ARGV[1], tonumber(ARGV[2])}
";

/// Keep (ttl > 0) or give up (ttl 0) an `INSTANCE_ID`'s liveness key, unless
/// another incarnation took it: 1 done, 0 taken. A key that lapsed (Redis
/// was out of reach) is taken again: no other incarnation claimed it.
/// KEYS: the liveness key. ARGV: owner, ttl.
pub(super) const INSTANCE_REFRESH_LUA: &str = r"
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  return 0
end
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
";

/// Delete the lease only if the caller still holds it with this token.
pub(super) const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('HGET', KEYS[2], 'fence') == ARGV[2] then
  redis.call('DEL', KEYS[1])
end
return 1
";

/// Map the identity to the new stream and write its record, unless another
/// (non-retired) stream already owns the identity.
pub(super) const REGISTER_LUA: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and current ~= ARGV[2] and current ~= ARGV[3] then
  return current
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
return ARGV[2]
";

/// Write a stream back if its record is gone (no `id` field): the record
/// fields, the chunk records and the identity mapping, each only where
/// missing, so that anything a worker wrote since Redis came back wins. The
/// stream's owner (ARGV[3] = 1, with its `fence` among the fields) also fills
/// in a record that another replica wrote back first without a fencing token.
pub(super) const RESTORE_LUA: &str = r"
if redis.call('HEXISTS', KEYS[2], 'id') == 1 then
  if ARGV[3] ~= '1' or redis.call('HEXISTS', KEYS[2], 'fence') == 1 then
    return 0
  end
end
if not redis.call('HGET', KEYS[1], ARGV[1]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local fields = tonumber(ARGV[4])
local first_chunk = 5 + fields * 2
for i = 5, first_chunk - 1, 2 do
  redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1])
end
for i = first_chunk, #ARGV, 2 do
  redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1])
end
return 1
";

/// Move a stream from identity ARGV[1] to ARGV[2] in the index and in its
/// record (if it has one).
pub(super) const REKEY_LUA: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[3] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
if redis.call('HEXISTS', KEYS[2], 'id') == 1 then
  redis.call('HSET', KEYS[2], 'identity', ARGV[2])
end
return 1
";

/// Retire a stream whose file is gone: delete the identity mapping if it
/// still points at this stream, and let the record and the chunk records
/// expire after ARGV[3] ms (an earlier expiry is kept, so replicas retiring
/// the same stream cannot postpone it). KEYS: identities, record, chunks.
pub(super) const RETIRE_LUA: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
for i = 2, 3 do
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl == -1 or ttl > tonumber(ARGV[3]) then
    redis.call('PEXPIRE', KEYS[i], ARGV[3])
  end
end
return 1
";

/// The outbox's one way in: queue event `id` (its JSON) as due now, unless
/// its marker says it was queued within the marker's ttl (ms). Returns 1
/// when queued.
pub(super) const ENQUEUE_LUA: &str = r"
local function enqueue(marker, outbox, due, id, json, ttl)
  if not redis.call('SET', marker, '1', 'NX', 'PX', ttl) then
    return 0
  end
  local time = redis.call('TIME')
  redis.call('HSET', outbox, id, json)
  redis.call('ZADD', due, tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000), id)
  return 1
end
";

/// Queue one event. KEYS: marker, outbox, due set. ARGV: id, JSON, ttl.
pub(super) const ANNOUNCE_LUA: &str = r"
return enqueue(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
";

/// Take the oldest due event and make it due again only after `hold` ms, so
/// no other replica takes it meanwhile; an id whose event is gone is
/// dropped. KEYS: due set, outbox, attempts hash. ARGV: hold ms. Returns
/// {} or {id, JSON, attempts}.
pub(super) const CLAIM_DUE_LUA: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 16)) do
  local json = redis.call('HGET', KEYS[2], id)
  if json then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
    return {id, json, redis.call('HGET', KEYS[3], id) or '0'}
  end
  redis.call('ZREM', KEYS[1], id)
end
return {}
";

/// Append the event to the Redis stream unless this id was appended before
/// (the published hash remembers it until the event leaves the outbox).
/// KEYS: published hash, stream. ARGV: id, max length, type, JSON.
pub(super) const PUBLISH_LUA: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return 0
end
local entry = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*',
  'id', ARGV[1], 'type', ARGV[3], 'event', ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], entry)
return 1
";

/// Make a failed event due again after ARGV[3] ms, if it is still queued.
/// KEYS: due set, outbox, attempts hash. ARGV: id, attempts, delay ms.
pub(super) const POSTPONE_LUA: &str = r"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then
  return 0
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return 1
";
