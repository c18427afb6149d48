"""Bad decorator arguments fail at DAG parse time with a message that says what is allowed."""

from __future__ import annotations

import collections.abc
import typing
from collections.abc import Iterator

import pendulum
import pytest
from airflow.sdk import DAG

from exclusive_xcom import Consumer, NotAuthorizedError, exclusive_task
from exclusive_xcom.decorator import _streamed_parameters
from exclusive_xcom.errors import ConfigurationError, ExclusiveXComError
from exclusive_xcom.handle import RESERVED_KEY


def _dag(dag_id: str = "d") -> DAG:
    return DAG(dag_id, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"))


def _task() -> None: ...


def test_unknown_mode_names_the_allowed_modes() -> None:
    with pytest.raises(ConfigurationError, match=r"mode='all' is not one of 'each', 'one', 'items'") as caught:
        exclusive_task(consumers=["b"], mode="all")(_task)
    assert str(caught.value).endswith("[dag='-' run='-' producer='_task' key='return_value' consumer='-']")


def test_consumer_that_is_not_a_string_or_consumer_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"task ids \(str\) or Consumer\(dag_id=..., task_id=...\), got 42"):
        exclusive_task(consumers=["b", 42])(_task)


def test_consumers_of_the_wrong_type_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="consumers= must be a list"):
        exclusive_task(consumers=3.5)(_task)


def test_unknown_keyword_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown keyword 'retrys' \(did you mean 'retries'\?\)"):
        exclusive_task(consumers=["b"], retrys=2)(_task)


def test_mode_without_consumers_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="mode='one' needs consumers="):
        exclusive_task(mode="one")(_task)


def test_multiple_outputs_cannot_split_an_exclusive_output() -> None:
    with pytest.raises(ConfigurationError, match="multiple_outputs=True cannot be combined with consumers="):
        exclusive_task(consumers=["b"], multiple_outputs=True)(_task)


def test_positional_argument_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="no positional arguments"):
        exclusive_task("b")  # type: ignore[arg-type]


def test_bad_batch_size_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="batch_size= must be a positive int, got 0"):
        exclusive_task(consumers=["b"], mode="items", batch_size=0)(_task)


def test_consumer_ids_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="Consumer\\(task_id=...\\) must be a non-empty Airflow id"):
        Consumer(dag_id="other", task_id="")


def test_configuration_errors_belong_to_the_one_hierarchy() -> None:
    assert issubclass(ConfigurationError, ExclusiveXComError)
    assert issubclass(NotAuthorizedError, ExclusiveXComError)


def test_output_reference_points_at_the_reserved_key_and_task_keywords_pass_through() -> None:
    with _dag():

        @exclusive_task(consumers=["b"], retries=3, pool="p1", task_id="make")
        def a() -> dict:
            return {}

        ref = a()
    ((op, key),) = ref.iter_references()
    assert key == RESERVED_KEY
    assert key.startswith("__exclusive__") and key.replace("_", "").isalnum()
    assert (op.task_id, op.retries, op.pool, op.multiple_outputs) == ("make", 3, "p1", False)


def test_wiring_the_output_into_a_non_consumer_fails_at_parse_time_naming_both() -> None:
    with _dag(), pytest.raises(NotAuthorizedError, match=r"task 'intruder' takes the exclusive output of 'secret'"):

        @exclusive_task(consumers=["reader"])
        def secret() -> int:
            return 1

        @exclusive_task
        def intruder(x: int) -> None: ...

        intruder(secret())


def test_plain_ordering_edge_to_a_non_consumer_is_allowed() -> None:
    with _dag():

        @exclusive_task(consumers=["reader"])
        def secret() -> int:
            return 1

        @exclusive_task
        def reader(x: int) -> None: ...

        @exclusive_task
        def other() -> None: ...

        out = secret()
        reader(out)
        out >> other()


def test_a_named_consumer_that_is_a_plain_task_is_told_to_use_the_decorator() -> None:
    from airflow.sdk import task

    with _dag(), pytest.raises(ConfigurationError, match="is not an @exclusive_task"):

        @exclusive_task(consumers=["reader"])
        def secret() -> int:
            return 1

        @task
        def reader(x: int) -> None: ...

        reader(secret())


def test_mapped_consumer_via_partial_and_expand_is_accepted() -> None:
    with _dag():

        @exclusive_task(consumers=["work"], mode="items")
        def produce() -> list[int]:
            return [1, 2, 3]

        @exclusive_task(batch_size=10)
        def work(items: list[int], shard: int) -> int:
            return len(items)

        mapped = work.partial(items=produce()).expand(shard=[0, 1])
    ((op, _),) = mapped.iter_references()
    assert op.task_id == "work"


def test_mapped_intruder_is_refused_at_parse_time() -> None:
    with _dag(), pytest.raises(NotAuthorizedError, match="'intruder'"):

        @exclusive_task(consumers=["work"], mode="items")
        def produce() -> list[int]:
            return [1]

        @exclusive_task
        def intruder(items: list[int], shard: int) -> None: ...

        intruder.partial(items=produce()).expand(shard=[0, 1])


# -- .override() and mapping: checked where every path passes ---------------------------------


