"""The plugin's FastAPI app: the page and the JSON behind it, each route behind Airflow's auth manager.

Airflow mounts a plugin's app without the API server's own security dependencies, so every
route here depends on them itself: :data:`GetUserDep` (no user: 401; a bad token: 403) and
``requires_access_dag`` (the ``dag_id`` of the path or the query; reading needs ``GET``,
acting ``PUT``, which a viewer does not have). A listing is then narrowed to the DAGs the
auth manager says the user may read, so no row of another DAG is ever sent, whatever the
filters. Rows are the ledger's, read through :class:`~exclusive_xcom.ledger.admin.Admin`:
never a payload, never a blob URI (only whether the payload is offloaded and whether it is
sealed by the encrypted format), nothing decrypted.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at
# runtime, and Airflow's dependencies (imported inside create_app, in the API server only)
# must then be resolvable where the routes are defined.
import json
import logging
from datetime import datetime
from functools import lru_cache
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, StringConstraints

from exclusive_xcom.errors import ExclusiveXComError, mask_secrets
from exclusive_xcom.ledger import Ledger
from exclusive_xcom.ledger.queries import VIEW_STATES
from exclusive_xcom.ledger.schema import CLAIMED

log = logging.getLogger("exclusive_xcom.ui")

#: Rows one page holds at most.
MAX_PAGE = 500
#: The largest id a ledger can hold (a signed 64-bit primary key): a cursor beyond is refused, not sent.
MAX_ID = 2**63 - 1

ViewState = Literal["ready", "claimed", "expired", "released", "consumed"]
assert set(VIEW_STATES) == set(ViewState.__args__)  # type: ignore[attr-defined]
# As long as the ledger's columns; no NUL (PostgreSQL refuses it in text, so it could only fail).
Name = Annotated[str, StringConstraints(min_length=1, max_length=250, pattern=r"^[^\x00]+$")]


class ItemView(BaseModel):
    """One ledger row as people see it: who produced it, who holds or consumed it, no payload."""

    id: int
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    key: str
    mode: str
    consumers: list[str]
    slot: str
    seq: int
    state: ViewState = Field(
        description=(
            "ready (never claimed), claimed (live lease), expired (lease ran out), "
            "released (claimed, then given back), consumed"
        )
    )
    owner_dag_id: str | None
    owner_run_id: str | None
    owner_task_id: str | None
    owner_map_index: int | None
    owner_try: int | None
    owner_host: str | None
    created_at: datetime
    claimed_at: datetime | None
    lease_expires_at: datetime | None
    consumed_at: datetime | None
    size: int = Field(description="payload bytes (as stored)")
    offloaded: bool = Field(description="the payload is in object storage, not in the ledger row")
    encrypted: bool | None = Field(description="the stored payload is sealed; null: not in the row to tell")


class ItemPage(BaseModel):
    items: list[ItemView]
    next_before_id: int | None = Field(description="pass as before_id for the next page; null: no more")


class Summary(BaseModel):
    counts: dict[str, int] = Field(description="rows by state (ready, claimed, expired, released, consumed)")
    oldest_unconsumed: datetime | None


class Confirmation(BaseModel):
    """Actions change the ledger only when the request says so."""

    confirm: Literal[True]


class ActionResult(BaseModel):
    count: int
    message: str


def create_app() -> FastAPI:
    """The app the plugin mounts; every route requires a user and DAG access (see the module)."""
    from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag

    app = FastAPI(
        title="exclusive_xcom",
        description="Exclusive outputs and claims of the claim ledger, per DAG the user may read.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind a login like every other route
    )

    def sane_dag_id(request: Request, _user: GetUserDep) -> None:
        """A ``dag_id`` Airflow's check can look up: ``requires_access_dag`` reads the DAG's
        team from the metadata DB, and PostgreSQL refuses a NUL in text (a 500 otherwise)."""
        dag_id = request.path_params.get("dag_id") or request.query_params.get("dag_id") or ""
        if "\x00" in dag_id or len(dag_id) > 250:
            raise HTTPException(422, "dag_id: at most 250 characters, no NUL")

    can_read = [Depends(sane_dag_id), Depends(requires_access_dag("GET"))]
    can_edit = [Depends(sane_dag_id), Depends(requires_access_dag("PUT"))]

    @app.exception_handler(ExclusiveXComError)
    async def _ledger_failed(_request: Request, exc: ExclusiveXComError) -> JSONResponse:
        return JSONResponse({"detail": mask_secrets(f"{type(exc).__name__}: {exc}")}, status_code=503)

    @app.get("/", response_class=HTMLResponse, dependencies=can_read, include_in_schema=False)
    def page(_user: GetUserDep) -> str:
        return _page()

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_user: GetUserDep) -> dict[str, Any]:
        return app.openapi()

    @app.get("/api/items", dependencies=can_read)
    def items(
        user: GetUserDep,
        dag_id: Annotated[Name | None, Query()] = None,
        run_id: Annotated[Name | None, Query()] = None,
        task_id: Annotated[Name | None, Query(description="the producing task")] = None,
        claimed_by: Annotated[
            Name | None, Query(description="a task of the run that claimed (needs dag_id, run_id)")
        ] = None,
        state: ViewState | None = None,
        before_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    ) -> ItemPage:
        """A page of items, newest first; DAGs the user may not read are left out."""
        filters = _filters(user, dag_id, run_id, task_id, claimed_by)
        rows = _reader().browse(limit=limit + 1, sealed_prefix=_sealed(), state=state, before_id=before_id, **filters)
        more = len(rows) > limit
        rows = rows[:limit]
        return ItemPage(items=[_view(r) for r in rows], next_before_id=rows[-1]["id"] if more else None)

    @app.get("/api/summary", dependencies=can_read)
    def summary(
        user: GetUserDep,
        dag_id: Annotated[Name | None, Query()] = None,
        run_id: Annotated[Name | None, Query()] = None,
        task_id: Annotated[Name | None, Query()] = None,
        claimed_by: Annotated[Name | None, Query()] = None,
    ) -> Summary:
        """Counts by state and the oldest unconsumed item, under the same filters as the items."""
        return Summary(**_reader().browse_counts(**_filters(user, dag_id, run_id, task_id, claimed_by)))

    @app.post("/api/dags/{dag_id}/items/{item_id}/release", dependencies=can_edit)
    def release(
        user: GetUserDep,
        dag_id: Annotated[Name, Path()],
        item_id: Annotated[int, Path(ge=1, le=MAX_ID)],
        _confirmed: Confirmation,
    ) -> ActionResult:
        """Free a stuck claim whoever holds it (as ``exclusive-xcom release``)."""
        from exclusive_xcom.config import load_settings
        from exclusive_xcom.wiring import env_for

        ledger = env_for(load_settings()).ledger
        found = ledger.items(item_id=item_id)
        if not found or found[0]["dag_id"] != dag_id:
            raise HTTPException(404, f"no item {item_id} in DAG {dag_id}")
        row = found[0]
        if row["state"] != CLAIMED:
            raise HTTPException(409, f"item {item_id} is {row['state']}, not claimed: nothing to release")
        released = ledger.release_any([item_id])
        holder = f"{row['owner_dag_id']}/{row['owner_run_id']}/{row['owner_task_id']}[{row['owner_map_index']}]"
        log.warning(
            "exclusive_xcom: user %s released item %d of %s/%s/%s, claimed by %s try %s",
            user.get_name(),
            item_id,
            row["dag_id"],
            row["run_id"],
            row["task_id"],
            holder,
            row["owner_try"],
        )
        return ActionResult(count=released, message=f"released item {item_id} (held by {holder})")

    @app.post("/api/dags/{dag_id}/runs/{run_id}/purge", dependencies=can_edit)
    def purge(
        user: GetUserDep,
        dag_id: Annotated[Name, Path()],
        run_id: Annotated[Name, Path()],
        _confirmed: Confirmation,
    ) -> ActionResult:
        """Delete the consumed items of one run's outputs (and blobs nobody needs any more)."""
        from exclusive_xcom.config import load_settings
        from exclusive_xcom.wiring import env_for

        env = env_for(load_settings())
        deleted = env.ledger.purge_run(dag_id, run_id, on_blobs=env.codec.store.delete)
        log.warning(
            "exclusive_xcom: user %s purged %d consumed item(s) of %s/%s", user.get_name(), deleted, dag_id, run_id
        )
        return ActionResult(count=deleted, message=f"purged {deleted} consumed item(s) of run {run_id}")

    return app


