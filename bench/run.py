"""bench/run: measures the service against its ceilings, interleaved in one run (see BENCHMARKS.md).

Every service figure is paired with a ceiling measured in the same repetition, in alternating order,
so that the ratio survives this shared, noisy machine. `--smoke` runs every step briefly and asserts
nothing about speed (CI uses it so the harness cannot rot).
"""

import argparse
import http.server
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RELEASE = ROOT / "target" / "release"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The producer's linger.ms values the delay is measured at, the configured default (kept in step with
# common/src/config.rs by hand) first.
DEFAULT_LINGER_MS = 0
LINGER_SWEEP_MS = (DEFAULT_LINGER_MS, 5, 20)
# The stages of `worker_event_age_seconds`, in the order an event passes them.
AGE_STAGES = ("published", "received", "processed")

# name: (ratio target, description); checked on the median of per-rep ratios.
TARGETS = {
    "health_vs_static": (0.90, "GET /health/live ≥ 0.90 × static JSON"),
    "cached_vs_static": (0.55, "cached GET user ≥ 0.55 × static JSON"),
    "cached_vs_redis": (0.85, "cached GET user ≥ 0.85 × Redis GET"),
    "uncached_vs_pgbench": (0.70, "uncached GET user ≥ 0.70 × pgbench PK select"),
    "post_user_vs_pgbench": (0.60, "POST user ≥ 0.60 × pgbench same inserts"),
    "post_event_vs_pgbench": (0.60, "POST event ≥ 0.60 × pgbench same inserts"),
    "list_vs_uncached": (0.50, "list page 1 ≥ 0.50 × uncached GET"),
    "page1000_vs_page1": (0.50, "list page 1000 (by cursor) ≥ 0.50 × page 1 (no slower than 2×)"),
    "auth_cached_vs_plain": (0.85, "cached GET user with a token and the rate limiter ≥ 0.85 × without"),
    "auth_post_vs_plain": (0.85, "POST user with a token and the rate limiter ≥ 0.85 × without"),
}
# name: description; ratios to the reference server's other ceilings, reported without a goal: they
# show how much of a gap to pgbench any HTTP server pays (the same query over tokio-postgres) and how
# much of a POST is HTTP and JSON alone.
CONTEXT = {
    "redis_vs_static": "reference server's Redis GET ÷ its static body",
    "uncached_vs_ref_pg": "uncached GET user ÷ reference server's PK select (tokio-postgres, prepared)",
    "ref_pg_vs_pgbench": "reference server's PK select ÷ pgbench PK select",
    "post_user_vs_echo": "POST user ÷ reference server's POST (parse the JSON body, answer)",
    "fresh_tokens_vs_plain": "cached GET user, each request one of 50,000 tokens (signature checked nearly every time) ÷ without a token",
    "traced_cached_vs_plain": "cached GET user with traces on (every request sampled, spans exported over OTLP) ÷ traces off",
}


def log(message):
    print(f"\033[1m==> {message}\033[0m", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} did not come up in {timeout}s")


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def postgres_cpu_seconds():
    """CPU time PostgreSQL has used: the postmaster's own and that of the backends it reaped
    (cutime/cstime), plus that of the live backends. Background writers count too: WAL is a cost."""
    postmaster = int(subprocess.run(["pgrep", "-o", "-u", "postgres", "-x", "postgres"], check=True,
                                    capture_output=True, text=True).stdout.split()[0])
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(field) for field in fields[11:15])
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
    for child in children:
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def memory_kb(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def psql(sql, database="postgres", capture=False):
    result = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", database, "-v", "ON_ERROR_STOP=1",
                             "-qtAc", sql], check=True, capture_output=True, text=True)
    return result.stdout.strip() if capture else None


class OtlpSink(http.server.BaseHTTPRequestHandler):
    """Takes OTLP/HTTP exports and answers 200, counting them: the collector of the traced api."""

    exports = 0
    export_bytes = 0

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        OtlpSink.exports += 1
        OtlpSink.export_bytes += len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def start_otlp_sink():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OtlpSink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


