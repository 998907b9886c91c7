"""Redis store (``redis://[:password@]host:port/db``, ``rediss://`` for TLS): shared by many replicas.

One Lua call per Admit and one per Settle (EVALSHA through resp.py's small client), each atomic: the reserve script checks every limit of the
request and takes all of them or none; the settle script swaps the reservation for the actuals and
leaves a marker so a retry is charged once. The arithmetic is strategy.py's, in Lua (tests check the two
agree).

Keys carry a hash tag so one call's keys share a cluster slot: ``dg:{<group>}:...`` where the group is
the client (when every limit is client-scoped), the tenant (tenant-scoped limits), or one slot for all
(model- or global-scoped limits). Every key has a TTL: counters expire once they hold nothing, a
reservation record outlives its reservation by the settle dedup window. A counter is one string (its
four numbers), read for all buckets with one MGET and written with one SET ... PX each. Reservations of
one group are indexed in a sorted set by expiry; each reserve releases up to 16 expired ones first, so
budget held by a request that never settled comes back without a sweeper process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from ..errors import ConfigError
from ..metrics import Metrics
from .resp import RespClient, RespError, Script, pack, pack_args, parse_uri
from .shared import SharedStore
from .store import OK, Reserved, StoreError, StoreOptions
from .strategy import Plan

log = logging.getLogger("distillguard.budget")

# Shared by both scripts: a bucket's state is one string "s0 s1 s2 reserved" (strategy.py's four numbers):
# one GET (or one MGET for all) and one SET with PX per bucket, where a hash would need three commands.
_LIB = r"""
local EPS = 1e-9
local function parse(v, algo, period, now)
  if v then
    local a, b, c, r = string.match(v, '^(%S+) (%S+) (%S+) (%S+)$')
    return {tonumber(a), tonumber(b), tonumber(c), tonumber(r)}
  end
  if algo == 1 then return {math.floor(now / period), 0, 0, 0} end
  if algo == 0 then return {0, now, 0, 0} end
  return {0, 0, 0, 0}
end
local function load(key, algo, period, now)
  return parse(redis.call('GET', key), algo, period, now)
end
local function roll(s, period, now)
  local idx = math.floor(now / period)
  if idx > s[1] then
    if idx == s[1] + 1 then s[3] = s[2] else s[3] = 0 end
    s[2] = 0
    s[1] = idx
  end
  local f = (now - s[1] * period) / period
  if f < 0 then f = 0 elseif f > 1 then f = 1 end
  return f
end
local function drain(s, cap, period, now)
  local dt = now - s[2]
  if dt > 0 then
    local lvl = s[1] - dt * cap / period
    if lvl < 0 then lvl = 0 end
    s[1] = lvl
    s[2] = now
  end
  return s[1]
end
-- returns use after the take (>= 0), or minus the seconds until it fits (-inf: never)
local function take(s, algo, cap, period, amount, now, force)
  if algo == 0 then
    local lvl = drain(s, cap, period, now)
    if lvl + amount <= cap + EPS or force then s[1] = lvl + amount; return s[1] end
    if amount > cap then return -math.huge end
    return -((lvl + amount - cap) * period / cap)
  elseif algo == 1 then
    local f = roll(s, period, now)
    local cur, prev = s[2], s[3]
    local est = prev * (1 - f) + cur
    if est + amount <= cap + EPS or force then s[2] = cur + amount; return est + amount end
    if amount > cap then return -math.huge end
    if cur + amount <= cap then
      local need = 1 - (cap - cur - amount) / prev
      return -(math.max(need - f, 0) * period) - EPS
    end
    local need = 1 - (cap - amount) / cur
    return -(((1 - f) + math.max(need, 0)) * period) - EPS
  end
  local n = s[1] + amount
  if n <= cap + EPS or force then s[1] = n; return n end
  if amount > cap then return -math.huge end
  return -period
end
local function give(s, algo, cap, period, amount, now, tag)
  if algo == 0 then
    local lvl = drain(s, cap, period, now) - amount
    if lvl < 0 then lvl = 0 end
    s[1] = lvl
  elseif algo == 1 then
    roll(s, period, now)
    if tag == s[1] then s[2] = math.max(s[2] - amount, 0)
    elseif tag == s[1] - 1 then s[3] = math.max(s[3] - amount, 0) end
  else
    s[1] = math.max(s[1] - amount, 0)
  end
end
local function save(key, s, algo, cap, period, now, hold_s)
  local idle
  if algo == 0 then idle = s[1] * period / cap elseif algo == 1 then idle = (s[1] + 2) * period - now
  else idle = 0 end
  -- numbers as %.17g: tostring's 14 digits would round a Unix time to 0.1 ms
  redis.call('SET', key, string.format('%.17g %.17g %.17g %.17g', s[1], s[2], s[3], math.max(s[4], 0)),
             'PX', math.ceil((math.max(idle, hold_s) + 1) * 1000))
