//! The pipeline's lease in Redis, and the fence every unit checks.
//!
//! The lease is one hash, `<base>shapesync:<pipeline>:lease`: `owner`, `epoch`,
//! `expires` (ms, Redis' own clock, so instances' clocks never matter), `seq` (commits
//! stored under the lease), `gen` (the highest generation any unit has written rows
//! with) and one `standby:<instance>` field per instance that asked for it, holding when
//! that entry expires. Every unit of the sink is one call of [`UNIT_SCRIPT`], which
//! checks the fence before it writes anything, so no write of a stale instance can land,
//! snapshot parts and sweep steps included.

use redis::{FromRedisValue, Script, Value};
use shapesync_core::lease::{StoredLease, judge};
use shapesync_core::{Acquisition, Fence, LeaseInfo, SinkError};

/// One unit of writes, fenced. KEYS[1] is the lease hash. ARGV: owner (empty: no
/// fence), epoch, seq, TTL in ms, `1` when the unit stores the checkpoint (it then
/// counts a commit: `seq + 1`, after every command succeeded), the generation its rows
/// carry (empty: none), then per command its argument count and its arguments. An
/// argument count of 0 is a guard instead: a key and a number `m`, and the next `m`
/// commands run only if the key exists (a cached key refreshed in place). A negative
/// count `-m` is a stamp: a lifetime in ms, then `m` keys, each set to Redis' clock in µs
/// when the script runs, living that long (tombstones, taken inside the unit so that
/// they are never older than it).
///
/// Answers `{'ok', guards that passed}`; `{'done'}` when the store already holds `seq + 1` under this lease
/// (the batch was committed by an attempt whose answer was lost: nothing is written);
/// or `{'refused', owner, epoch, seq}` (empty strings for a missing lease) for Rust to
/// judge with [`judge`]. A failing command aborts the script before the checkpoint and
/// the commit count. (KEYS[1] also routes the call to the pipeline's slot on a cluster.)
const UNIT_SCRIPT: &str = r"
if ARGV[1] ~= '' then
  local l = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'seq', 'expires', 'gen')
  if l[1] ~= ARGV[1] or l[2] ~= ARGV[2] then
    return {'refused', l[1] or '', l[2] or '', l[3] or ''}
  end
  if l[3] ~= ARGV[3] then
    if tonumber(l[3]) == tonumber(ARGV[3]) + 1 then return {'done'} end
    return {'refused', l[1], l[2], l[3]}
  end
  local t = redis.call('TIME')
  local expires = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[4])
  if tonumber(l[4] or '0') < expires then
    redis.call('HSET', KEYS[1], 'expires', string.format('%.0f', expires))
  end
  if ARGV[6] ~= '' and (not l[5] or tonumber(l[5]) < tonumber(ARGV[6])) then
    redis.call('HSET', KEYS[1], 'gen', ARGV[6])
  end
end
local i, n, skip, passed, stamp = 7, #ARGV, 0, 0, nil
while i <= n do
  local argc = tonumber(ARGV[i])
  if argc == 0 then
    if redis.call('EXISTS', ARGV[i + 1]) == 1 then passed = passed + 1 else skip = tonumber(ARGV[i + 2]) end
    i = i + 3
  elseif argc < 0 then
    if not stamp then
      local t = redis.call('TIME')
      stamp = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
    end
    for k = i + 2, i + 1 - argc do redis.call('SET', ARGV[k], stamp, 'PX', ARGV[i + 1]) end
    i = i + 2 - argc
  else
    if skip > 0 then skip = skip - 1 else redis.call(unpack(ARGV, i + 1, i + argc)) end
    i = i + 1 + argc
  end
end
if ARGV[1] ~= '' and ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'seq', string.format('%.0f', tonumber(ARGV[3]) + 1))
end
return {'ok', passed}
";

/// Everything done to the lease itself. KEYS[1] is the lease hash. ARGV: mode, the
/// asking instance, TTL in ms, and for `renew`/`release`/`check` the fence's epoch and
/// seq. Modes:
/// - `take`: take the lease if nobody else holds it (raising the epoch), else record the
///   asker as a standby; `ask`: only record the asker;
/// - `force`: take it whoever holds it (`reset`);
/// - `renew`: extend it if the fence holds (`seq` from the fence's up);
/// - `check`: judge the fence as a commit would (`ok`, `done` or `refused`), write
///   nothing;
/// - `release`: expire it now if the fence's owner and epoch still hold it;
/// - `read`: report it, write nothing.
///
/// Answers `{'owned', epoch, seq, gen}`, `{'lease', owner, epoch, expires_in_ms,
/// standby...}`, `{'ok', ...}`, `{'done'}` or `{'refused', owner, epoch, seq}`.
const LEASE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode, me, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local l = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'seq', 'expires', 'gen')
local owner, epoch, seq, expires, gen = l[1], l[2] or '0', l[3] or '0', tonumber(l[4] or '0'), l[5] or '0'
local held = owner and expires > now
local function standbys()
  local out, all = {}, redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 8) == 'standby:' then
      if tonumber(all[i + 1]) <= now then
        if mode ~= 'read' then redis.call('HDEL', KEYS[1], all[i]) end
      elseif all[i] ~= 'standby:' .. owner then
        table.insert(out, string.sub(all[i], 9))
      end
    end
  end
  return out
end
local function report()
  local out = {'lease', owner or '', epoch, string.format('%.0f', expires - now)}
  for _, s in ipairs(standbys()) do table.insert(out, s) end
  return out
end
if mode == 'read' then
  if not owner then return {'none'} end
  return report()
