"""After a benchmark run: every request the harness counted for cheapproxy must
be in the usage table as a success, charged once, and balance == sum(ledger)."""

import json
import pathlib
import sqlite3
import sys
from decimal import Decimal

cfg, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
db = sqlite3.connect(cfg.parent / "bench.db")
statuses = dict(db.execute("SELECT status, count(*) FROM usage GROUP BY status").fetchall())
dupes = db.execute("SELECT count(*) FROM (SELECT reference FROM ledger WHERE kind='charge' GROUP BY reference HAVING count(*) > 1)").fetchone()[0]
charges = db.execute("SELECT count(*) FROM ledger WHERE kind='charge'").fetchone()[0]
open_holds = db.execute("SELECT count(*) FROM holds WHERE state='open'").fetchone()[0]
# a clean shutdown applies the charge queue: nothing may be left in it
queued = db.execute("SELECT count(*) FROM charge_queue").fetchone()[0]
bal = db.execute("SELECT u.balance, (SELECT sum(amount) FROM ledger l WHERE l.user_id=u.id) FROM users u WHERE name='bench'").fetchone()
made = 0
res = out / "results.jsonl"
if res.exists():
    for line in res.read_text().splitlines():
        r = json.loads(line)
        if r.get("target") == "custom":
            made += int(r.get("requests") or r.get("n") or 0)
print(f"usage rows by status: {statuses}; charge rows {charges}; duplicate charges {dupes}; open holds {open_holds}; "
      f"balance {bal[0]} == ledger sum {bal[1]}: {bal[0] == bal[1]}; left in the charge queue {queued}; "
      f"harness-counted requests {made}")
# "cancelled" rows are the bounded runs' last requests, cut by the load
# generator at its deadline (a client disconnect): they must not be charged twice
# or left holding money, which the other checks cover
bad = {k: v for k, v in statuses.items() if k not in ("ok", "cancelled")}
if dupes or open_holds or queued or bal[0] != bal[1] or bad:
    sys.exit("charge check FAILED")
