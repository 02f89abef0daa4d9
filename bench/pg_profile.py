"""bench/pg_profile: where PostgreSQL's work per POSTed event goes, per statement (BENCHMARKS.md).

Drives events end to end (wrk POSTing for a fixed time, the api's relay and the worker running, then
waits until every event is processed) against a fresh database, and prints per event what each
statement cost: pg_stat_statements (with `track = all`, so the totals trigger's statements show
nested under the insert, and `track_planning`), pg_stat_wal, PostgreSQL's CPU, and what the active
backends wait for (pg_stat_activity sampled). Counts (calls, rows, buffers, WAL) do not depend on the
machine's load; times do (and are wall-clock time, waits included), so runs repeat and report medians.
`--explain` ends with EXPLAIN (ANALYZE, BUFFERS, WAL) of the hot statements.

`--variant NAME` runs the baseline and that variant interleaved (A B A B …) in one stack: a variant is
SQL applied to the bench database before its runs and undone after (nothing of it outlives the
database, which is dropped at the end). `--compare-build DIR` adds the api and worker binaries in DIR
(another commit's `cargo build --release`) as one more variant, so that a change of code is measured
side by side with the build before it. Needs `pg_stat_statements` in `shared_preload_libraries`.
"""

import argparse
import re
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from run import RELEASE, Stack, cpu_seconds, drain, log, postgres_cpu_seconds, psql, seed, wrk

