"""The pinned connection's statements are compiled once, so each must bind fixed parameters."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from exclusive_xcom.ledger import create_engine
from exclusive_xcom.ledger.direct import Direct, applies
from exclusive_xcom.ledger.queries import Bound
from exclusive_xcom.ledger.schema import item

UNREACHABLE = "postgresql+psycopg://nobody@127.0.0.1:1/nothing"  # compiling connects to nothing


def test_a_statement_with_an_expanding_parameter_is_refused_before_anything_is_sent() -> None:
    engine = create_engine(UNREACHABLE)
    expanding = sa.select(item.c.id).where(item.c.id.in_(sa.bindparam("ids", expanding=True)))
    with pytest.raises(ValueError, match="a statement sent directly cannot expand parameters: pass ids as one array"):
        Direct(engine).send(Bound(expanding, {"ids": [1, 2]}))
    engine.dispose()


def test_only_postgresql_through_psycopg_sends_directly() -> None:
    assert applies(create_engine(UNREACHABLE))
    assert not applies(create_engine("sqlite://"))
