"""ETL hand-off: each stage's output is read once, by the next stage only.

Run it alone with ``python example_dags/exclusive_etl.py`` (needs a migrated Airflow
metadata DB and this folder as ``[core] dags_folder``; ``python example_dags/demo.py``
sets all of that up for you).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from exclusive_xcom import exclusive_task


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["exclusive_xcom"])
def exclusive_etl():
    @exclusive_task(consumers=["transform"])  # only `transform` may read this, once
    def extract() -> dict:
        return {"rows": [{"id": i, "amount": i * 10} for i in range(1, 6)]}

    @exclusive_task(consumers=["load"])
    def transform(raw: dict) -> dict:  # `raw` is claimed through the ledger before this runs
        return {"n": len(raw["rows"]), "total": sum(r["amount"] for r in raw["rows"])}

    @exclusive_task  # bare form: claims its input, its own output is an ordinary XCom
    def load(clean: dict) -> int:
        print(f"loaded {clean['n']} rows, total {clean['total']}")
        return clean["n"]

    load(transform(extract()))


dag_object = exclusive_etl()

if __name__ == "__main__":
    dag_object.test()
