"""The Airflow plugin: mounts the ledger's app in the API server and adds the UI's entries.

Registered through the ``airflow.plugins`` entry point, so installing the package is
enough (nothing is copied into ``plugins/``). The pages are Airflow *external views*, shown
in the UI's iframe: one under Browse, one tab on each DAG run and task instance, filtered
to it (the UI fills in ``{DAG_ID}``, ``{RUN_ID}``, ``{TASK_ID}`` and ``{MAP_INDEX}``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.plugins_manager import AirflowPlugin

if TYPE_CHECKING:
    from fastapi import FastAPI

#: Where the app is mounted in the API server.
URL_PREFIX = "/exclusive-xcom"
NAME = "Exclusive outputs"


def external_views(prefix: str = URL_PREFIX) -> list[dict[str, Any]]:
    """The UI's entries: a page under Browse, a tab per DAG run and per task instance."""
    run = f"{prefix}/?dag_id={{DAG_ID}}&run_id={{RUN_ID}}"
    return [
        {
            "name": NAME,
            "href": f"{prefix}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "exclusive-outputs",
        },
        {"name": NAME, "href": run, "destination": "dag_run", "url_route": "exclusive-outputs-run"},
        {
            "name": NAME,
            "href": f"{run}&task_id={{TASK_ID}}&map_index={{MAP_INDEX}}",
            "destination": "task_instance",
            "url_route": "exclusive-outputs-task",
        },
    ]


class LedgerApp:
    """The ASGI app the API server mounts: :func:`~exclusive_xcom.ui.api.create_app`, built
    on the first request. Every Airflow process loads plugins (task processes too); only
    the API server should pay for importing FastAPI and Airflow's security code."""

    def __init__(self) -> None:
        self._app: FastAPI | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            from exclusive_xcom.ui.api import create_app

            self._app = create_app()
        await self._app(scope, receive, send)


class ExclusiveXComPlugin(AirflowPlugin):
    name = "exclusive_xcom"
    fastapi_apps = [{"app": LedgerApp(), "url_prefix": URL_PREFIX, "name": NAME}]
    external_views = external_views()