def test_override_is_checked_like_the_decorator() -> None:
    @exclusive_task(consumers=["b"], mode="items")
    def work() -> list[int]:
        return [1]

    with _dag(), pytest.raises(ConfigurationError, match=r"mode='bogus' is not one of 'each', 'one', 'items'"):
        work.override(mode="bogus")()
    with _dag(), pytest.raises(ConfigurationError, match="batch_size= must be a positive int, got -5"):
        work.override(batch_size=-5)()
    with _dag(), pytest.raises(ConfigurationError, match="max_items= must be a positive int or None, got 0"):
        work.override(max_items=0)()


def test_a_mapped_task_is_checked_when_the_dag_is_parsed() -> None:
    @exclusive_task
    def work(x: int) -> int:
        return x

    with _dag(), pytest.raises(ConfigurationError, match="batch_size= must be a positive int, got -5"):
        work.override(batch_size=-5).expand(x=[1, 2])


def _producer(mode: str) -> object:
    @exclusive_task(consumers=["work"], mode=mode)
    def produce() -> list[int]:
        return [1, 2]

    return produce


@pytest.mark.parametrize("mode", ["each", "one"])
def test_a_mapped_consumer_given_a_single_read_through_partial_is_refused(mode: str) -> None:
    @exclusive_task
    def work(items: list[int], shard: int) -> int:
        return len(items)

    with _dag(), pytest.raises(ConfigurationError) as info:
        work.partial(items=_producer(mode)()).expand(shard=[0, 1])  # type: ignore[operator]
    assert str(info.value) == (
        f"task 'work' is mapped and gets the exclusive output of 'produce' (mode={mode!r}) through "
        ".partial(items=...): its instances would compete for one read. Map over it instead, "
        ".expand(items=...), or give 'produce' mode='items' so that the instances share its items as a work queue"
    )


def test_mapping_over_a_single_value_output_is_refused() -> None:
    @exclusive_task
    def work(item: int) -> int:
        return item

    with _dag(), pytest.raises(ConfigurationError) as info:
        work.expand(item=_producer("one")())  # type: ignore[operator]
    assert str(info.value) == (
        "task 'work' maps over the exclusive output of 'produce', which has mode='one': it goes whole to one "
        "consumer, while .expand() gives each mapped instance one element; give 'produce' mode='items' (a work "
        "item per element) or mode='each'"
    )


def test_expand_kwargs_over_an_exclusive_output_is_refused() -> None:
    @exclusive_task
    def work(item: int) -> int:
        return item

    with _dag(), pytest.raises(ConfigurationError, match=r"expand_kwargs\(\) with the exclusive output of 'produce'"):
        work.expand_kwargs(_producer("items")())  # type: ignore[operator]


@pytest.mark.parametrize("mode", ["items", "each"])
def test_an_output_can_be_mapped_over(mode: str) -> None:
    @exclusive_task
    def work(item: int) -> int:
        return item

    with _dag():
        mapped = work.expand(item=_producer(mode)())  # type: ignore[operator]
    ((op, _),) = mapped.iter_references()
    (producer, key), *_ = op.op_kwargs_expand_input.value["item"].iter_references()
    assert (producer.task_id, key) == ("produce", "return_value"), "mapped over the handles of its items"


# -- task groups ---------------------------------------------------------------------------------


def test_a_name_both_in_the_group_and_at_the_top_is_ambiguous() -> None:
    from airflow.sdk import TaskGroup

    @exclusive_task
    def load(value: dict) -> None: ...

    with _dag(), pytest.raises(ConfigurationError) as info:
        load.override(task_id="load")({"n": 1})  # a top-level "load" ...

        with TaskGroup("grp"):

            @exclusive_task(consumers=["load"])
            def produce() -> dict:
                return {}

            load(produce())  # ... and "grp.load"
    assert str(info.value) == (
        "consumers=['load'] of 'grp.produce' is ambiguous: DAG 'd' has both 'load' and 'grp.load'; "
        "write the full task id"
    )


# -- streaming arguments -------------------------------------------------------------------------


def test_iterator_and_iterable_hints_ask_for_a_stream_and_a_list_does_not() -> None:
    def work(
        a: typing.Iterator[int],  # noqa: UP035
        b: collections.abc.Iterable[dict],
        c: list[int],
        d: int,
        e: collections.abc.Iterator,  # type: ignore[type-arg]
        f,  # type: ignore[no-untyped-def]  # noqa: ANN001
    ) -> None: ...

    assert _streamed_parameters(work) == {"a", "b", "e"}


def test_hints_naming_what_is_not_importable_are_read_as_written() -> None:
    def work(a: Iterator[Order], b: list[Order], c: Order) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    assert _streamed_parameters(work) == {"a"}


def test_from_asset_needs_an_asset() -> None:
    from exclusive_xcom import from_asset

    with pytest.raises(ConfigurationError, match="from_asset\\(\\) needs an airflow.sdk.Asset, got 'orders'"):
        from_asset("orders")  # type: ignore[arg-type]


def test_a_single_value_output_cannot_be_mapped_over_at_run_time_either() -> None:
    """The parse-time check's backstop: a mode-one output reaching a mapped consumer fails the producer."""
    from types import SimpleNamespace

    from exclusive_xcom.crypto import keyring_from
    from exclusive_xcom.handle import Handle
    from exclusive_xcom.ledger import Output
    from exclusive_xcom.mapping import mapping_value

    handle = Handle(Output("d", "r", "produce"), 1, "one", ("d/work",))
    with pytest.raises(ConfigurationError, match="'produce' has consumers mapped over it but mode='one'"):
        mapping_value(SimpleNamespace(map_index=-1), handle, None, keyring_from("k", ""))
