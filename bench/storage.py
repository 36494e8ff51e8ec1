"""Storage benchmark: bytes on disk per report and write cost, the compact layout (schema 5) against schema 4's.

N simulated machines (``fleet simulate``'s random walks: the metrics and inventory of a real agent) report
every ``--interval`` s for ``--hours`` hours of agent time; each report goes, in arrival order and in
batches of ``--batch`` (as the collector writes), into two databases per engine:

- ``v4``: schema 4's reports table, one text-keyed row per report with its raw JSON payload, written with
  that version's INSERT (tests/v4_layout.py): the baseline, measured in the same run;
- ``v5``: today's layout, written through the collector's own code (collector.history.write_batch).

``--convert`` then converts each ``v4`` database in place (migration 5, as an upgraded fleet does at
start; SQLite's file vacuumed after) and measures the conversion's rate and the result. ``--custom N``
adds N custom series and 2 process counts to every report (textfile metrics, process checks).
Bytes per report are the history tables with their indexes (SQLite: dbstat; PostgreSQL:
pg_total_relation_size after VACUUM) per stored report, as ``fleet db info`` shows them; disk a day is for
1,000 agents at 10 s (8.64 million reports).

    python3 bench/storage.py --machines 2000 --hours 1 --database sqlite --database postgres
    python3 bench/storage.py --machines 2000 --hours 1 --custom 5 --database sqlite
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table  # noqa: E402
from fleet.agent.simulate import SimAgent, SimStats  # noqa: E402
from fleet.collector import history  # noqa: E402
from fleet.config import payloads  # noqa: E402
from fleet.config.settings import Settings  # noqa: E402
from fleet.config.topics import report_topic  # noqa: E402
from fleet.store.database import Database, open_database, sqlite_url  # noqa: E402
from fleet.store.maintenance import HISTORY_TABLES, database_info, vacuum  # noqa: E402
from fleet.store.samples import SampleIds  # noqa: E402
from tests import v4_layout  # noqa: E402

ORG = "acme"
REPORTS_A_DAY_PER_1000 = 1000 * 86_400 / 10


def reports(machines: int, hours: float, interval: float, custom: int, seed: int):
    """(report, received, raw JSON) in arrival order: every machine once per interval."""
    rng = random.Random(seed)
    agents = [SimAgent(i, Settings(), SimStats(target=machines), rng) for i in range(machines)]
    session = {a.machine: f"{rng.getrandbits(64):016x}" for a in agents}
    start = time.time() - hours * 3600
    for step in range(int(hours * 3600 / interval)):
        for index, agent in enumerate(agents):
            ts = start + step * interval + index * interval / machines + rng.random() / 100
            metrics = agent.metrics(interval)
            if custom:
                metrics["custom"] = {f"app_requests_{i}": round(rng.uniform(0, 1000), 1) for i in range(custom)}
                metrics["process_counts"] = {"nginx": rng.randint(1, 8), "postgres": rng.randint(5, 30)}
            raw = payloads.encode(payloads.build_report(agent.machine, agent.hw_id, session[agent.machine], step, ts,
                                                        metrics, agent.system))
            yield payloads.parse_report(raw, report_topic(ORG, agent.machine)), ts + 0.05, raw.decode()


def write(db: Database, layout: str, items: list, ids: SampleIds) -> None:
    """One batch, as that layout's collector wrote it."""
    if layout == "v4":
        v4_layout.store(db, items)
    else:
        history.write_batch(db, history.Batch(reports=[history.report_row(r, received) for r, received, _ in items]),
                            time.time(), ids=ids)


def history_bytes(url: str, layout: str) -> tuple[int, int]:
    """(bytes of the history tables with their indexes, reports stored)."""
    with open_database(url, migrate=False) as db:
        if db.engine == "postgresql":
            db.execute("VACUUM ANALYZE")
    info = database_info(url)
    tables = {t.name: t for t in info.tables}
    if layout == "v4":
        return tables["reports"].bytes or 0, tables["reports"].rows
    return sum(tables[name].bytes or 0 for name in HISTORY_TABLES), tables["samples"].rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--machines", type=int, default=2000)
    parser.add_argument("--hours", type=float, default=1.0, help="hours of agent time to store")
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=500, help="reports per write transaction")
    parser.add_argument("--custom", type=int, default=0, help="custom series per report (and 2 process counts)")
    parser.add_argument("--database", action="append", choices=("sqlite", "postgres"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--convert", action="store_true",
                        help="then convert the v4 database in place (migration 5) and measure it")
    args = parser.parse_args()
    engines = args.database or ["sqlite"]
    server = None
    if "postgres" in engines:
        from tests.postgres import PostgresServer, unavailable_reason
        if reason := unavailable_reason():
            raise SystemExit(f"--database postgres: {reason}")
        server = PostgresServer().start()
    columns: dict[str, dict[str, str]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="fleet-bench-storage-") as tmp:
            urls = {}
            for engine in engines:
                for layout in ("v4", "v5"):
                    urls[(engine, layout)] = (sqlite_url(Path(tmp) / f"{layout}.db") if engine == "sqlite"
                                              else server.database())
            dbs = {}
            for key, url in urls.items():
                dbs[key] = open_database(url, migrate=key[1] == "v5")
                if key[1] == "v4":
                    v4_layout.create(dbs[key])
            ids = {key: SampleIds() for key in urls}
            spent = dict.fromkeys(urls, 0.0)
            batch: list = []
            count = 0

            def flush() -> None:
                for key, db in dbs.items():
                    began = time.perf_counter()
                    write(db, key[1], batch, ids[key])
                    spent[key] += time.perf_counter() - began
                batch.clear()

            for item in reports(args.machines, args.hours, args.interval, args.custom, args.seed):
                batch.append(item)
                count += 1
                if len(batch) >= args.batch:
                    flush()
            flush()
            for db in dbs.values():
                db.close()
            for (engine, layout), url in list(urls.items()):
                size, stored = history_bytes(url, layout)
                per_report = size / stored
                columns[f"{engine} {layout}"] = {
                    "reports stored": f"{stored:,}", "bytes per report": f"{per_report:,.0f}",
                    "write µs per report": f"{spent[(engine, layout)] / count * 1e6:.1f}",
                    "disk a day, 1,000 agents at 10 s": f"{per_report * REPORTS_A_DAY_PER_1000 / 1e9:.2f} GB"}
                if layout == "v4" and args.convert:
                    began = time.perf_counter()
                    open_database(url).close()  # migration 5 converts the old rows in place
                    took = time.perf_counter() - began
                    if engine == "sqlite":
                        vacuum(url)
                    size, stored = history_bytes(url, "v5")
                    columns[f"{engine} v4 converted"] = {
                        "reports stored": f"{stored:,}", "bytes per report": f"{size / stored:,.0f}",
                        "write µs per report": f"conversion: {stored / took:,.0f} reports/s",
                        "disk a day, 1,000 agents at 10 s": f"{size / stored * REPORTS_A_DAY_PER_1000 / 1e9:.2f} GB"}
    finally:
        if server is not None:
            server.destroy()
    print(f"{args.machines} machines, {args.hours:g} h at {args.interval:g} s, {args.custom} custom series,"
          f" batches of {args.batch}")
    print_table("history layout", columns)


if __name__ == "__main__":
    main()