class Stack:
    """Own Redis, own tansu, a fresh database; the api (cached, uncached, with tokens, with traces),
    worker and refserver."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.processes = {}
        self.db = f"hlms_bench_{os.getpid()}"
        # Where the cached api and the worker are started from (bench/pg-profile --compare-build swaps it).
        self.bin = RELEASE
        self.redis_port, self.broker_port = free_port(), free_port()
        self.ports = {name: free_port() for name in ("api", "api_uncached", "api_auth", "api_traced", "ref", "worker")}
        psql(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")
        psql(f"CREATE DATABASE {self.db}")
        # The binaries run as a role with DML only, as in production; `api migrate` as the owner grants it.
        psql("DO $$ BEGIN CREATE ROLE highload_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        self.start("redis", ["redis-server", "--port", str(self.redis_port), "--save", "", "--appendonly", "no"])
        tansu = os.environ["TANSU_BIN"]
        self.start("tansu", [tansu, "broker", "--listener-url", f"tcp://127.0.0.1:{self.broker_port}",
                             "--advertised-listener-url", f"tcp://127.0.0.1:{self.broker_port}",
                             "--storage-engine", "memory://tansu/"])
        wait_for("redis", lambda: socket.create_connection(("127.0.0.1", self.redis_port)).close() is None)
        wait_for("tansu", lambda: socket.create_connection(("127.0.0.1", self.broker_port)).close() is None)
        self.env = {**os.environ, "DB_HOST": "127.0.0.1", "DB_NAME": self.db, "REDIS_HOST": "127.0.0.1",
                    "REDIS_PORT": str(self.redis_port), "KAFKA_BROKERS": f"127.0.0.1:{self.broker_port}",
                    "KAFKA_SESSION_TIMEOUT_MS": "6000", "LOG_LEVEL": "warn", "SERVER_HOST": "127.0.0.1",
                    "DB_POOL_MAX_SIZE": "16", "KAFKA_TOPIC_PARTITIONS": "12",
                    "DB_USER": "highload_app", "DB_MIGRATION_USER": "postgres", "DB_MIGRATION_PASSWORD": "postgres",
                    # Baselines without authentication; what tokens cost is measured against them separately.
                    "AUTH_MODE": "none"}
        subprocess.run([RELEASE / "api", "migrate"], env=self.env, check=True, stdout=subprocess.DEVNULL)

    def start(self, name, command, env=None):
        log_file = open(self.tmp / f"{name}.log", "w")
        self.processes[name] = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        return self.processes[name]

    def start_apps(self):
        self.start_cached_api()
        # PostgreSQL's default 100 connections hold every server's sessions and pgbench's clients: each
        # api keeps its pool, its relay's own session and its event writer's 2, and the refserver 16. Only
        # the cached api POSTs events: the others keep one writer session, for the readiness check (no
        # idle minimum), so the three full apis take 16 + 1 + 2, 18 and 18, the traced one 3, the
        # refserver 16 and pgbench 25 (see PGBENCH_CLIENTS): 99.
        lazy = {"DB_POOL_MIN_IDLE": "0"}
        # The cached api again, with what clients cost: a bearer token on every request (the development
        # issuer, JWKS from a file) and the rate limiter on, its limit far above the load.
        self.start("api_auth", [RELEASE / "api"], {
            **self.env, **lazy, "SERVER_PORT": str(self.ports["api_auth"]), "RUN_MIGRATIONS": "false", "CACHE_TTL": "7200",
            "AUTH_MODE": "jwt", "AUTH_ISSUER": "highload-microservice-dev", "AUTH_AUDIENCE": "highload-microservice",
            "AUTH_JWKS_FILE": str(ROOT / "dev/auth/jwks.json"), "RATE_LIMIT_RPS": "100000"})
        # The cached api once more with traces on: every request sampled (the default sampler, with
        # no caller's traceparent), its spans exported over OTLP/HTTP to a sink in this process. Its
        # cached GETs never reach PostgreSQL, so it keeps a pool of one (and its relay's session).
        self.start("api_traced", [RELEASE / "api"], {
            **self.env, **lazy, "SERVER_PORT": str(self.ports["api_traced"]), "RUN_MIGRATIONS": "false",
            "CACHE_TTL": "7200", "DB_POOL_MAX_SIZE": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": start_otlp_sink()})
        self.start("api_uncached", [RELEASE / "api"], {**self.env, **lazy, "SERVER_PORT": str(self.ports["api_uncached"]),
                                                        "CACHE_TTL": "0", "RUN_MIGRATIONS": "false"})
        self.start("ref", [RELEASE / "refserver"], {**self.env, "REF_PORT": str(self.ports["ref"]),
                                                     "REF_PG": f"host=127.0.0.1 user=postgres dbname={self.db}",
                                                     "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}",
                                                     "REDIS_KEY_PREFIX": "hlms:"})
        for name in ("api", "api_uncached", "api_auth", "api_traced"):
            wait_for(name, lambda n=name: http_ok(f"http://127.0.0.1:{self.ports[n]}/health/ready"))
        wait_for("refserver", lambda: http_ok(f"http://127.0.0.1:{self.ports['ref']}/static"))

    def start_cached_api(self):
        # A TTL longer than the run: entries must not expire between the warm-up and the last rep.
        self.start("api", [self.bin / "api"], {**self.env, "SERVER_PORT": str(self.ports["api"]), "RUN_MIGRATIONS": "false",
                                              "CACHE_TTL": "7200"})

    def stop_process(self, name):
        self.processes[name].terminate()
        self.processes[name].wait(timeout=30)

    def restart_api(self, **env):
        """Restarts the cached api with `env` on top of the stack's variables (which keep it)."""
        self.stop_process("api")
        self.env = {**self.env, **env}
        self.start_cached_api()
        wait_for("api", lambda: http_ok(self.url("api", "/health/ready")))

    def start_worker(self):
        """Starts the worker and waits until it holds its partitions."""
        self.start("worker", [self.bin / "worker"], {**self.env, "WORKER_HTTP_PORT": str(self.ports["worker"])})
        wait_for("the worker's partitions", lambda: json.loads(urllib.request.urlopen(
            self.url("worker", "/health/ready"), timeout=2).read())["assigned"], 60)

    def use_topic(self, topic, **env):
        """Restarts the cached api and the worker on a topic and group of their own (plus `env`)."""
        if self.processes["worker"].poll() is None:
            self.stop_process("worker")
        self.restart_api(KAFKA_TOPIC=topic, KAFKA_GROUP_ID=topic, **env)
        self.start_worker()

    def pid(self, name):
        return self.processes[name].pid

    def url(self, name, path):
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def stop(self):
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        psql(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")


def seed(stack, users, events, ids_file):
    log(f"seeding {users} users and {events} events")
    # md5(n)::uuid ids let pgbench address the same rows as the HTTP load.
    psql(f"""INSERT INTO users (id, email, first_name, last_name, created_at, updated_at)
             SELECT md5(g::text)::uuid, 'seed' || g || '@example.com', 'First' || g, 'Last' || g,
                    now() - make_interval(secs => g), now() - make_interval(secs => g)
               FROM generate_series(1, {users}) g""", stack.db)
    psql(f"""INSERT INTO events (id, user_id, type, data, created_at)
             SELECT gen_random_uuid(), md5((1 + g % {users})::text)::uuid, 'seed', '{{"n":1}}', now()
               FROM generate_series(1, {events}) g""", stack.db)
    psql("ANALYZE", stack.db)
    ids = psql(f"SELECT id FROM users ORDER BY random() LIMIT {min(users, 20000)}", stack.db, capture=True)
    ids_file.write_text(ids + "\n")


def parse_duration_ms(text):
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]


