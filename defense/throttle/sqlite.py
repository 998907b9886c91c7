"""sqlite store (``sqlite:///relative.db``, ``sqlite:////absolute.db``): durable, shared by the processes
of one host.

WAL mode with synchronous=NORMAL: a commit survives a process kill (the WAL is written before COMMIT
returns; only a power loss can drop the last commits, which synchronous=FULL would close at a cost).

Leases keep the store off the admission path. A process takes budget from the file in short BEGIN
IMMEDIATE transactions, a slice at a time (``lease_fraction`` of the amount but at most
``lease_requests`` requests' worth, never more than half of what is left, never less than the request
needs), and admits from its slice in memory; what it does not use goes back once the slice has gone
``lease_ttl_s`` unused (an upkeep timer on the sidecar's event loop does it while the process is idle). A
slice in use stays, up to ``_LEASE_LIFE`` x ``lease_ttl_s`` (and a quarter of its bucket's period) from its
grant: a client that sends a request every second or two takes budget from the file once per
``lease_requests`` requests, not once per ``lease_ttl_s``, and a client's usage share read at the grant
is never older than that. In the sidecar (a running event loop) an admission that leaves one of its leases
under a quarter of a lease's worth queues a top-up for the loop's next turn, so admissions rarely wait for a
transaction (or for another process's write lock); and a transaction, ahead or one a short lease forces,
tops up every lease of the request that is under half a lease, so a plan's limits renew together rather
than each in its own transaction. A top-up fills a lease to a lease's worth, never past it. What every process holds
was taken from the file under its write lock, so together they never admit more than the limit. A
killed process's unused slice stays charged until the window refills (a token bucket drains, a sliding
window slides): budget is lost, never over-spent, and every settled charge was already in the file
before the kill (usage above a reservation comes out of a lease, which the settle takes from the file
when the process holds none, or is written to the file in the settle's own transaction when the limit
leaves no lease to take).

Seen from GetBudget, other processes' unused slices count as used; admitting a request another process
admitted (a retried Admit reaching a different sidecar) holds budget twice until one of them expires.

Settle writes one small row (the request's hash) in its own transaction: a retried Settle reaching
another process, or this one after a restart, is charged once. Markers live in two tables that take
turns, emptied whole every ``settle_dedup_s`` (a DELETE without WHERE is a truncate): no index, no scan.
A request whose id its front minted in this process (``RequestContext.private_id``: the in-process
fronts) can be settled only here, and once, so it writes no marker.

Concurrency slots (max_parallel) cannot refill with time, so each process records the slots it holds
in ``dg_holders`` with an expiry it renews while it runs; a killed process's slots come back when their
expiry passes (the reservation TTL).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import logging
import math
import os
import sqlite3
import threading
import uuid
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from ..clock import Clock
from ..errors import ConfigError
from ..metrics import Metrics
from .shared import SharedStore
from .store import OK, Reserved, StoreError, StoreOptions
from .strategy import CONCURRENCY, SLIDING_WINDOW, Bucket, Plan, idle_after, new_state

log = logging.getLogger("distillguard.budget")

SCHEMA_VERSION = "1"
_MAINT_S = 0.5  # expired leases and reservations are handled at most this late
_CLEANUP_S = 60.0  # idle rows and dead processes' slots are deleted this often
_LEASE_LIFE = 8  # a lease in use lives at most this many lease_ttl_s from its grant (and period / 4)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS dg_meta(k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS dg_buckets(key TEXT PRIMARY KEY, s0 REAL, s1 REAL, s2 REAL, idle REAL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS dg_buckets_idle ON dg_buckets(idle)",
    "CREATE TABLE IF NOT EXISTS dg_holders(key TEXT, owner TEXT, held REAL, expires REAL, "
    "PRIMARY KEY(key, owner)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS dg_settled0(h INTEGER PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS dg_settled1(h INTEGER PRIMARY KEY)",
)
_GET = "SELECT s0, s1, s2 FROM dg_buckets WHERE key = ?"
_PUT = ("INSERT INTO dg_buckets(key, s0, s1, s2, idle) VALUES (?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
        "s0 = excluded.s0, s1 = excluded.s1, s2 = excluded.s2, idle = excluded.idle")
_OTHERS = "SELECT coalesce(sum(held), 0) FROM dg_holders WHERE key = ? AND owner <> ? AND expires > ?"
_HOLD = ("INSERT INTO dg_holders(key, owner, held, expires) VALUES (?, ?, ?, ?) ON CONFLICT(key, owner) DO UPDATE "
         "SET held = excluded.held, expires = excluded.expires")
_MARK = ("INSERT OR IGNORE INTO dg_settled{cur}(h) SELECT ? WHERE NOT EXISTS "
         "(SELECT 1 FROM dg_settled{prev} WHERE h = ?)")
_MARKS = (_MARK.format(cur=0, prev=1), _MARK.format(cur=1, prev=0))


def sqlite_path(uri: str) -> str:
    """SQLAlchemy-style: sqlite:///rel/path is relative to the working directory, sqlite:////abs/path absolute."""
    rest = uri[len("sqlite://"):] if uri.startswith("sqlite://") else ""
    if not rest.startswith("/") or len(rest) < 2:
        raise ConfigError(f"{uri!r} is not sqlite:///relative/path.db or sqlite:////absolute/path.db", path="state.uri")
    return rest[1:]


