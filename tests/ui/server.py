"""An Airflow API server with the plugin, a real run behind it, and users to log in as.

It reuses the scheduler tier's :class:`~tests.scheduler.test_real_scheduler.Deployment`
(its own home, PostgreSQL metadata, every process stopped afterwards) but starts the API
server alone: the plugin is served there, and the rows come from ``dag.test()`` runs of
``dags/ui_dags.py`` (the e2e tier's driver, in a subprocess) plus items the test puts in
the states a finished run leaves none in (ready, claimed, expired) through the ledger's API.
The auth manager is :class:`tests.ui.auth.OneDagDenied`; the plugin is found through the
package's ``airflow.plugins`` entry point, as in any installation.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from exclusive_xcom.ledger import ITEMS, Claimant, ClaimRequest, Ledger, Output, Production, Written, create_engine
from exclusive_xcom.ledger.types import consumer_slot
from exclusive_xcom.payload import MAGIC
from tests.conftest import require_server
from tests.e2e.harness import run_driver
from tests.scheduler.test_real_scheduler import Deployment, _api_healthy, _wait_for
from tests.support import SERVERS, throwaway_database
from tests.ui.auth import DENIED_DAG

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = Path(__file__).parent / "dags" / "ui_dags.py"
OPEN_DAG = "ui_open"
SECRET_DAG = DENIED_DAG
DAGS = (OPEN_DAG, SECRET_DAG)
#: user -> (role, password); "outsider" may not see SECRET_DAG (tests/ui/auth.py)
USERS = {
    "admin": ("admin", "admin-pw"),
    "op": ("user", "op-pw"),
    "viewer": ("viewer", "viewer-pw"),
    "outsider": ("user", "outsider-pw"),
}
PREFIX = "/exclusive-xcom"
#: What must never appear in a response: the DAGs' item values and the seeded payloads.
SECRETS = ("secret-order", "secret-payload", "file://", "payload_uri", "tests-secret-key")
START_DEADLINE = 120.0


class ApiServer(Deployment):
    """The deployment's API server only (no scheduler: the runs are ``dag.test()``'s)."""

    def start(self) -> None:
        out = (self.home / "api-server.out").open("wb")
        self.procs["api-server"] = subprocess.Popen(
            [sys.executable, "-m", "airflow", "api-server", "--port", str(self.port), "--host", "127.0.0.1"],
            env=self.env,
            cwd=self.home,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()

    def output(self) -> str:
        return (self.home / "api-server.out").read_text(errors="replace")


@dataclass
class UIServer:
    """A running API server with the plugin; ``runs``: dag_id -> the run_id of its real run."""

    deployment: ApiServer
    ledger_url: str
    runs: dict[str, str]
    seeded: dict[str, dict[str, int]]  # dag_id -> {"claimed": id, "expired": id, "ready": id}
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.deployment.port}"

    def token(self, user: str) -> str:
        if user not in self.tokens:
            response = httpx.post(
                f"{self.base}/auth/token", json={"username": user, "password": USERS[user][1]}, timeout=30
            )
            assert response.status_code == 201, response.text
            self.tokens[user] = response.json()["access_token"]
        return self.tokens[user]

    def client(self, user: str | None) -> httpx.Client:
        """A client of the plugin's app, as ``user`` (None: anonymous)."""
        headers = {"Authorization": f"Bearer {self.token(user)}"} if user else {}
        return httpx.Client(base_url=f"{self.base}{PREFIX}", headers=headers, timeout=60)


def seed(ledger_url: str, runs: dict[str, str]) -> dict[str, dict[str, int]]:
    """In each DAG's run, an output of four items: one claimed (a live lease), one claimed
    long ago (its lease expired), two ready (one sealed in the encrypted format's header)."""
    engine = create_engine(ledger_url)
    seeded = {}
    try:
        for dag_id, run_id in runs.items():
            consumers = (consumer_slot(dag_id, "work"), consumer_slot(dag_id, "audit"))
            written = Written(Output(dag_id, run_id, "seeded"), 1, ITEMS, consumers)
            payloads = [b"secret-payload-0", b"secret-payload-1", MAGIC + b"secret-payload-2", b"secret-payload-3"]
            Ledger(engine).produce(Production(written, payloads))
            live = Ledger(engine, lease_seconds=3600).claim(
                Claimant(dag_id, run_id, "work", try_number=2), [ClaimRequest(written, 1)]
            )
            past = Ledger(engine, lease_seconds=60, clock=lambda: time.time() - 7200).claim(
                Claimant(dag_id, run_id, "audit"), [ClaimRequest(written, 1)]
            )
            rows = Ledger(engine).items(dag_id=dag_id, task_id="seeded", state="ready")
            seeded[dag_id] = {"claimed": live.ids[0], "expired": past.ids[0], "ready": rows[0]["id"]}
    finally:
        engine.dispose()
    return seeded


@contextmanager
def ui_server(home: Path) -> Iterator[UIServer]:
    """Metadata and ledger databases, the real runs, the seeded items, the API server; all gone afterwards."""
    require_server("postgres")
    with ExitStack() as stack:
        metadata_url = stack.enter_context(throwaway_database(SERVERS["postgres"], prefix="meta"))
        ledger_url = stack.enter_context(throwaway_database(SERVERS["postgres"], prefix="exx"))
        deployment = ApiServer(home, metadata_url, ledger_url, (DAG_FILE,))
        passwords = home / "passwords.json"
        passwords.write_text(json.dumps({user: pw for user, (_, pw) in USERS.items()}))
        deployment.env.update(
            AIRFLOW__CORE__AUTH_MANAGER="tests.ui.auth.OneDagDenied",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=",".join(f"{u}:{role}" for u, (role, _) in USERS.items()),
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
            PYTHONPATH=str(REPO),  # the auth manager above, and this work tree's package
        )
        deployment.cli("db", "migrate", timeout=180)
        result = run_driver(home, [DAG_FILE], [{"dag_id": d} for d in DAGS], deployment.env)
        runs = {run.dag_id: run.run_id for run in result.runs}
        assert all(run.state == "success" for run in result.runs), result.tail()
        seeded = seed(ledger_url, runs)
        stack.callback(deployment.stop)
        deployment.start()
        _wait_for("the API server", lambda: _api_healthy(deployment.port), START_DEADLINE, deployment)
        yield UIServer(deployment, ledger_url, runs, seeded)


def get(client: httpx.Client, path: str, **params: Any) -> httpx.Response:
    return client.get(path, params={k: v for k, v in params.items() if v is not None})