def wrk(url, seconds, script=None, args=(), pid=None, connections=64):
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script:
        command += ["-s", str(BENCH / "lua" / script)]
    command.append(url)
    if args:
        command += ["--", *map(str, args)]
    cpu_before, pg_before = cpu_seconds(pid) if pid else 0, postgres_cpu_seconds()
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    cpu, pg_cpu = cpu_seconds(pid) - cpu_before if pid else 0, postgres_cpu_seconds() - pg_before
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    # Refused or broken connections mean the harness or a server is broken. Non-2xx answers (a 503 from
    # a saturated endpoint) and wrk's own 2 s client timeouts are results, reported per run.
    if errors and re.search(r"(connect|read|write) [1-9]", errors.group(1)):
        raise SystemExit(f"{url}: broken connections during the benchmark:\n{output}")
    failed = (int(non_2xx.group(1)) if non_2xx else 0) + int(re.search(r"timeout (\d+)", errors.group(1)).group(1) if errors else 0)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        "p50": parse_duration_ms(re.search(r"^\s+50%\s+(\S+)\s*$", output, re.M).group(1)),
        "p99": parse_duration_ms(re.search(r"^\s+99%\s+(\S+)\s*$", output, re.M).group(1)),
        "cpu_us": cpu / requests * 1e6 if pid and requests else None,
        "pg_cpu_us": pg_cpu / requests * 1e6 if requests else None,
        "failed": failed,
    }


# With the servers' connections (see Stack.start_apps) within PostgreSQL's default 100, one to spare for
# the harness's psql (which runs between measurements). 32 overran them once the traced api came (CI's
# smoke run failed to connect); 28 (until 2026-12-02 03:00) once the event writers got sessions of their
# own, which the readiness check opens in every api.
PGBENCH_CLIENTS = 25


