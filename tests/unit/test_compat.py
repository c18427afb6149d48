"""Every private Airflow name exclusive_xcom relies on exists in the installed Airflow, with the
shape we use. One test per name: when an upgrade moves one, the failing test names it."""

from __future__ import annotations

import importlib
import inspect

import attr
import pytest
from airflow.sdk.bases.operator import BaseOperator
from airflow.sdk.definitions.xcom_arg import PlainXComArg

from exclusive_xcom import compat


def test_task_decorator_is_the_attrs_class_we_subclass_with_an_expand_seam() -> None:
    assert {"function", "kwargs", "operator_class"} <= {f.name for f in attr.fields(compat.TaskDecorator)}
    expand = inspect.signature(compat.TaskDecorator._expand)
    assert list(expand.parameters)[:2] == ["self", "expand_input"]
    assert expand.parameters["strict"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "self._expand(" in inspect.getsource(compat.TaskDecorator.expand), "expand() must go through _expand()"
    assert compat.TaskDecorator[..., object, BaseOperator] is not None  # subscriptable, as our subclass writes it
    assert inspect.isclass(compat.TaskDecorator) and attr.has(compat.TaskDecorator)


def test_list_of_dicts_expand_input_is_what_expand_kwargs_makes() -> None:
    assert attr.has(compat.ListOfDictsExpandInput)
    assert "value" in {f.name for f in attr.fields(compat.ListOfDictsExpandInput)}
    source = inspect.getsource(compat.TaskDecorator.expand_kwargs)
    assert "ListOfDictsExpandInput(" in source


def test_notset_is_zips_default_fill_value() -> None:
    assert inspect.signature(PlainXComArg.zip).parameters["fillvalue"].default is compat.NOTSET


def test_post_execute_hook_is_an_operator_attribute_the_task_runner_calls() -> None:
    assert getattr(BaseOperator, compat.POST_EXECUTE_HOOK) is None
    task_runner = importlib.import_module("airflow.sdk.execution_time.task_runner")
    assert f"task.{compat.POST_EXECUTE_HOOK}" in inspect.getsource(task_runner)

    task = BaseOperator(task_id="t")
    assert compat.post_execute_hook(task) is None
    calls: list[object] = []
    compat.set_post_execute_hook(task, lambda context, result: calls.append(result))
    hook = compat.post_execute_hook(task)
    assert hook is not None
    hook({}, 42)
    assert calls == [42]


def test_stats_factory_attribute_exists_and_tells_whether_stats_were_initialized() -> None:
    module = importlib.import_module(compat.STATS_MODULE)
    assert hasattr(module, compat.STATS_FACTORY)
    assert compat.stats_initialized() is (getattr(module, compat.STATS_FACTORY) is not None)


def test_stats_factory_builds_a_stats_client() -> None:
    factory = compat.stats_factory()
    assert callable(factory)
    client = factory()
    assert callable(client.incr) and callable(client.gauge) and callable(client.timing)


def test_get_hostname_is_the_runners_host_name() -> None:
    name = compat.get_hostname()
    assert isinstance(name, str) and name


def test_a_missing_name_is_one_import_error_naming_it() -> None:
    error = compat._missing("airflow.sdk.example._Gone", ImportError("cannot import name '_Gone'"))
    assert isinstance(error, ImportError)
    assert "Airflow's airflow.sdk.example._Gone" in str(error) and "_Gone'" in str(error)


@pytest.mark.parametrize("name", compat.__all__)
def test_every_exported_name_is_there(name: str) -> None:
    assert getattr(compat, name) is not None