def _filters(
    user: Any, dag_id: str | None, run_id: str | None, task_id: str | None, claimed_by: str | None
) -> dict[str, Any]:
    """A browse's filters, narrowed to the DAGs the auth manager lets ``user`` read."""
    from airflow.api_fastapi.app import get_auth_manager

    if claimed_by is not None and (dag_id is None or run_id is None):
        raise HTTPException(422, "claimed_by needs dag_id and run_id")
    readable = get_auth_manager().get_authorized_dag_ids(user=user, method="GET")
    if dag_id is not None:
        readable = readable & {dag_id}
    return {
        "dag_ids": sorted(readable),
        "dag_id": dag_id,
        "run_id": run_id,
        "task_id": task_id,
        "claimed_by": claimed_by,
    }


_ledger: list[Ledger] = []


def _reader() -> Ledger:
    """The ledger of this API server's configuration, for reading (its schema checked once)."""
    if not _ledger:
        from exclusive_xcom.config import load_settings
        from exclusive_xcom.wiring import current_ledger

        _ledger.append(current_ledger(load_settings()))
    return _ledger[0]


def _sealed() -> bytes:
    from exclusive_xcom.payload import MAGIC

    return MAGIC


_DERIVED = {"state", "consumers", "size", "offloaded", "encrypted"}


def _view(row: dict[str, Any]) -> ItemView:
    return ItemView(
        **{k: row[k] for k in ItemView.model_fields if k in row and k not in _DERIVED},
        consumers=json.loads(row["consumers"]),
        state=row["view_state"],
        size=row["payload_size"],
        offloaded=row["payload_uri"] is not None,
        encrypted=row["sealed"],
    )


@lru_cache(maxsize=1)
def _page() -> str:
    return resources.files("exclusive_xcom.ui").joinpath("page.html").read_text(encoding="utf-8")