def pgbench(db, script, seconds, users):
    pg_before = postgres_cpu_seconds()
    result = subprocess.run(
        ["pgbench", "-h", "127.0.0.1", "-U", "postgres", "-n", "-M", "prepared", "-c", str(PGBENCH_CLIENTS), "-j", "2",
         "-T", str(seconds), "-D", f"users={users}", "-f", str(BENCH / "sql" / script), db],
        # Plain TCP like the api's and the refserver's connections: libpq would otherwise negotiate TLS
        # (Debian's PostgreSQL has it on), and the ceiling would pay for encryption the service does not.
        capture_output=True, text=True, env={**os.environ, "PGSSLMODE": "disable"})
    if result.returncode != 0:
        # Who held PostgreSQL's connections (the usual cause: pools and pgbench over max_connections).
        held = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qtAc",
                               "SELECT coalesce(nullif(application_name, ''), usename) || ': ' || count(*) "
                               "FROM pg_stat_activity WHERE backend_type = 'client backend' GROUP BY 1 ORDER BY 1"],
                              capture_output=True, text=True)
        held = held.stdout or held.stderr
        raise SystemExit(f"pgbench {script} failed:\n{result.stdout}\n{result.stderr}\nconnections held:\n{held}")
    output = result.stdout
    pg_cpu = postgres_cpu_seconds() - pg_before
    transactions = int(re.search(r"number of transactions actually processed: (\d+)", output).group(1))
    latency = re.search(r"latency average = ([\d.]+) ms", output)
    return {"rps": float(re.search(r"tps = ([\d.]+)", output).group(1)),
            "p50": float(latency.group(1)) if latency else None, "p99": None, "cpu_us": None,
            "pg_cpu_us": pg_cpu / transactions * 1e6 if transactions else None, "failed": 0}


def deep_cursor(stack, rows):
    """The `next_cursor` after the first `rows` users, walked through the api as a client would."""
    cursor, walked = None, 0
    while walked < rows:
        limit = min(100, rows - walked)
        query = f"limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        with urllib.request.urlopen(stack.url("api_uncached", f"/api/v1/users?{query}"), timeout=10) as response:
            page = json.load(response)
        walked += len(page["users"])
        cursor = page["next_cursor"]
    return cursor