end
-- swap a reservation record's amounts for the actuals in `actual` (key -> amount; consumed as used)
local function unreserve(rec, actual, now, hold_s)
  for key, algo, cap, period, amount, tag in string.gmatch(rec,
      '([^\t\n]+)\t([^\t\n]+)\t([^\t\n]+)\t([^\t\n]+)\t([^\t\n]+)\t([^\t\n]+)') do
    algo, cap, period, amount, tag = tonumber(algo), tonumber(cap), tonumber(period), tonumber(amount), tonumber(tag)
    local a = 0
    local act = actual and actual[key]
    if act then a = act[1]; act[1] = 0 end
    local s = load(key, algo, period, now)
    s[4] = s[4] - amount
    if amount > a then give(s, algo, cap, period, amount - a, now, tag)
    elseif a > amount then take(s, algo, cap, period, a - amount, now, true) end
    save(key, s, algo, cap, period, now, hold_s)
  end
end
"""

# KEYS: reservation record, expiry index, bucket keys...
# ARGV: now, ttl_s, record_ttl_ms, and per bucket "algo,cap,period,amount,flags;" in one string (flags: 1
# shadow, 2 client scope): one argument instead of five per bucket halves the client's packing work
_RESERVE = _LIB + r"""
local now, ttl, record_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local spec = {}
for a, c, p, n, f in string.gmatch(ARGV[4], '([^,;]+),([^,;]+),([^,;]+),([^,;]+),([^,;]+)') do
  spec[#spec + 1] = {tonumber(a), tonumber(c), tonumber(p), tonumber(n), tonumber(f), c, p}
end
local expired = 0
for _, rk in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 16)) do
  local r = redis.call('GET', rk)
  if r and string.sub(r, 1, 1) == 'R' then
    unreserve(r, nil, now, ttl)
    redis.call('SET', rk, 'X', 'PX', record_ms)
    expired = expired + 1
  end
  redis.call('ZREM', KEYS[2], rk)