end
if mode == 'take' or mode == 'ask' or mode == 'force' then
  if mode == 'force' or (mode == 'take' and (not held or owner == me)) then
    epoch = string.format('%.0f', tonumber(epoch) + 1)
    redis.call('HSET', KEYS[1], 'owner', me, 'epoch', epoch, 'expires', string.format('%.0f', now + ttl), 'seq', seq)
    redis.call('HDEL', KEYS[1], 'standby:' .. me)
    return {'owned', epoch, seq, gen}
  end
  redis.call('HSET', KEYS[1], 'standby:' .. me, string.format('%.0f', now + ttl))
  if not owner then owner = '' end
  return report()
end
if owner ~= me or epoch ~= ARGV[4] then
  if mode == 'release' then return {'ok'} end
  return {'refused', owner or '', l[2] or '', l[3] or ''}
end
if mode == 'release' then
  redis.call('HSET', KEYS[1], 'expires', '0')
  return {'ok'}
end
if mode == 'check' then
  if seq == ARGV[5] then return {'ok'} end
  if tonumber(seq) == tonumber(ARGV[5]) + 1 then return {'done'} end
  return {'refused', owner, epoch, seq}
end
if tonumber(seq) < tonumber(ARGV[5]) then return {'refused', owner, epoch, seq} end
if expires < now + ttl then
  redis.call('HSET', KEYS[1], 'expires', string.format('%.0f', now + ttl))
end
expires = math.max(expires, now + ttl)
return report()
";

/// The two scripts, loaded once per sink (`EVALSHA`, loading on `NOSCRIPT`).
pub(crate) struct Scripts {
    pub unit: Script,
    pub lease: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Scripts { unit: Script::new(UNIT_SCRIPT), lease: Script::new(LEASE_SCRIPT) }
    }
}

/// What a fenced unit or a `check` answered.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum UnitOutcome {
    /// Written (or, for `check`, the fence holds).
    Applied,
    /// The batch this unit belongs to was already committed: nothing was written.
    AlreadyCommitted,
}

fn strings(value: Value) -> Result<Vec<String>, SinkError> {
    Vec::<String>::from_redis_value(value).map_err(|e| {
        SinkError::rejected(format!("redis answered a lease script unexpectedly: {e}")).with_source(e)
    })
}

fn number<T: std::str::FromStr>(text: Option<&String>) -> Result<T, SinkError> {
    text.and_then(|t| t.parse().ok()).ok_or_else(|| {
        SinkError::corrupt_checkpoint("the pipeline's lease hash holds a field that is not a number")
    })
}

/// The error for a unit the fence refused, judged from what the store holds.
fn refused(reply: &[String], fence: &Fence, committing: bool) -> SinkError {
    let stored = match reply {
        [_, owner, epoch, seq, ..] if !owner.is_empty() => Some(StoredLease {
            owner: owner.clone(),
            epoch: epoch.parse().unwrap_or(0),
            seq: seq.parse().unwrap_or(0),
        }),
        _ => None,
    };
    SinkError::from_verdict(judge(stored.as_ref(), fence, committing)).unwrap_or_else(|| {
        SinkError::state_lost("the pipeline's lease does not match what this instance wrote")
    })
}

/// How many guards of a unit passed (keys that existed and were refreshed): the
/// second element of its `{'ok', n}` answer; 0 for any other answer.
pub(crate) fn guards_passed(value: &Value) -> u64 {
    match value {
        Value::Array(items) if items.len() >= 2 => u64::from_redis_value(items[1].clone()).unwrap_or(0),
        _ => 0,
    }
}

/// Reads a unit's (or a `check`'s) answer.
pub(crate) fn unit_outcome(value: Value, fence: &Fence, committing: bool) -> Result<UnitOutcome, SinkError> {
    let reply = strings(value)?;
    match reply.first().map(String::as_str) {
        Some("ok") => Ok(UnitOutcome::Applied),
        Some("done") => Ok(UnitOutcome::AlreadyCommitted),
        _ => Err(refused(&reply, fence, committing)),
    }
}

/// Reads a `{'lease', owner, epoch, expires_in_ms, standby...}` answer.
fn lease_info(reply: &[String]) -> Result<LeaseInfo, SinkError> {
    Ok(LeaseInfo {
        owner: reply.get(1).cloned().unwrap_or_default(),
        epoch: number(reply.get(2))?,
        expires_in_ms: number(reply.get(3))?,
        standbys: reply.iter().skip(4).cloned().collect(),
    })
}

/// Reads the answer of `take`, `ask` or `force` for `owner` with `ttl_ms`.
pub(crate) fn acquisition(value: Value, owner: &str, ttl_ms: u64) -> Result<Acquisition, SinkError> {
    let reply = strings(value)?;
    match reply.first().map(String::as_str) {
        Some("owned") => Ok(Acquisition::Owned {
            fence: Fence {
                owner: owner.to_owned(),
                epoch: number(reply.get(1))?,
                seq: number(reply.get(2))?,
                ttl_ms,
            },
            generation_floor: number(reply.get(3))?,
        }),
        _ => Ok(Acquisition::NotOwned(lease_info(&reply)?)),
    }
}

/// Reads the answer of `renew`.
pub(crate) fn renewal(value: Value, fence: &Fence) -> Result<LeaseInfo, SinkError> {
    let reply = strings(value)?;
    match reply.first().map(String::as_str) {
        Some("lease") => lease_info(&reply),
        _ => Err(refused(&reply, fence, false)),
    }
}

/// Reads the answer of `read`.
pub(crate) fn stored_lease(value: Value) -> Result<Option<LeaseInfo>, SinkError> {
    let reply = strings(value)?;
    match reply.first().map(String::as_str) {
        Some("lease") => lease_info(&reply).map(Some),
        _ => Ok(None),
    }
}