def measure_http(stack, args, ids_file, users):
    seconds, reps = (1, 1) if args.smoke else (6, 5)
    ids = str(ids_file)
    # Page 1000 of 10 starts after 9,990 rows; with `page=1000` PostgreSQL would skip them one by one.
    page1000 = deep_cursor(stack, min(9_990, users - 10))
    api, unc, ref, auth, traced = "api", "api_uncached", "ref", "api_auth", "api_traced"
    # One token, as a client sends until it expires; and 50,000 different ones (more than the api
    # remembers), so nearly every request has its signature checked.
    token, tokens = stack.tmp / "token", stack.tmp / "tokens"
    dev_token = [RELEASE / "dev-token", "users:read users:write", "--ttl", "7200"]
    token.write_text(subprocess.run(dev_token, check=True, capture_output=True, text=True).stdout)
    tokens.write_text(subprocess.run([*dev_token, "--count", "50000"], check=True, capture_output=True, text=True).stdout)
    # name → thunk returning a measurement; pairs are (service, ceiling, ratio name).
    runs = {
        "health": lambda: wrk(stack.url(api, "/health/live"), seconds, pid=stack.pid(api)),
        "static": lambda: wrk(stack.url(ref, "/static"), seconds, pid=stack.pid(ref)),
        "cached_get": lambda: wrk(stack.url(api, "/"), seconds, "get_by_id.lua", (ids, "/api/v1/users/"), stack.pid(api)),
        "redis_get": lambda: wrk(stack.url(ref, "/"), seconds, "get_by_id.lua", (ids, "/redis/"), stack.pid(ref)),
        "uncached_get": lambda: wrk(stack.url(unc, "/"), seconds, "get_by_id.lua", (ids, "/api/v1/users/"), stack.pid(unc)),
        "pgbench_select": lambda: pgbench(stack.db, "select_user.sql", seconds, users),
        "ref_pg_get": lambda: wrk(stack.url(ref, "/"), seconds, "get_by_id.lua", (ids, "/pg/"), stack.pid(ref)),
        "ref_post": lambda: wrk(stack.url(ref, "/echo"), seconds, "create_user.lua", (), stack.pid(ref)),
        "post_user": lambda: wrk(stack.url(api, "/api/v1/users"), seconds, "create_user.lua", (), stack.pid(api)),
        # The plain cached api under exactly the same load (it ignores the header): wrk's Lua costs the
        # shared cores the same in both, so the ratio is what the server does differently.
        "cached_get_with_header": lambda: wrk(stack.url(api, "/"), seconds, "get_by_id.lua",
                                              (ids, "/api/v1/users/", token), stack.pid(api)),
        "cached_get_auth": lambda: wrk(stack.url(auth, "/"), seconds, "get_by_id.lua", (ids, "/api/v1/users/", token),
                                       stack.pid(auth)),
        "cached_get_fresh_tokens": lambda: wrk(stack.url(auth, "/"), seconds, "get_by_id.lua",
                                               (ids, "/api/v1/users/", tokens), stack.pid(auth)),
        "post_user_auth": lambda: wrk(stack.url(auth, "/api/v1/users"), seconds, "create_user.lua", (token,),
                                      stack.pid(auth)),
        "cached_get_traced": lambda: wrk(stack.url(traced, "/"), seconds, "get_by_id.lua", (ids, "/api/v1/users/"),
                                         stack.pid(traced)),
        "pgbench_user": lambda: pgbench(stack.db, "create_user.sql", seconds, users),
        "post_event": lambda: wrk(stack.url(api, "/api/v1/events"), seconds, "create_event.lua", (ids,), stack.pid(api)),
        "pgbench_event": lambda: pgbench(stack.db, "create_event.sql", seconds, users),
        "list_page1": lambda: wrk(stack.url(unc, "/api/v1/users?page=1&limit=10"), seconds, pid=stack.pid(unc)),
        "list_page1000": lambda: wrk(stack.url(unc, f"/api/v1/users?cursor={page1000}&limit=10"), seconds, pid=stack.pid(unc)),
    }
    pairs = [("health", "static", "health_vs_static"), ("cached_get", "static", "cached_vs_static"),
             ("cached_get", "redis_get", "cached_vs_redis"), ("uncached_get", "pgbench_select", "uncached_vs_pgbench"),
             ("post_user", "pgbench_user", "post_user_vs_pgbench"), ("post_event", "pgbench_event", "post_event_vs_pgbench"),
             ("list_page1", "uncached_get", "list_vs_uncached"), ("list_page1000", "list_page1", "page1000_vs_page1"),
             ("uncached_get", "ref_pg_get", "uncached_vs_ref_pg"), ("ref_pg_get", "pgbench_select", "ref_pg_vs_pgbench"),
             ("post_user", "ref_post", "post_user_vs_echo"), ("redis_get", "static", "redis_vs_static"),
             ("cached_get_auth", "cached_get_with_header", "auth_cached_vs_plain"), ("post_user_auth", "post_user", "auth_post_vs_plain"),
             ("cached_get_fresh_tokens", "cached_get_with_header", "fresh_tokens_vs_plain"),
             ("cached_get_traced", "cached_get", "traced_cached_vs_plain")]
    log("warming up (fills the cache for the ids the load uses, warms both servers and PostgreSQL)")
    warm = 1 if args.smoke else 5
    wrk(stack.url(api, "/"), warm, "get_by_id.lua", (ids, "/api/v1/users/"))
    wrk(stack.url(unc, "/"), warm, "get_by_id.lua", (ids, "/api/v1/users/"))
    wrk(stack.url(auth, "/"), warm, "get_by_id.lua", (ids, "/api/v1/users/", token))
    wrk(stack.url(traced, "/"), warm, "get_by_id.lua", (ids, "/api/v1/users/"))
    wrk(stack.url(ref, "/static"), 1)
    results = {name: [] for name in runs}
    ratios = {ratio: [] for _, _, ratio in pairs}
    for rep in range(reps):
        log(f"repetition {rep + 1}/{reps}")
        measured = {}
        order = list(runs)
        if rep % 2:
            order.reverse()
        for name in order:
            measured[name] = runs[name]()
            results[name].append(measured[name])
        for service, ceiling, ratio in pairs:
            ratios[ratio].append(measured[service]["rps"] / measured[ceiling]["rps"])
    return results, ratios


