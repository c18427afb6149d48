"""The claim ledger: tables, statements and transactions. Imports no Airflow."""

from exclusive_xcom.ledger.engine import create_engine, get_engine
from exclusive_xcom.ledger.ledger import Ledger
from exclusive_xcom.ledger.types import (
    DEFAULT_BATCH_SIZE,
    EACH,
    ITEMS,
    MODES,
    ONE,
    Claimant,
    ClaimRequest,
    ClaimResult,
    Finished,
    Offloaded,
    Output,
    Production,
    Stored,
    Waiting,
    Written,
    consumer_slot,
    inputs_key,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
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
    "Stored",
    "Waiting",
    "Written",
    "consumer_slot",
    "create_engine",
    "get_engine",
    "inputs_key",
]