end
local prior = redis.call('GET', KEYS[1])
if prior then return {-1, '0', '0', 0, expired} end
local states, lines = {}, {'R'}
local frac, over = 0, 0
local values = {}
if #KEYS > 2 then values = redis.call('MGET', unpack(KEYS, 3)) end  -- a plan may have no bucket
for i = 3, #KEYS do
  local algo, cap, period, amount, flags = unpack(spec[i - 2], 1, 5)
  local s = parse(values[i - 2], algo, period, now)
  local tag = 0
  if amount > 0 then
    local shadow = flags % 2 == 1
    local u = take(s, algo, cap, period, amount, now, shadow)
    if u < 0 then return {i - 3, tostring(-u), '0', 0, expired} end
    s[4] = s[4] + amount
    if flags >= 2 and u / cap > frac then frac = u / cap end
    if shadow and u > cap then over = 1 end
    tag = s[1]
  end
  states[i] = s
  lines[#lines + 1] = KEYS[i] .. '\t' .. algo .. '\t' .. spec[i - 2][6] .. '\t' .. spec[i - 2][7] .. '\t' ..
                      amount .. '\t' .. string.format('%.17g', tag)
end
for i = 3, #KEYS do
  local algo, cap, period = unpack(spec[i - 2], 1, 3)
  save(KEYS[i], states[i], algo, cap, period, now, ttl)
end
redis.call('SET', KEYS[1], table.concat(lines, '\n'), 'PX', record_ms)
redis.call('ZADD', KEYS[2], now + ttl, KEYS[1])
redis.call('PEXPIRE', KEYS[2], record_ms)
return {-1, '0', string.format('%.17g', frac), over, expired}
"""

# KEYS: reservation record, expiry index, bucket keys...
# ARGV: now, dedup_ms, hold_s, and per bucket "algo,cap,period,actual;" in one string
_SETTLE = _LIB + r"""
local now, dedup_ms, hold_s = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rec = redis.call('GET', KEYS[1])
if rec == 'S' then return 0 end
local actual, i = {}, 3
for a, c, p, n in string.gmatch(ARGV[4], '([^,;]+),([^,;]+),([^,;]+),([^,;]+)') do
  actual[KEYS[i]] = {tonumber(n), tonumber(a), tonumber(c), tonumber(p)}
  i = i + 1
end
local known = 0
if rec and string.sub(rec, 1, 1) == 'R' then
  unreserve(rec, actual, now, hold_s)
  redis.call('ZREM', KEYS[2], KEYS[1])
  known = 1
end
-- an unknown or expired reservation: charge what was used
for key, act in pairs(actual) do
  if known == 0 and act[1] > 0 and act[2] ~= 2 then
    local s = load(key, act[2], act[4], now)
    take(s, act[2], act[3], act[4], act[1], now, true)
    save(key, s, act[2], act[3], act[4], now, hold_s)
  end
end
redis.call('SET', KEYS[1], 'S', 'PX', dedup_ms)
return 1 + known
"""


class RedisStore(SharedStore):
    backend = "redis"

    def __init__(self, uri: str, *, metrics: Metrics | None = None) -> None:
        super().__init__(metrics=metrics)
        try:
            self.endpoint = parse_uri(uri)
        except ValueError as e:  # the message names the part, never the password
            raise ConfigError(f"invalid redis URI: {e}", path="state.uri") from None
        # connected on first use: a sidecar starts while Redis is down, under its outage policy; no retries
        # inside a call: an outage costs one timeout and then the policy, not several per request
        self._client = RespClient(self.endpoint, timeout_s=self.options.timeout_s)
        self._reserve_lua = Script(_RESERVE)
        self._settle_lua = Script(_SETTLE)
        self._lock = threading.Lock()
        # plan -> (key prefix, packed fixed keys, key count, per-bucket spec parts, bucket keys)
        self._plans: dict[Plan, tuple[str, bytes, int, list[tuple[str, str]], list[str]]] = {}

    def configure(self, options: StoreOptions) -> None:
        super().configure(options)
        with self._lock:
            self._client.timeout_s = options.timeout_s
            self._client.close()  # the next call connects with the new timeout

    def _keys(self, plan: Plan) -> tuple[str, bytes, int, list[tuple[str, str]], list[str]]:
        k = self._plans.get(plan)
        if k is None:
            if len(self._plans) > 50_000:
                self._plans.clear()
            base = f"dg:{{{plan.group}}}:"
            keys = [base + "b:" + b.key for b in plan.buckets]
            # per bucket: the spec string around its amount, "algo,cap,period," + amount + ",flags"
            parts = [(f"{b.algo},{b.cap!r},{b.period!r},", f",{(1 if b.shadow else 0) + (2 if b.client_scope else 0)}")
                     for b in plan.buckets]
            k = self._plans[plan] = (base + "r:", pack_args([base + "rz", *keys]), 2 + len(keys), parts, keys)
        return k

    def _call(self, script: Script, packed_keys: bytes, n_keys: int, args: Sequence[object]) -> object:
        with self._lock:
            try:
                return script(self._client, packed_keys, n_keys, pack_args(args), len(args))  # type: ignore[arg-type]
            except (OSError, RespError, ValueError) as e:
                raise StoreError(f"redis: {type(e).__name__}") from e

    def _reserve(self, rkey: str, plan: Plan, amounts: Sequence[int], now: float, ttl: float,
                 private: bool) -> Reserved:
        # private or not: the settle script's marker is part of its one atomic call, nothing to save
        prefix, fixed, n_keys, parts, _ = self._keys(plan)
        spec = ";".join([f"{a}{amounts[b.unit]}{z}" for b, (a, z) in zip(plan.buckets, parts, strict=True)])
        r = self._call(self._reserve_lua, pack_args([prefix + rkey]) + fixed, n_keys,
                       (repr(now), repr(ttl), int((ttl + self.options.dedup_s) * 1000), spec))
        code, retry, frac, over, expired = r  # type: ignore[misc]
        if expired:
            self.event("reservation_expired", expired)
        if code >= 0:
            return code, float(retry), 0.0, False
        return OK, 0.0, float(frac), bool(over)

    def _settle(self, rkey: str, plan: Plan, actuals: Sequence[int], now: float, dedup_s: float) -> bool:
        prefix, fixed, n_keys, parts, _ = self._keys(plan)
        spec = ";".join([f"{a}{actuals[b.unit]}" for b, (a, _) in zip(plan.buckets, parts, strict=True)])
        r = self._call(self._settle_lua, pack_args([prefix + rkey]) + fixed, n_keys,
                       (repr(now), int(dedup_s * 1000), repr(self.options.holder_ttl_s), spec))
        if r == 0:
            self.event("settle_duplicate")
        elif r == 1:
            self.event("settle_unknown")
        return r > 0  # type: ignore[operator]

    def _status(self, plan: Plan, now: float) -> list[tuple[float, float, float]]:
        keys = self._keys(plan)[4]
        with self._lock:
            try:
                rows = self._client.call(pack(["MGET", *keys])) if keys else []
            except (OSError, RespError, ValueError) as e:
                raise StoreError(f"redis: {type(e).__name__}") from e
        out = []
        for b, row in zip(plan.buckets, rows, strict=True):  # type: ignore[call-overload]
            if row is None:
                out.append((0.0, 0.0, 0.0))
                continue
            s = [float(x) for x in row.split()]
            used = b.used(s, b.cap, b.period, now)
            out.append((max(used - s[3], 0.0), max(s[3], 0.0), b.reset_in(s, b.cap, b.period, now)))
        return out

    def close(self) -> None:
        with self._lock:
            self._client.close()