def measure_worker(stack, args, ids_file):
    # The HTTP phase filled the topic with messages no figure here counts (every user_created of the
    # POST-user runs, every row pgbench inserted): the worker phases get a topic and group of their own,
    # so every message the worker handles is one of the events measured.
    wait_outbox_drained(stack)
    # The HTTP phase left hundreds of thousands of dead outbox rows and event versions; with autovacuum
    # off (this machine's PostgreSQL, conf.d/90-ci.conf) the relay's select would walk them in every
    # figure below (BENCHMARKS.md, "Where PostgreSQL's work per event goes", item 4). Reclaimed here,
    # as autovacuum would in production.
    psql("VACUUM (ANALYZE) outbox, events, user_event_stats", stack.db)
    # Every api runs the outbox relay; one left on the old topic could take the publisher lock and send
    # the measured events where the worker is not listening.
    for other in ("api_uncached", "api_auth", "api_traced"):
        stack.stop_process(other)
    stack.restart_api(KAFKA_TOPIC="bench-worker", KAFKA_GROUP_ID="bench-worker")
    # Idle: holding its partitions, nothing to do yet. Stopped again so that the backlog below builds
    # up. (It must not leave mid-join, so start_worker waits for the assignment: tansu's group
    # coordinator then never assigns the next member.)
    stack.start_worker()
    time.sleep(1)
    idle_rss = memory_kb(stack.pid("worker"), "VmRSS")
    stack.stop_process("worker")
    seconds = 2 if args.smoke else 10
    processed = "SELECT count(*), coalesce(extract(epoch FROM max(processed_at) - min(processed_at)), 0) FROM events" \
                " WHERE type = 'bench' AND status = 'processed' AND created_at > '{}'"

    log(f"worker: a backlog POSTed for {seconds}s with no worker running, then drained by the worker alone")
    marker = psql("SELECT now()", stack.db, capture=True)
    wrk(stack.url("api", "/api/v1/events"), seconds, "create_event.lua", (str(ids_file),), connections=32)
    wait_outbox_drained(stack)
    stack.start_worker()
    cpu_before, pg_before = cpu_seconds(stack.pid("worker")), postgres_cpu_seconds()
    drain(stack, marker, timeout=600)
    worker_cpu, pg_cpu = cpu_seconds(stack.pid("worker")) - cpu_before, postgres_cpu_seconds() - pg_before
    backlog, span = psql(processed.format(marker), stack.db, capture=True).split("|")
    backlog_rate = int(backlog) / max(float(span), 1e-3)
    # Where the drain's time goes: CPU per event of the worker and of PostgreSQL (nothing else runs).
    backlog_cpu_us = (worker_cpu / max(int(backlog), 1) * 1e6, pg_cpu / max(int(backlog), 1) * 1e6)

    log(f"worker: end-to-end throughput (POST as fast as possible for {seconds}s, until all processed)")
    marker = psql("SELECT now()", stack.db, capture=True)
    started = time.time()
    wrk(stack.url("api", "/api/v1/events"), seconds, "create_event.lua", (str(ids_file),), connections=32)
    drain(stack, marker, timeout=600)
    elapsed = time.time() - started
    events = int(psql(processed.format(marker), stack.db, capture=True).split("|")[0])
    throughput = events / elapsed

    rate = max(10, int(throughput / 2))
    # The producer's linger.ms trades publish latency for batching: the delay is measured at each value
    # of the sweep. Each on a topic of its own: tansu's in-memory log gets slower (and costs more CPU)
    # as a topic grows, which made whatever was measured last the slowest.
    delays = {}
    for linger in ((DEFAULT_LINGER_MS,) if args.smoke else LINGER_SWEEP_MS):
        log(f"worker: processing delay at a fixed {rate}/s (half the end-to-end throughput), linger.ms {linger}")
        stack.use_topic(f"bench-delay-{linger}", KAFKA_LINGER_MS=str(linger))
        # A fresh api first connects its producer and takes the outbox publisher lock over: a 2 s warm-up
        # run, then the measured one (the marker and the histogram snapshot are the last run's).
        for run_seconds in (2, seconds):
            marker, ages_before = psql("SELECT now()", stack.db, capture=True), stage_ages(stack)
            posted = subprocess.run([RELEASE / "fixed-rate", stack.url("api", ""), str(rate), str(run_seconds),
                                     str(ids_file)], check=True, capture_output=True, text=True).stdout.split()
            drain(stack, marker, timeout=300)
        ages_after = stage_ages(stack)
        p50, p99 = psql(f"""SELECT coalesce(percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP
                                     (ORDER BY extract(epoch FROM processed_at - created_at)), '{{0,0}}')::text
                              FROM events WHERE type = 'bench' AND created_at > '{marker}'""",
                        stack.db, capture=True).strip("{}").split(",")
        stages = {stage: tuple(age_quantile(ages_before, ages_after, stage, q) for q in (0.5, 0.99))
                  for stage in AGE_STAGES}
        delays[linger] = {"p50": float(p50) * 1000, "p99": float(p99) * 1000, "stages": stages,
                          "acknowledged": int(posted[0]), "refused": int(posted[1])}
    return {"events": events, "seconds": elapsed, "throughput": throughput, "fixed_rate": rate,
            "delay_p99_ms": delays[DEFAULT_LINGER_MS]["p99"], "delays": delays, "backlog": int(backlog),
            "backlog_rate": backlog_rate, "backlog_cpu_us": backlog_cpu_us, "idle_rss": idle_rss}


def stage_ages(stack):
    """The worker's `worker_event_age_seconds` buckets: {stage: {upper bound: cumulative count}}."""
    text = urllib.request.urlopen(stack.url("worker", "/metrics"), timeout=5).read().decode()
    stages = {}
    for labels, count in re.findall(r"^worker_event_age_seconds_bucket\{(.*)\} (\d+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        stages.setdefault(labels["stage"], {})[float(labels["le"])] = int(count)
    return stages


def age_quantile(before, after, stage, q):
    """Quantile `q` of the ages observed between two `stage_ages` snapshots, interpolated within its
    bucket the way Prometheus' histogram_quantile does."""
    buckets = sorted((bound, count - before.get(stage, {}).get(bound, 0))
                     for bound, count in after.get(stage, {}).items())
    total = buckets[-1][1] if buckets else 0
    if total == 0:
        return None
    rank, lower, below = q * total, 0.0, 0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1)
        lower, below = bound, count
    return lower


