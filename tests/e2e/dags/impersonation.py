"""Impersonation within one team: a plain task claims and consumes as the named consumers would.

Airflow 3 lets a task's code act for other tasks (apache/airflow#60125), so nothing in the
worker can refuse this; ``exclusive-xcom audit`` must find it afterwards. ``attacker`` takes
``secret_a`` through ``open_session`` with a made-up task instance of ``victim_a`` (an id
Airflow never ran), and ``secret_b`` through the ledger itself with a made-up ``Claimant``
naming ``victim_b`` but carrying the attacker's own task-instance id and host. The victims
then fail (their inputs are gone); ``extract`` reaches ``load`` untouched.
``e2e_impersonation_clean`` is the same DAG without the attacker.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pendulum
from airflow.sdk import dag, task

from exclusive_xcom import exclusive_task

FORGED_TI_ID = "0190d5f0-0bad-7bee-8000-00000000beef"  # a task-instance id Airflow never ran
HANDLE_KEY = "__exclusive__handle"


@task(retries=0)
def attacker(ti=None) -> int:
    from exclusive_xcom import handle as handles
    from exclusive_xcom.runtime import claimant_of, open_session
    from exclusive_xcom.wiring import env

    # secret_a: the session victim_a would open, for a task instance made up on the spot.
    fake = SimpleNamespace(
        dag_id=ti.dag_id, run_id=ti.run_id, task_id="victim_a", map_index=-1, try_number=1, id=FORGED_TI_ID
    )
    found = ti.xcom_pull(task_ids="secret_a", key=HANDLE_KEY)
    session = open_session({"ti": fake}, [found])
    session.claim([found], batch_size=100, max_items=None)
    session.finish()

    # secret_b: the ledger itself, with a claimant naming victim_b (this task's own id and host).
    forged = replace(claimant_of({"ti": ti}), task_id="victim_b")
    current = env()
    h = handles.parse(ti.xcom_pull(task_ids="secret_b", key=HANDLE_KEY), current.keyring, forged.slot)
    taken = current.ledger.claim(forged, [h.request()]).ids
    current.ledger.finish(forged, taken)
    return 1 + len(taken)


def pipeline(dag_id: str, attack: bool):
    @dag(dag_id=dag_id, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
    def build():
        @exclusive_task(consumers=["load"])
        def extract() -> dict:
            return {"rows": 3}

        @exclusive_task
        def load(batch: dict) -> int:
            return batch["rows"]

        @exclusive_task(consumers=["victim_a"])
        def secret_a() -> dict:
            return {"card": "4111-1111-1111-1111"}

        @exclusive_task(consumers=["victim_b"])
        def secret_b() -> dict:
            return {"token": "t0k3n"}

        @exclusive_task(retries=0)
        def victim_a(card: dict) -> int:
            return len(card)

        @exclusive_task(retries=0)
        def victim_b(token: dict) -> int:
            return len(token)

        load(extract())
        a, b = secret_a(), secret_b()
        victims = [victim_a(a), victim_b(b)]
        if attack:
            thief = attacker()
            [a, b] >> thief >> victims  # ordering edges only: nothing refuses them when the DAG is parsed

    return build()


attacked = pipeline("e2e_impersonation", attack=True)
clean = pipeline("e2e_impersonation_clean", attack=False)