def _marker(rkey: str) -> int:
    return int.from_bytes(hashlib.blake2b(rkey.encode(), digest_size=8).digest(), "big", signed=True)


def connect(path: str, *, timeout_s: float) -> sqlite3.Connection:
    """Open (or create) a state file; a file that is not one fails with a message saying what to do."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the directory for {path}: {e.strerror}", path="state.uri") from None
    what = "is not a usable sqlite database"
    new = not p.exists()
    try:
        conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False,
                               cached_statements=64)
    except sqlite3.Error as e:
        raise ConfigError(f"cannot open {path}: {e}", path="state.uri") from None
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise ConfigError(f"{path}: WAL mode is not available here (journal_mode={mode})", path="state.uri")
        conn.execute("PRAGMA synchronous=NORMAL")
        ok = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        if ok != "ok":
            raise sqlite3.DatabaseError(ok)
        conn.execute("BEGIN IMMEDIATE")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "dg_meta" not in tables:
            what = "is a sqlite database but not a distillguard state store"
            raise sqlite3.DatabaseError(f"tables {', '.join(sorted(tables))}")
        for stmt in _SCHEMA:
            conn.execute(stmt)
        row = conn.execute("SELECT v FROM dg_meta WHERE k = 'schema'").fetchone()
        if row is None:
            conn.execute("INSERT INTO dg_meta(k, v) VALUES ('schema', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            what = f"has state schema {row[0]}, this version reads {SCHEMA_VERSION}"
            raise sqlite3.DatabaseError("schema version")
        conn.execute("COMMIT")
        if new:  # per-client usage is nobody else's business; sqlite gives -wal and -shm the same mode
            os.chmod(path, 0o600)
    except sqlite3.DatabaseError as e:
        conn.close()
        raise ConfigError(f"state store {path} {what} ({e}); move it aside to start with empty budgets, "
                          f"or restore a backup", path="state.uri") from None
    return conn


class SqliteStore(SharedStore):
    backend = "sqlite"

    def __init__(self, path: str, *, metrics: Metrics | None = None) -> None:
        super().__init__(metrics=metrics)
        self.path = path
        self._conn = connect(path, timeout_s=self.options.timeout_s * 8)
        self.owner = uuid.uuid4().hex[:16]  # names this process's rows in dg_holders
        # key -> [remaining, expires, used_at_grant, window_tag, over_cap, bucket, expires_at_latest]: budget
        # leased from the file; each use moves ``expires`` to lease_ttl_s away, never past the last field
        self._bal: dict[str, list] = {}
        # (expires, n, key, lease): a heap, one entry per live lease; upkeep pops the due ones and sends home
        # those still unused since, or pushes them back with their moved expiry
        self._bal_q: list[tuple[float, int, str, list]] = []
        self._bal_n = itertools.count()
        self._res: dict[str, list] = {}  # rkey -> [expires, buckets, amounts, fraction, over, tags, private]
        self._res_q: deque[tuple[float, str]] = deque()
        self._held: dict[str, float] = {}  # concurrency key -> slots this process holds in dg_holders
        self._blocked: dict[str, float] = {}  # key -> until: the file refused lately, do not ask before
        # (key, window tag) -> [amount, bucket]: refunds with no live lease to join, given back by _maintain
        self._refunds: dict[tuple[str, float], list] = {}
        self._last_now = 0.0
        self._next_maint = 0.0
        self._next_cleanup = 0.0
        self._next_renew = 0.0
        self._gen = -1  # settle-marker generation this process last saw
        self._closed = False
        self._lock = threading.Lock()
        self.clock: Clock | None = None  # set by open_store: upkeep between requests needs the time
        self._ticker: asyncio.TimerHandle | None = None
        # plans whose leases ran low in an admission, topped up on the loop's next turn (see _top_up)
        self._low: dict[int, tuple[Sequence[Bucket], Sequence[int]]] = {}
        self._low_handle: asyncio.Handle | None = None

    # -- transactions -------------------------------------------------------------------------------
    def _begin(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError("store is closed")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StoreError(f"sqlite: {e}") from e
        return self._conn

    def _commit(self) -> None:
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._rollback()
            raise StoreError(f"sqlite: {e}") from e

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # nothing open, or the connection is gone: either way nothing was written

    def _row(self, c: sqlite3.Connection, b: Bucket, now: float) -> list:
        row = c.execute(_GET, (b.key,)).fetchone()
        return [row[0], row[1], row[2], 0.0] if row is not None else new_state(b.algo, b.period, now)

    def configure(self, options: StoreOptions) -> None:
        super().configure(options)
        with self._lock:
            if not self._closed:  # waiting for another process's write lock: a few of its short transactions
                self._conn.execute(f"PRAGMA busy_timeout = {int(options.timeout_s * 8000)}")

    # -- upkeep between requests -------------------------------------------------------------------
    def _tick(self) -> None:
        """Runs on the serving event loop every _MAINT_S: an idle process hands its leases back on time."""
        self._ticker = None
        if self._closed or self.clock is None:
            return
        with self._lock:
            try:
                self._maintain(self.clock.now())
            except StoreError as e:
                self._failed("upkeep", self.clock.now(), e)
        self._schedule()

    def _top_up(self) -> None:
        """Runs on the serving loop's next turn after an admission left some of its leases under a quarter of a
        lease: one transaction per such plan tops them up, so the admissions after it find them full rather
        than paying the transaction (and any wait for the file's write lock) themselves."""
        self._low_handle = None
        pending, self._low = self._low, {}
        if self._closed or self.clock is None:
            return
        with self._lock:
            now = self.clock.now()
            low = self.options.lease_requests / 4
            bal, blocked = self._bal, self._blocked
            for buckets, amounts in pending.values():
                soon = []
                due = False
                for i, b in enumerate(buckets):
                    a = amounts[b.unit]
                    e = bal.get(b.key)
                    # under half a lease: topped up with the one under a quarter, in its transaction
                    if a and e is not None and e[1] > now and e[0] < a * 2 * low and b.algo != CONCURRENCY \
                            and b.key not in blocked:
                        soon.append(i)
                        due = due or e[0] < a * low
                if not due:
                    continue  # an admission topped them up first
                try:
                    self._grant(buckets, amounts, [], now, soon)
                except StoreError as e:
                    self._failed("upkeep", now, e)
                    return

    def _schedule(self) -> None:
        # only inside a running loop (the sidecar): library callers without one get upkeep on each call
        loop = asyncio.events._get_running_loop()
        if loop is not None and not self._closed:
            self._ticker = loop.call_later(_MAINT_S, self._tick)

    # -- admission ----------------------------------------------------------------------------------
    def _reserve(self, rkey: str, plan: Plan, amounts: Sequence[int], now: float, ttl: float,
                 private: bool) -> Reserved:
        with self._lock:
            self._last_now = now
            if now >= self._next_maint:
                self._maintain(now)
                if self._ticker is None:
                    self._schedule()
            rec = self._res.get(rkey)
            if rec is not None:
                return OK, 0.0, rec[3], rec[4]
            bal = self._bal
            buckets = plan.buckets
            # one pass takes from the leases; a bucket whose lease is short sends the request to _grant
            # after the pass (rare: about once per lease_requests requests)
            tags: list[float] = []
            frac = 0.0
            over = False
            short = -1
            opts = self.options
            kept = now + opts.lease_ttl_s
            low = opts.lease_requests / 4
            running_low = False
            for i, b in enumerate(buckets):
                a = amounts[b.unit]
                if not a:
                    tags.append(0.0)
                    continue
                e = bal.get(b.key)
                if e is None or e[0] < a or e[1] <= now:
                    short = i
                    break
                e[0] -= a
                e[1] = kept if kept < e[6] else e[6]
                if e[0] < a * low and b.algo != CONCURRENCY:
                    running_low = True
                tags.append(e[3])
                if b.client_scope:
                    f = (e[2] - e[0]) / b.cap  # the file's count at the grant, less what is still unspent here
                    if f > frac:
                        frac = f
                if e[4]:
                    over = True
            if short >= 0:
                for b in buckets[:len(tags)]:  # undo the partial pass (the short bucket took nothing; an
                    a = amounts[b.unit]      # expiry moved by it stays moved: _reserve_slow uses them now)
                    if a:
                        bal[b.key][0] += a
                return self._reserve_slow(rkey, buckets, amounts, now, ttl, private)
            self._res[rkey] = [now + ttl, buckets, amounts, frac, over, tags, private]
            self._res_q.append((now + ttl, rkey))
            if running_low:
                self._ahead(buckets, amounts)
            return OK, 0.0, frac, over

    def _ahead(self, buckets: Sequence[Bucket], amounts: Sequence[int]) -> None:
        """Queue a top-up of these leases for the loop's next turn; without a running loop (a library caller)
        the next admission that needs a transaction tops them up (_reserve_slow)."""
        if self._low_handle is None:
            loop = asyncio.events._get_running_loop()
            if loop is None:
                return
            self._low_handle = loop.call_soon(self._top_up)
        self._low[id(buckets)] = (buckets, amounts)

    def _reserve_slow(self, rkey: str, buckets: Sequence[Bucket], amounts: Sequence[int], now: float,
                      ttl: float, private: bool) -> Reserved:
        """Some lease is short: one transaction tops up every short one, and the ones under half a lease's
        worth (their own transaction would come a few requests later), then the request is taken from them."""
        bal = self._bal
        need: list[int] = []
        soon: list[int] = []
        half = self.options.lease_requests / 2
        for i, b in enumerate(buckets):
            a = amounts[b.unit]
            if not a:
                continue
            e = bal.get(b.key)
            if e is None or e[0] < a or e[1] <= now:
                if not b.shadow:
                    until = self._blocked.get(b.key)
                    if until is not None and until > now:  # asked lately and refused: no transaction
                        return i, until - now, 0.0, False
                need.append(i)
            elif e[0] < a * half and b.algo != CONCURRENCY and b.key not in self._blocked:
                soon.append(i)  # slots are not topped up ahead: others would see them held
        refused = self._grant(buckets, amounts, need, now, soon)
        if refused is not None:
            return refused
        frac = 0.0
        over = False
        tags = []
        kept = now + self.options.lease_ttl_s
        for b in buckets:
            a = amounts[b.unit]
            if not a:
                tags.append(0.0)
                continue
            e = bal[b.key]
            e[0] -= a
            e[1] = kept if kept < e[6] else e[6]
            tags.append(e[3])
            if b.client_scope:
                f = (e[2] - e[0]) / b.cap
                if f > frac:
                    frac = f
            if e[4]:
                over = True
        self._res[rkey] = [now + ttl, buckets, amounts, frac, over, tags, private]
        self._res_q.append((now + ttl, rkey))
        return OK, 0.0, frac, over

    def _grant(self, buckets: Sequence[Bucket], amounts: Sequence[int], need: list[int], now: float,
               soon: Sequence[int] = ()) -> Reserved | None:
        """One transaction: lease what the needed buckets lack, or nothing (returns the refusal). The
        ``soon`` buckets still hold enough for this request: each is topped up if the file has room, and
        never refuses it."""
        opts = self.options
        c = self._begin()
        try:
            puts: list[tuple] = []
            holds: list[tuple] = []
            grants: list[tuple[Bucket, list]] = []
            optional = len(need)
            for n, i in enumerate((*need, *soon)):
                b = buckets[i]
                a = amounts[b.unit]
                e = self._bal.get(b.key)
                live = e is not None and e[1] > now
                have = e[0] if live else 0.0  # type: ignore[index]
                back = e[0] if (e is not None and not live and e[0] > 0) else 0.0  # an expired lease goes home
                want = a - have
                if b.algo == CONCURRENCY:
                    others = c.execute(_OTHERS, (b.key, self.owner, now)).fetchone()[0]
                    held = self._held.get(b.key, 0.0) - back
                    used = others + held
                    s = [used, 0.0, 0.0, 0.0]
                else:
                    s = self._row(c, b, now)
                    if back:
                        b.give(s, b.cap, b.period, back, now, e[3])  # type: ignore[index]
                    used = b.used(s, b.cap, b.period, now)
                avail = b.cap - used
                full = min(math.ceil(b.cap * opts.lease_fraction), a * opts.lease_requests, math.floor(avail / 2))
                if n >= optional:
                    # a top-up ahead fills the lease to a lease's worth, never past it: what a kill -9 strands
                    # stays one lease
                    lease = full - have
                    if lease <= 0:
                        continue  # full enough, or the file has no room
                else:
                    lease = max(want, full)
                    if lease > avail:
                        lease = want
                u = b.take(s, b.cap, b.period, lease, now, b.shadow)
                if u < 0:
                    if n >= optional:
                        continue  # a top-up ahead never refuses the request: its lease still holds enough
                    self._rollback()
                    retry = -u
                    if math.isfinite(retry):
                        self._blocked[b.key] = now + min(retry, opts.lease_ttl_s)
                    return i, retry, 0.0, False
                if b.algo == CONCURRENCY:
                    holds.append((b.key, self.owner, held + lease, now + opts.holder_ttl_s))
                else:
                    puts.append((b.key, s[0], s[1], s[2], idle_after(b.algo, s, b.cap, b.period)))
                window = b.period / 4 if b.algo != CONCURRENCY and b.period > 0 else math.inf  # slots: no window
                latest = now + min(_LEASE_LIFE * opts.lease_ttl_s, window)
                grants.append((b, [have + lease, now + opts.lease_ttl_s, u, s[0], u > b.cap, b,
                                   max(latest, now + opts.lease_ttl_s)]))
            if puts:
                c.executemany(_PUT, puts)
            if holds:
                c.executemany(_HOLD, holds)
        except sqlite3.Error as e:
            self._rollback()
            raise StoreError(f"sqlite: {e}") from e
        except BaseException:
            self._rollback()
            raise
        self._commit()
        for key, _, held, _ in holds:
            self._held[key] = held
        for b, entry in grants:
            self._bal[b.key] = entry
            heapq.heappush(self._bal_q, (entry[1], next(self._bal_n), b.key, entry))
            self._blocked.pop(b.key, None)
        self.event("lease_granted", len(grants))
        return None

    # -- settlement ---------------------------------------------------------------------------------
    def _settle(self, rkey: str, plan: Plan, actuals: Sequence[int], now: float, dedup_s: float) -> bool:
        with self._lock:
            self._last_now = now
            if now >= self._next_maint:
                self._maintain(now)
            rec = self._res.get(rkey)
            gen = int(now // dedup_s)
            local: list[tuple[Bucket, float, float]] = []  # (bucket, amount, tag) back into this process's leases
            charges: list[tuple[Bucket, float]] = []  # forced onto the file (used more than leased here)
            if rec is not None and gen == self._gen:
                done = self._settle_known(rec, rkey, gen, actuals, now)
                if done is None and self._lease_overshoot(rec, actuals, now):
                    done = self._settle_known(rec, rkey, gen, actuals, now)  # the new lease absorbs it
                if done is not None:
                    del self._res[rkey]
                    if not done:
                        self.event("settle_duplicate")
                    return done
            c = self._begin()
            try:
                if gen != self._gen:
                    self._rotate(c, gen)
                # a private id is settled here only, once: no marker for other processes to find
                first = (rec is not None and rec[6]) or c.execute(_MARKS[gen % 2], (h := _marker(rkey), h)).rowcount == 1
                if rec is not None:
                    for b, tag in zip(rec[1], rec[5], strict=True):
                        r = rec[2][b.unit]
                        a = actuals[b.unit] if first else 0  # settled elsewhere already: release it all
                        if r or a:
                            local.append((b, r - a, tag))
                    local = self._fit(local, charges, now)
                elif first:
                    charges = [(b, actuals[b.unit]) for b in plan.buckets if actuals[b.unit] and b.algo != CONCURRENCY]
                if charges:
                    puts = []
                    for b, a in charges:
                        s = self._row(c, b, now)
                        b.take(s, b.cap, b.period, a, now, True)
                        puts.append((b.key, s[0], s[1], s[2], idle_after(b.algo, s, b.cap, b.period)))
                    c.executemany(_PUT, puts)
            except sqlite3.Error as e:
                self._rollback()
                raise StoreError(f"sqlite: {e}") from e
            except BaseException:
                self._rollback()
                raise
            self._commit()
            self._gen = gen
            if rec is not None:
                del self._res[rkey]
                for b, diff, tag in local:
                    self._credit(b, diff, tag, now)
            if not first:
                self.event("settle_duplicate")
            elif rec is None:
                self.event("settle_unknown")
            return first

    def _settle_known(self, rec: list, rkey: str, gen: int, actuals: Sequence[int], now: float) -> bool | None:
        """The usual settle: this process holds the reservation and its leases absorb the difference, so the
        file needs only the settled marker, one autocommit statement (a transaction of its own) instead of
        BEGIN, INSERT and COMMIT, and a private id (minted and settled by this process only) not even that.
        None: some usage must be charged to the file; the caller's transaction does."""
        charges: list[tuple[Bucket, float]] = []
        local = [(b, rec[2][b.unit] - actuals[b.unit], tag) for b, tag in zip(rec[1], rec[5], strict=True)
                 if rec[2][b.unit] != actuals[b.unit]]  # used as reserved: nothing moves
        local = self._fit(local, charges, now)
        if charges:
            return None
        if self._closed:
            raise StoreError("store is closed")
        if rec[6]:
            first = True
        else:
            try:
                h = _marker(rkey)
                first = self._conn.execute(_MARKS[gen % 2], (h, h)).rowcount == 1
            except sqlite3.Error as e:
                raise StoreError(f"sqlite: {e}") from e
        if not first:  # settled by another process already: release the whole reservation here
            local = [(b, rec[2][b.unit], tag) for b, tag in zip(rec[1], rec[5], strict=True) if rec[2][b.unit]]
        for b, diff, tag in local:
            self._credit(b, diff, tag, now)
        return first

    def _lease_overshoot(self, rec: list, actuals: Sequence[int], now: float) -> bool:
        """Usage above the reservation that this process's leases cannot absorb (a tensor answer whose size
        the model's metadata left open reserves no values, and returns some): lease for it, as admission
        would, so the next such settles come out of memory instead of a transaction each. False when the
        file refuses the lease (the limit is near); the caller charges the usage to the file then."""
        buckets = rec[1]
        amounts = [0] * len(actuals)
        need = []
        for i, b in enumerate(buckets):
            over = actuals[b.unit] - rec[2][b.unit]
            if over <= 0 or b.algo == CONCURRENCY:
                continue
            e = self._bal.get(b.key)
            if e is None or e[1] <= now or e[0] < over:
                amounts[b.unit] = over
                need.append(i)
        return bool(need) and self._grant(buckets, amounts, need, now) is None

    def _fit(self, local: list[tuple[Bucket, float, float]], charges: list[tuple[Bucket, float]],
             now: float) -> list[tuple[Bucket, float, float]]:
        """Usage above the reservation comes out of this process's lease when it can; else it is charged to
        the file in the settle's own transaction, so a kill right after cannot lose it."""
        out = []
        for b, diff, tag in local:
            if diff < 0:
                e = self._bal.get(b.key)
                if e is None or e[1] <= now or e[0] < -diff:
                    if b.algo != CONCURRENCY:
                        charges.append((b, -diff))
                    continue
                tag = e[3]  # used now: counted in the live lease's window (a refund goes back into its own)
            out.append((b, diff, tag))
        return out

    def _credit(self, b: Bucket, amount: float, tag: float, now: float) -> None:
        """Budget released here (a refund, a freed slot) joins this process's live lease for the bucket, or
        waits for the next upkeep transaction to go back to the file (into the window it was counted in)."""
        if amount == 0:
            return
        e = self._bal.get(b.key)
        if e is not None and e[1] > now and (b.algo != SLIDING_WINDOW or e[3] == tag) and e[0] + amount >= 0:
            e[0] += amount
            if amount > 0:
                self._blocked.pop(b.key, None)
            return
        if amount < 0:  # _fit sent overshoots to the file; nothing negative reaches here
            return
        k = (b.key, tag if b.algo == SLIDING_WINDOW else 0.0)
        r = self._refunds.get(k)
        if r is None:
            self._refunds[k] = [amount, b]
        else:
            r[0] += amount

    # -- upkeep -------------------------------------------------------------------------------------
    def _rotate(self, c: sqlite3.Connection, gen: int) -> None:
        """Empty the marker table of two generations ago (the first process to see a new one does it)."""
        row = c.execute("SELECT v FROM dg_meta WHERE k = 'settled_gen'").fetchone()
        stored = int(row[0]) if row is not None else gen - 1
        if gen > stored:
            c.execute(f"DELETE FROM dg_settled{gen % 2}")  # noqa: S608 - table name from a fixed pair
            if gen - stored > 1:
                c.execute(f"DELETE FROM dg_settled{(gen + 1) % 2}")  # noqa: S608
            c.execute("INSERT INTO dg_meta(k, v) VALUES ('settled_gen', ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                      (str(gen),))

    def _maintain(self, now: float) -> None:
        """Release expired reservations into the leases; hand expired leases back; renew held slots."""
        self._next_maint = now + _MAINT_S
        q, res = self._res_q, self._res
        expired = 0
        while q and q[0][0] <= now:
            _, rkey = q.popleft()
            rec = res.get(rkey)
            if rec is not None and rec[0] <= now:
                del res[rkey]
                expired += 1
                for b, tag in zip(rec[1], rec[5], strict=True):
                    r = rec[2][b.unit]
                    if r:
                        self._credit(b, r, tag, now)
        if expired:
            self.event("reservation_expired", expired)
        home = []
        q = self._bal_q
        while q and q[0][0] <= now:
            _, _, key, e = heapq.heappop(q)
            if self._bal.get(key) is not e:
                continue  # replaced by a newer grant, which has its own entry
            if e[1] <= now:
                home.append((key, e))
            else:  # used since: due again at its moved expiry
                heapq.heappush(q, (e[1], next(self._bal_n), key, e))
        refunds = self._refunds
        renew = bool(self._held) and now >= self._next_renew
        cleanup = now >= self._next_cleanup
        if not home and not refunds and not renew and not cleanup:
            return
        # what goes back to the file: expired leases' remainders and queued refunds, per (key, tag)
        back: dict[tuple[str, float], list] = {k: [v[0], v[1]] for k, v in refunds.items()}
        for key, e in home:
            if e[0] > 0:
                b: Bucket = e[5]
                k = (key, e[3] if b.algo == SLIDING_WINDOW else 0.0)
                if k in back:
                    back[k][0] += e[0]
                else:
                    back[k] = [e[0], b]
        c = self._begin()
        try:
            puts = []
            holds = []
            held_now = dict(self._held)
            for (key, tag), (amount, b) in back.items():
                if b.algo == CONCURRENCY:
                    held_now[key] = max(held_now.get(key, 0.0) - amount, 0.0)
                    holds.append((key, self.owner, held_now[key], now + self.options.holder_ttl_s))
                else:
                    s = self._row(c, b, now)
                    b.give(s, b.cap, b.period, amount, now, tag)
                    puts.append((key, s[0], s[1], s[2], idle_after(b.algo, s, b.cap, b.period)))
            if puts:
                c.executemany(_PUT, puts)
            if holds:
                c.executemany(_HOLD, holds)
            if renew:
                c.execute("UPDATE dg_holders SET expires = ? WHERE owner = ?", (now + self.options.holder_ttl_s, self.owner))
            if cleanup:
                # bounded: a large backlog is cleared a thousand rows a minute, never in one long stall
                c.execute("DELETE FROM dg_buckets WHERE key IN (SELECT key FROM dg_buckets WHERE idle < ? LIMIT 1000)",
                          (now,))
                c.execute("DELETE FROM dg_holders WHERE expires < ? OR held <= 0", (now,))
        except sqlite3.Error as e:
            self._rollback()
            raise StoreError(f"sqlite: {e}") from e
        self._commit()
        refunds.clear()
        for key, e in home:
            if self._bal.get(key) is e:
                del self._bal[key]
        for key, _, held, _ in holds:
            if held > 0:
                self._held[key] = held
            else:
                self._held.pop(key, None)
        if renew:
            self._next_renew = now + self.options.holder_ttl_s / 3
        if cleanup:
            self._next_cleanup = now + _CLEANUP_S
        if home:
            self.event("lease_returned", len(home))

    # -- reads --------------------------------------------------------------------------------------
    def _status(self, plan: Plan, now: float) -> list[tuple[float, float, float]]:
        out = []
        with self._lock:
            self._maintain(now)  # queued refunds and expired leases first: report what the file will hold
            mine: dict[str, float] = {}  # held by this process's open reservations (a scan: GetBudget is rare)
            for rec in self._res.values():
                for b in rec[1]:
                    r = rec[2][b.unit]
                    if r:
                        mine[b.key] = mine.get(b.key, 0.0) + r
            c = self._conn
            try:
                for b in plan.buckets:
                    e = self._bal.get(b.key)
                    spare = e[0] if e is not None and e[1] > now and e[0] > 0 else 0.0
                    held = mine.get(b.key, 0.0)
                    if b.algo == CONCURRENCY:
                        others = c.execute(_OTHERS, (b.key, self.owner, now)).fetchone()[0]
                        used = others + self._held.get(b.key, 0.0)
                        reset = 0.0
                    else:
                        s = self._row(c, b, now)
                        used = b.used(s, b.cap, b.period, now)
                        reset = b.reset_in(s, b.cap, b.period, now)
                    out.append((max(used - spare - held, 0.0), held, reset))
            except sqlite3.Error as e:
                raise StoreError(f"sqlite: {e}") from e
        return out

    def close(self) -> None:
        """Hand every unused lease, queued refund and held slot back, then close the file."""
        with self._lock:
            if self._closed:
                return
            now = self._last_now
            for e in self._bal.values():
                e[1] = -math.inf  # every lease counts as expired
            self._bal_q = [(-math.inf, next(self._bal_n), k, e) for k, e in self._bal.items()]
            self._next_cleanup = math.inf
            try:
                self._maintain(now)
                c = self._begin()
                c.execute("DELETE FROM dg_holders WHERE owner = ?", (self.owner,))
                self._commit()
            except Exception as e:  # noqa: BLE001 - closing must finish; unreturned budget refills anyway
                log.warning("sqlite store: could not return leased budget on close (%s)", type(e).__name__)
            self._closed = True
            if self._ticker is not None:
                self._ticker.cancel()
            if self._low_handle is not None:
                self._low_handle.cancel()
                self._low.clear()
            self._conn.close()
