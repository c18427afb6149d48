"""Airflow provider metadata: registers ``@task.exclusive`` and the ``[exclusive_xcom]`` options."""

from __future__ import annotations

from typing import Any

from exclusive_xcom.config import OPTIONS, SECTION


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "exclusive-xcom",
        "name": "exclusive_xcom",
        "description": "Consume-once, access-controlled hand-off of task outputs (a claim ledger).",
        "versions": ["0.1.0"],
        "task-decorators": [{"name": "exclusive", "class-name": "exclusive_xcom.decorator.exclusive_task"}],
        "config": {
            SECTION: {
                "description": "The claim ledger of exclusive_xcom.",
                "options": {
                    name: {
                        "description": option.description,
                        "version_added": "0.1.0",
                        "type": option.kind,
                        "example": None,
                        "default": option.airflow_default(),
                    }
                    for name, option in OPTIONS.items()
                },
            }
        },
    }