def wait_outbox_drained(stack):
    wait_for("the outbox to drain", lambda: psql("SELECT count(*) FROM outbox", stack.db, capture=True) == "0", 300)


def drain(stack, since, timeout):
    """Waits until the api's events created after `since` are processed and the outbox is empty."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pending = psql(f"SELECT (SELECT count(*) FROM events WHERE status = 'pending' AND type = 'bench'"
                       f" AND created_at > '{since}') + (SELECT count(*) FROM outbox)", stack.db, capture=True)
        if int(pending) == 0:
            return
        time.sleep(0.2)
    raise SystemExit("the pipeline did not drain in time")


def fmt(value, digits=0):
    return "–" if value is None else f"{value:,.{digits}f}"


def text_figures(results, ratios, worker):
    """The figures BENCHMARKS.md's explanations quote from this run."""
    ratio = {name: f"{statistics.median(values):.2f}" for name, values in ratios.items()}
    median = lambda name, key: statistics.median(r[key] for r in results[name])
    api_us, pg_us = median("post_event", "cpu_us"), median("post_event", "pg_cpu_us")
    per_event_us = api_us + pg_us + sum(worker["backlog_cpu_us"])
    delay_ok = "pass" if worker["delay_p99_ms"] < 250 else "FAIL"
    return {
        "HEALTH": f"{ratio['health_vs_static']} × static in this run", "CACHED_STATIC": ratio["cached_vs_static"],
        "REDIS_STATIC": ratio["redis_vs_static"], "CACHED_REDIS": ratio["cached_vs_redis"],
        "CACHED_NEEDED": f"{TARGETS['cached_vs_static'][0] / statistics.median(ratios['redis_vs_static']):.2f}",
        "UNCACHED": ratio["uncached_vs_pgbench"], "REF_PG": ratio["ref_pg_vs_pgbench"],
        "UNCACHED_REF": ratio["uncached_vs_ref_pg"], "LIST": ratio["list_vs_uncached"],
        "PAGE1000": ratio["page1000_vs_page1"], "POST_USER": ratio["post_user_vs_pgbench"],
        "POST_EVENT": ratio["post_event_vs_pgbench"], "AUTH_CACHED": ratio["auth_cached_vs_plain"],
        "AUTH_POST": ratio["auth_post_vs_plain"], "FRESH_TOKENS": ratio["fresh_tokens_vs_plain"],
        "TRACED_CACHED": ratio["traced_cached_vs_plain"],
        "OTLP_EXPORTS": f"{OtlpSink.exports:,} exports, {OtlpSink.export_bytes / 1e6:,.1f} MB", "E2E": f"{worker['throughput']:,.0f}",
        "POST_EVENT_API": f"{api_us:.0f}", "POST_EVENT_PG": f"{pg_us:.0f}",
        "DRAIN_CPU": f"{sum(worker['backlog_cpu_us']):.0f}", "E2E_CPU": f"{per_event_us:.0f}",
        "E2E_CORES": f"{per_event_us * 5000 / 1e6:.1f}",
        "DELAY": f"p99 {worker['delay_p99_ms']:.0f} ms at {worker['fixed_rate']:,}/s in this run: {delay_ok}",
    }


