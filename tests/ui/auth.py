"""An auth manager for the UI tests: Airflow's SimpleAuthManager, except that one user may
not see or touch one DAG.

SimpleAuthManager authorizes by role only; a deployment's real auth manager (FAB, Keycloak)
also decides per DAG. This subclass adds exactly that, through the method every per-DAG
check of Airflow goes through (``is_authorized_dag``, which ``requires_access_dag`` and
``get_authorized_dag_ids`` call), so the tests exercise the path a real one takes.
"""

from __future__ import annotations

from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

DENIED_USER = "outsider"
DENIED_DAG = "ui_secret"


class OneDagDenied(SimpleAuthManager):
    def is_authorized_dag(self, *, method: Any, user: Any, access_entity: Any = None, details: Any = None) -> bool:
        if user.get_name() == DENIED_USER and details is not None and details.id == DENIED_DAG:
            return False
        return bool(super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details))