# The totals trigger on events' inserts and the function behind it, exactly as the migration that
# creates them says (read from it, so that a variant is always undone to what production runs).
ROW_COUNTS_MIGRATION = (Path(__file__).resolve().parent.parent / "migrations/2026-11-25-000003_row_counts/up.sql").read_text()
EVENTS_COUNT_TRIGGER = re.search(r"CREATE TRIGGER events_count_insert .*?;", ROW_COUNTS_MIGRATION, re.S).group(0)[:-1]
ROW_COUNTS_ADD = re.search(r"CREATE FUNCTION row_counts_add\(\).*?END \$\$", ROW_COUNTS_MIGRATION, re.S).group(0).replace(
    "CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)

# name: (description, SQL applied before the variant's runs, SQL undoing it). Database-level settings
# take effect in new sessions: the api and the worker are restarted before every run.
VARIANTS = {
    "no_totals_trigger": ("events' insert trigger dropped (what the exact totals cost; not a candidate alone)",
                          ["DROP TRIGGER events_count_insert ON events"], [EVENTS_COUNT_TRIGGER]),
    "row_trigger": ("the insert totals kept by a row-level trigger without a transition table",
                    ["DROP TRIGGER events_count_insert ON events",
                     """CREATE FUNCTION row_counts_add_one() RETURNS trigger LANGUAGE plpgsql AS $$
                        BEGIN
                            INSERT INTO row_counts (table_name, shard, count) VALUES (TG_TABLE_NAME, pg_backend_pid() % 32, 1)
                            ON CONFLICT (table_name, shard) DO UPDATE SET count = row_counts.count + 1;
                            RETURN NULL;
                        END $$""",
                     """CREATE TRIGGER events_count_insert_row AFTER INSERT ON events
                        FOR EACH ROW EXECUTE FUNCTION row_counts_add_one()"""],
                    ["DROP TRIGGER events_count_insert_row ON events", "DROP FUNCTION row_counts_add_one()",
                     EVENTS_COUNT_TRIGGER]),
    "shards_1024": ("the totals' shard picked by pg_backend_pid() % 1024 instead of % 32 (fewer pool connections share one)",
                    [ROW_COUNTS_ADD.replace("% 32", "% 1024")], [ROW_COUNTS_ADD]),
    "delta_rows": ("the insert trigger appends its delta to a table without keys (no row to wait for; folding "
                   "the deltas into the shards later is not measured)",
                   ["CREATE TABLE row_count_deltas (table_name text NOT NULL, delta bigint NOT NULL)",
                    "GRANT INSERT ON row_count_deltas TO highload_app",
                    ROW_COUNTS_ADD.replace("INSERT INTO row_counts (table_name, shard, count) VALUES "
                                           "(TG_TABLE_NAME, pg_backend_pid() % 32, delta)\n"
                                           "        ON CONFLICT (table_name, shard) DO UPDATE SET count = "
                                           "row_counts.count + EXCLUDED.count",
                                           "INSERT INTO row_count_deltas VALUES (TG_TABLE_NAME, delta)")],
                   [ROW_COUNTS_ADD, "DROP TABLE row_count_deltas"]),
    "no_type_index": ("events' (type, created_at, id) index dropped",
                      ["DROP INDEX events_type_created_at_id_idx"],
                      ["CREATE INDEX events_type_created_at_id_idx ON events (type, created_at DESC, id DESC)"]),
    "generic_plans": ("plan_cache_mode = force_generic_plan for every session of the database that does not set "
                      "its own (since 2026-12-02 the event writer, the worker and the relay do: only the api's pool)",
                      ["ALTER DATABASE {db} SET plan_cache_mode = force_generic_plan"],
                      ["ALTER DATABASE {db} RESET plan_cache_mode"]),
    "commit_delay": ("group commit: commit_delay = 200 µs, commit_siblings = 5 (every session of the database)",
                     ["ALTER DATABASE {db} SET commit_delay = 200", "ALTER DATABASE {db} SET commit_siblings = 5"],
                     ["ALTER DATABASE {db} RESET commit_delay", "ALTER DATABASE {db} RESET commit_siblings"]),
}

# pg_stat_statements counters summed per statement; per event in the report.
COUNTERS = ("calls", "plans", "total_exec_time", "total_plan_time", "rows", "shared_blks_hit", "shared_blks_read",
            "shared_blks_dirtied", "shared_blks_written", "wal_records", "wal_fpi", "wal_bytes")
WAL_COUNTERS = ("wal_records", "wal_fpi", "wal_bytes", "wal_write", "wal_sync")

INSERT, SELECT, DELETE, CLAIM = ("api: events + outbox rows (a batch)", "relay: select a batch", "relay: delete the acknowledged",
                                 "worker: claim and count a batch")
# Short names for the statements of the path, by a pattern of their text; others show their text.
LABELS = (
    (r"WITH input AS \( SELECT \* FROM unnest", INSERT),
    (r"count\(\*\) +FROM changed_rows", "↳ trigger: count the transition table"),
    (r"^INSERT INTO row_counts", "↳ trigger: counter shard upsert"),
    (r'^SELECT .* FROM "outbox" WHERE', SELECT),
    (r'^DELETE FROM "outbox"', DELETE),
    (r"^UPDATE outbox_publisher", "relay: lease renewal"),
    (r"WITH claimed AS \( UPDATE events SET status = ", CLAIM),
)


def label(query):
    text = " ".join(query.split())
    for pattern, name in LABELS:
        if re.search(pattern, text):
            return name
    return f"`{text[:60]}{'…' if len(text) > 60 else ''}`"


def statements(db):
    """{(queryid, toplevel): {counter: value, "query": text}} of the services' statements in `db` (they
    connect as highload_app; this script's own queries, as postgres, are left out)."""
    columns = ", ".join(COUNTERS)
    # One line per statement: comments (to the end of a line) go before the lines are joined.
    rows = psql(f"""SELECT queryid, toplevel, {columns},
                           replace(replace(regexp_replace(query, '--[^\\n]*', '', 'g'), E'\\n', ' '), '|', '¦')
                      FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = '{db}')
                       AND userid = 'highload_app'::regrole""", db, capture=True)
    result = {}
    for line in filter(None, rows.splitlines()):
        fields = line.split("|", len(COUNTERS) + 2)
        values = {name: float(value) for name, value in zip(COUNTERS, fields[2:-1])}
        result[(fields[0], fields[1] == "t")] = {**values, "query": fields[-1]}
    return result


def other_calls(db):
    """Statements run in other databases (other sessions' tests share this PostgreSQL): a run during
    which there were many has its cluster-wide figures (WAL, CPU) inflated."""
    return int(float(psql(f"""SELECT coalesce(sum(calls), 0) FROM pg_stat_statements
                               WHERE dbid <> (SELECT oid FROM pg_database WHERE datname = '{db}')""", db, capture=True)))


def wal():
    """pg_stat_wal: the whole server's WAL (other databases' writes included)."""
    return dict(zip(WAL_COUNTERS, map(float, psql(f"SELECT {', '.join(WAL_COUNTERS)} FROM pg_stat_wal",
                                                   capture=True).split("|"))))


def own_cpu_seconds(db):
    """CPU of this database's backends plus PostgreSQL's background processes (WAL writer,
    checkpointer, background writer): PostgreSQL's CPU without other databases' sessions."""
    pids = psql(f"""SELECT pid FROM pg_stat_activity WHERE (datname = '{db}' AND usename = 'highload_app')
                       OR backend_type IN ('walwriter', 'checkpointer', 'background writer')""", capture=True).split()
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass  # a backend that exited between the query and the read
    return total


def start_wait_sampler(db):
    """Samples every 10 ms what the services' active backends wait for (nothing: on CPU or runnable),
    by statement, until `wait_samples` stops it. psql's \\watch runs each sample as a transaction of
    its own: one long transaction would hold back the removal of dead rows, and so slow the relay."""
    process = subprocess.Popen(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-qAt"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    process.stdin.write("""SELECT left(regexp_replace(query, '[[:space:]]+', ' ', 'g'), 200),
                                  coalesce(wait_event_type || ':' || wait_event, 'CPU (no wait event)')
                             FROM pg_stat_activity
                            WHERE datname = current_database() AND usename = 'highload_app' AND state = 'active'
                           \\watch 0.01\n""")
    process.stdin.flush()
    return process


def wait_samples(process):
    process.send_signal(signal.SIGINT)
    process.stdin.close()
    output = process.stdout.read()
    process.wait()
    counts = {}
    for line in output.splitlines():
        if "|" in line:
            statement, wait = line.rsplit("|", 1)
            counts[(label(statement), wait)] = counts.get((label(statement), wait), 0) + 1
    return counts


def restart_apps(stack):
    """A fresh api (the relay's publisher) and worker: sessions pick up database-level settings."""
    if "worker" in stack.processes and stack.processes["worker"].poll() is None:
        stack.stop_process("worker")
    stack.restart_api()
    stack.start_worker()


def measure(stack, seconds, ids_file, connections):
    """One run: wrk POSTs events for `seconds`, then waits until all are processed; returns the
    differences of the counters over the run."""
    marker = psql("SELECT now()", stack.db, capture=True)
    before = (statements(stack.db), wal(), postgres_cpu_seconds(), own_cpu_seconds(stack.db), other_calls(stack.db))
    started = time.time()
    sampler = start_wait_sampler(stack.db)
    wrk(stack.url("api", "/api/v1/events"), seconds, "create_event.lua", (str(ids_file),), connections=connections)
    waits = wait_samples(sampler)
    drain(stack, marker, timeout=600)
    elapsed = time.time() - started
    # The CPU of this database's backends is read before the statistics queries below add to it.
    own_cpu = own_cpu_seconds(stack.db) - before[3]
    pg_cpu = postgres_cpu_seconds() - before[2]
    after = (statements(stack.db), wal(), other_calls(stack.db))
    events = int(psql(f"SELECT count(*) FROM events WHERE type = 'bench' AND created_at > '{marker}'", stack.db,
                      capture=True))
    diff = {}
    for key, stats in after[0].items():
        old = before[0].get(key, {})
        delta = {name: stats[name] - old.get(name, 0.0) for name in COUNTERS}
        if delta["calls"] > 0 or delta["plans"] > 0:
            diff[key] = {**delta, "query": stats["query"]}
    return {"events": events, "seconds": elapsed, "statements": diff, "pg_cpu": pg_cpu, "own_cpu": own_cpu,
            "wal": {name: after[1][name] - before[1][name] for name in WAL_COUNTERS},
            "other_calls": after[2] - before[4], "waits": waits}


def statement_table(runs):
    """Per event over all `runs` (summed): one row per statement, top-level first by time."""
    events = sum(run["events"] for run in runs)
    merged = {}
    for run in runs:
        for key, stats in run["statements"].items():
            entry = merged.setdefault(key, {name: 0.0 for name in COUNTERS} | {"query": stats["query"]})
            for name in COUNTERS:
                entry[name] += stats[name]
    top_time = sum(s["total_exec_time"] + s["total_plan_time"] for (_, top), s in merged.items() if top)
    lines = ["| statement | calls/event | rows/event | exec µs/event | plan µs/event | exec µs/call | share of "
             "top-level time | plans/call | blocks hit/event | dirtied/event | written/event | WAL records/event | FPI/event "
             "| WAL bytes/event |", "|---|" + "---:|" * 13]
    # Nested statements (the trigger's) are counted inside their top-level statement's figures too.
    order = sorted(merged.items(), key=lambda item: (not item[0][1], -item[1]["total_exec_time"]))
    for (_, top), s in order:
        time_ms = s["total_exec_time"] + s["total_plan_time"]
        if s["calls"] / events < 0.001 and time_ms * 1000 / events < 0.5:
            continue  # statements of the harness and one-offs
        share = f"{time_ms / top_time * 100:.1f} %" if top else "(inside)"
        lines.append(
            f"| {label(s['query'])} | {s['calls'] / events:.3f} | {s['rows'] / events:.2f} | "
            f"{s['total_exec_time'] * 1000 / events:.1f} | {s['total_plan_time'] * 1000 / events:.1f} | "
            f"{s['total_exec_time'] * 1000 / max(s['calls'], 1):.1f} | {share} | {s['plans'] / max(s['calls'], 1):.2f} | "
            f"{s['shared_blks_hit'] / events:.1f} | {s['shared_blks_dirtied'] / events:.2f} | "
            f"{s['shared_blks_written'] / events:.3f} | {s['wal_records'] / events:.2f} | {s['wal_fpi'] / events:.3f} | "
            f"{s['wal_bytes'] / events:.0f} |")
    lines.append(f"\nTop-level statements' exec + plan time: {top_time * 1000 / events:.1f} µs per event "
                 f"({events:,} events over {len(runs)} runs).")
    return "\n".join(lines)


def wait_table(runs):
    """Samples of the services' active backends while POSTing, by statement and wait event (all runs)."""
    counts = {}
    for run in runs:
        for key, count in run["waits"].items():
            counts[key] = counts.get(key, 0) + count
    total = sum(counts.values())
    lines = ["| statement | waiting for | share of active samples |", "|---|---|---:|"]
    for (statement, wait), count in sorted(counts.items(), key=lambda item: -item[1]):
        if count / total >= 0.005:
            lines.append(f"| {statement} | {wait} | {count / total * 100:.1f} % |")
    return "\n".join(lines)


def run_summary(run):
    top = sum(s["total_exec_time"] + s["total_plan_time"] for (_, toplevel), s in run["statements"].items()
              if toplevel)
    return {"events/s": run["events"] / run["seconds"], "PG CPU µs/event (all)": run["pg_cpu"] / run["events"] * 1e6,
            "PG CPU µs/event (own)": run["own_cpu"] / run["events"] * 1e6,
            "statements µs/event": top * 1000 / run["events"],
            "WAL records/event": run["wal"]["wal_records"] / run["events"],
            "WAL bytes/event": run["wal"]["wal_bytes"] / run["events"],
            "WAL FPI/event": run["wal"]["wal_fpi"] / run["events"],
            "WAL syncs/event": run["wal"]["wal_sync"] / run["events"], "other DBs' calls": run["other_calls"]}


def summary_table(by_variant):
    names = list(run_summary(next(iter(by_variant.values()))[0]))
    lines = ["| variant | runs | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for variant, runs in by_variant.items():
        summaries = [run_summary(run) for run in runs]
        cells = []
        for name in names:
            values = [summary[name] for summary in summaries]
            digits = 0 if name in ("events/s", "WAL bytes/event", "other DBs' calls") or "µs" in name else 2
            cells.append(f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})")
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def explain(stack, runs, ids_file):
    """EXPLAIN (ANALYZE, BUFFERS, WAL) of the path's statements as the services send them (their texts
    from pg_stat_statements, prepared), on the tables as the runs left them, the api and the worker
    stopped: the event insert (auto_explain shows the foreign key check and the trigger's statements
    nested in it), then, for 200 events of 200 users committed before (as the relay and the worker
    find them), the relay's select of a batch, its delete and the worker's claim, rolled back."""
    texts = {}
    for run in runs:
        for stats in run["statements"].values():
            texts.setdefault(label(stats["query"]), stats["query"])
    if missing := [name for name in (INSERT, SELECT, DELETE, CLAIM) if name not in texts]:
        raise SystemExit(f"no statement text for {missing}")
    for name in ("api", "worker"):
        stack.stop_process(name)
    user = ids_file.read_text().split()[0]
    analyze = "EXPLAIN (ANALYZE, BUFFERS, WAL, COSTS OFF)"
    script = f"""
\\set ON_ERROR_STOP 1
CREATE TABLE explain_fresh AS SELECT gen_random_uuid() AS id, id AS user_id FROM users ORDER BY random() LIMIT 200;
WITH ev AS (INSERT INTO events (id, user_id, type, data, created_at)
            SELECT id, user_id, 'bench', '{{}}', now() FROM explain_fresh)
INSERT INTO outbox (event_id, user_id, event_type, payload) SELECT id, user_id, 'bench', '{{}}' FROM explain_fresh;
SELECT epoch, (SELECT array_agg(id) FROM explain_fresh) AS events,
       (SELECT array_agg(id) FROM outbox WHERE event_id IN (SELECT id FROM explain_fresh)) AS rows
  FROM outbox_publisher \\gset
BEGIN;
LOAD 'auto_explain';
SET auto_explain.log_level = notice; SET auto_explain.log_analyze = on; SET auto_explain.log_buffers = on;
SET auto_explain.log_wal = on; SET auto_explain.log_nested_statements = on; SET auto_explain.log_timing = on;
PREPARE insert_event AS {texts[INSERT]};
PREPARE relay_select AS {texts[SELECT]};
PREPARE relay_delete AS {texts[DELETE]};
-- pg_stat_statements shows the claim's two literals as $2 and $3 ('processed', 'pending').
PREPARE claim AS {texts[CLAIM]};
\\echo ===== {INSERT} (auto_explain: the statement, then the statements of its trigger)
-- Each statement planned as its sessions plan it (common::pool::generic_plan_connector, outbox::relay::connector).
SET plan_cache_mode = force_generic_plan;
SET auto_explain.log_min_duration = 0;
EXECUTE insert_event(ARRAY[gen_random_uuid()], ARRAY['{user}'::uuid], ARRAY['bench'], ARRAY['{{"n":1}}'], ARRAY[now()],
                     ARRAY['{{}}'], ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[NULL::text]);
SET auto_explain.log_min_duration = -1;
\\echo ===== {SELECT}: 201 rows waiting
SET plan_cache_mode = force_custom_plan;
{analyze} EXECUTE relay_select('{{}}', :epoch, 500);
\\echo ===== {DELETE}: 200 of them
{analyze} EXECUTE relay_delete(:'rows');
\\echo ===== {CLAIM}: 200 events of 200 users
SET plan_cache_mode = force_generic_plan;
{analyze} EXECUTE claim(:'events', 'processed', 'pending');
ROLLBACK;
"""
    result = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", stack.db, "-qAt"], input=script,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The values of the arrays say nothing and fill lines: abbreviated.
    return re.sub(r"'\{([^,}]+,){3}[^}]*\}'", "'{…}'", result.stdout.strip())


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs per variant (default 3)")
    parser.add_argument("--seconds", type=int, default=10, help="POSTing time of a run (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32, as bench/run's end to end)")
    parser.add_argument("--variant", action="append", default=[], choices=sorted(VARIANTS),
                        help="also measure this variant, interleaved with the baseline")
    parser.add_argument("--compare-build", type=Path, metavar="DIR",
                        help="also measure the api and worker binaries in DIR (another build), interleaved")
    parser.add_argument("--explain", action="store_true", help="end with EXPLAIN (ANALYZE, BUFFERS, WAL) of the hot statements")
    parser.add_argument("--users", type=int, default=100_000, help="seeded users and events (default 100,000)")
    args = parser.parse_args()
    if args.compare_build and not all((args.compare_build / name).is_file() for name in ("api", "worker")):
        raise SystemExit(f"--compare-build: no api and worker binaries in {args.compare_build}")
    if "pg_stat_statements" not in psql("SHOW shared_preload_libraries", capture=True):
        raise SystemExit("pg_stat_statements is not loaded: ALTER SYSTEM SET shared_preload_libraries = "
                         "'pg_stat_statements', then restart PostgreSQL (pg_ctlcluster 15 main restart)")
    with tempfile.TemporaryDirectory(prefix="hlms-pg-profile-") as tmp:
        tmp = Path(tmp)
        stack = Stack(tmp)
        try:
            psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", stack.db)
            # The trigger's statements are nested: `track = all` shows them (inside the insert's figures).
            for setting in ("pg_stat_statements.track = 'all'", "pg_stat_statements.track_planning = on"):
                psql(f"ALTER DATABASE {stack.db} SET {setting}")
            ids_file = tmp / "ids.txt"
            seed(stack, args.users, args.users, ids_file)
            stack.start_cached_api()
            other_build = f"build {args.compare_build}" if args.compare_build else None
            order = ["baseline", *args.variant, *([other_build] if other_build else [])]
            by_variant = {name: [] for name in order}
            for rep in range(args.runs):
                for variant in order if rep % 2 == 0 else reversed(order):
                    setup, undo = VARIANTS[variant][1:] if variant in VARIANTS else ([], [])
                    for sql in setup:
                        psql(sql.format(db=stack.db), stack.db)
                    stack.bin = args.compare_build if variant == other_build else RELEASE
                    restart_apps(stack)
                    log(f"run {rep + 1}/{args.runs}, {variant}: warm-up, then {args.seconds}s of POSTs until processed")
                    subprocess.run([RELEASE / "fixed-rate", stack.url("api", ""), "500", "2", str(ids_file)],
                                   check=True, capture_output=True)
                    drain(stack, "-infinity", timeout=120)
                    # This machine runs PostgreSQL without autovacuum: the relay's select walks the
                    # outbox index's dead entries from the first row ever written, so a run would cost
                    # more than the one before it. Each starts from a vacuumed outbox instead.
                    psql("VACUUM outbox", stack.db)
                    run = measure(stack, args.seconds, ids_file, args.connections)
                    by_variant[variant].append(run)
                    log(f"{variant}: " + ", ".join(f"{k} {v:,.1f}" for k, v in run_summary(run).items()))
                    for sql in undo:
                        psql(sql.format(db=stack.db), stack.db)
            for variant, runs in by_variant.items():
                description = (VARIANTS[variant][0] if variant in VARIANTS else "the api and worker built there"
                               if variant == other_build else "the design as it is")
                print(f"\n### {variant}: {description}\n\n{statement_table(runs)}")
                print(f"\nWhat the active backends waited for while POSTing (pg_stat_activity every 10 ms):\n\n"
                      f"{wait_table(runs)}")
            print(f"\n### Per run (median, min–max)\n\n{summary_table(by_variant)}")
            if args.explain:
                print(f"\n### EXPLAIN (ANALYZE, BUFFERS, WAL)\n\n```\n{explain(stack, by_variant['baseline'], ids_file)}\n```")
        except BaseException:
            for log_file in sorted(tmp.glob("*.log")):
                print(f"--- {log_file.name} (tail)")
                print("\n".join(log_file.read_text(errors="replace").splitlines()[-20:]))
            raise
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