def report(args, results, ratios, worker, memory, users, events):
    lines = ["| measurement | req/s (median) | p50 ms | p99 ms | CPU µs/req | PostgreSQL CPU µs/req | non-2xx or timed out (all reps) |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        med = lambda key: statistics.median([r[key] for r in runs]) if runs and runs[0][key] is not None else None
        failed = sum(r["failed"] for r in runs)
        lines.append(f"| {name} | {fmt(med('rps'))} | {fmt(med('p50'), 2)} | {fmt(med('p99'), 2)} | {fmt(med('cpu_us'), 1)} | {fmt(med('pg_cpu_us'), 1)} | {failed} |")
    lines += ["", "| target | ratio (median of reps) | worst rep | goal | result |", "|---|---|---|---|---|"]
    failures = 0
    for ratio, goal_and_description in TARGETS.items():
        goal, description = goal_and_description
        median, worst = statistics.median(ratios[ratio]), min(ratios[ratio])
        ok = median >= goal
        failures += not ok
        lines.append(f"| {description} | {median:.2f} | {worst:.2f} | ≥ {goal:.2f} | {'pass' if ok else 'FAIL'} |")
    lines += ["", "| context (no goal) | ratio (median of reps) | worst rep |", "|---|---|---|"]
    for ratio, description in CONTEXT.items():
        lines.append(f"| {description} | {statistics.median(ratios[ratio]):.2f} | {min(ratios[ratio]):.2f} |")
    worker_ok = worker["backlog_rate"] >= 5000
    e2e_ok = worker["throughput"] >= 5000
    delay_ok = worker["delay_p99_ms"] < 250
    lines += ["", "| worker | value | goal | result |", "|---|---|---|---|",
              f"| worker throughput (a backlog in Kafka → processed; CPU per event: worker {worker['backlog_cpu_us'][0]:.0f} µs, PostgreSQL {worker['backlog_cpu_us'][1]:.0f} µs) | {worker['backlog_rate']:,.0f} events/s ({worker['backlog']} events) | ≥ 5,000 | {'pass' if worker_ok else 'FAIL'} |",
              f"| end-to-end throughput (POST → processed, api and worker on the same 2 cores) | {worker['throughput']:,.0f} events/s ({worker['events']} in {worker['seconds']:.1f} s) | ≥ 5,000 | {'pass' if e2e_ok else 'FAIL'} |",
              f"| p99 processing delay at {worker['fixed_rate']}/s | {worker['delay_p99_ms']:.0f} ms | < 250 ms | {'pass' if delay_ok else 'FAIL'} |"]
    lines += ["", f"| producer linger.ms (delay at {worker['fixed_rate']}/s) | p50 ms | p99 ms | POSTs refused "
              "| age at publish p50 / p99 ms | at receipt | at commit (histogram) |", "|---|---|---|---|---|---|---|"]
    for linger, delay in worker["delays"].items():
        default = " (default)" if linger == DEFAULT_LINGER_MS else ""
        ages = " | ".join(f"{fmt(p50 and p50 * 1000)} / {fmt(p99 and p99 * 1000)}"
                          for p50, p99 in (delay["stages"][stage] for stage in AGE_STAGES))
        lines.append(f"| {linger}{default} | {delay['p50']:.0f} | {delay['p99']:.0f} | "
                     f"{delay['refused']} of {delay['acknowledged'] + delay['refused']} | {ages} |")
    lines += ["", "| memory (RSS) | MB | goal | result |", "|---|---|---|---|"]
    for name, (value, goal) in memory.items():
        lines.append(f"| {name} | {value / 1024:.1f} | < {goal} | {'pass' if value / 1024 < goal else 'FAIL'} |")
    table = "\n".join(lines)
    print(table)
    # Rendered in smoke runs too, so that a figure the text names but the run lacks fails CI.
    machine = f"{platform.node()}: {os.cpu_count()} cores, {platform.platform()}"
    text = (BENCH / "BENCHMARKS.template.md").read_text()
    text = text.replace("{{TABLE}}", table).replace("{{MACHINE}}", machine)
    text = text.replace("{{DATE}}", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    text = text.replace("{{DATA}}", f"{users:,} users, {events:,} events")
    for name, value in text_figures(results, ratios, worker).items():
        text = text.replace("{{" + name + "}}", value)
    if unfilled := sorted(set(re.findall(r"\{\{(\w+)\}\}", text))):
        raise SystemExit(f"BENCHMARKS.template.md names figures this run does not have: {unfilled}")
    if not args.smoke:
        (ROOT / "BENCHMARKS.md").write_text(text)
        log("wrote BENCHMARKS.md")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="every step briefly; asserts nothing about speed")
    args = parser.parse_args()
    users, events = (2_000, 2_000) if args.smoke else (100_000, 100_000)
    with tempfile.TemporaryDirectory(prefix="hlms-bench-") as tmp:
        tmp = Path(tmp)
        stack = Stack(tmp)
        try:
            ids_file = tmp / "ids.txt"
            seed(stack, users, events, ids_file)
            stack.start_apps()
            time.sleep(1)
            memory = {"api idle": (memory_kb(stack.pid("api"), "VmRSS"), 40)}
            results, ratios = measure_http(stack, args, ids_file, users)
            memory["api under 64-connection load (peak)"] = (memory_kb(stack.pid("api"), "VmHWM"), 80)
            worker = measure_worker(stack, args, ids_file)
            memory["worker idle"] = (worker["idle_rss"], 60)
            memory["worker (peak)"] = (memory_kb(stack.pid("worker"), "VmHWM"), 60)
            report(args, results, ratios, worker, memory, users, events)
        except BaseException:
            for log_file in sorted(tmp.glob("*.log")):
                print(f"--- {log_file.name} (tail)", file=sys.stderr)
                print("\n".join(log_file.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
            raise
        finally:
            stack.stop()
    log("benchmark complete")


if __name__ == "__main__":
    main()
