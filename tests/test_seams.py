"""The typed seams between the server and what serves it (issue 26, item 6): a local Engine and the
Ray replica's ReplicaEngine meet one ServingEngine protocol, method for method; the replica that
served a request is a typed field of its outputs."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from lora_kit.engine import Engine
from lora_kit.engine.types import GenerationOutput
from lora_kit.server.ray_app import ReplicaEngine
from lora_kit.server.serving import ServingEngine

METHODS = [name for name, member in vars(ServingEngine).items() if inspect.isfunction(member) and name[0] != "_"]


@pytest.mark.parametrize("cls", [Engine, ReplicaEngine])
def test_both_engines_meet_the_serving_protocol(cls):
    assert set(METHODS) == {
        "resolve",
        "check_adapter",
        "validate_adapter",
        "drop_adapter",
        "generate",
        "stats",
        "start",
        "stop",
    }
    engine = cls.__new__(cls)  # no model or Ray needed: the protocol is the class's methods and two fields
    engine.model_name, engine.tokenizer = "m", object()
    assert isinstance(engine, ServingEngine)
    for name in METHODS:
        wanted = inspect.signature(getattr(ServingEngine, name)).parameters
        given = inspect.signature(getattr(cls, name)).parameters
        for param, spec in wanted.items():  # every parameter the server passes, of the same kind
            assert param in given and given[param].kind == spec.kind, (cls.__name__, name, param)
        extra = [p for p in given.values() if p.name not in wanted]
        assert all(p.default is not inspect.Parameter.empty for p in extra), (cls.__name__, name, extra)


def test_the_serving_replica_is_a_typed_output_field_not_a_request_attribute():
    from lora_kit.server.generation import ServerRequest

    assert "replica" in {f.name for f in dataclasses.fields(GenerationOutput)}
    assert "served_by" not in {f.name for f in dataclasses.fields(ServerRequest)}
