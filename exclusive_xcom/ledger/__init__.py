"""The claim ledger: tables, statements and transactions. Imports no Airflow."""

from exclusive_xcom.ledger.engine import create_engine, get_engine
from exclusive_xcom.ledger.ledger import (
    EACH,
    ITEMS,
    MODES,
    ONE,
    Claimant,
    ClaimRequest,
    ClaimResult,
    Finished,
    Ledger,
    Offloaded,
    Output,
    Production,
    Waiting,
    consumer_slot,
)

__all__ = [
    "EACH",
    "ITEMS",
    "MODES",
    "ONE",
    "ClaimRequest",
    "ClaimResult",
    "Claimant",
    "Finished",
    "Ledger",
    "Offloaded",
    "Output",
    "Production",
    "Waiting",
    "consumer_slot",
    "create_engine",
    "get_engine",
]
