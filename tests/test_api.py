from dataclasses import dataclass

import pytest

import kvbench
from kvbench.api import Method, ParamError, UnknownMethodError, budget_tokens, check_budget, param


@dataclass(frozen=True)
class Toy(Method):
    name = "toy"
    bits: int = param(2, "bits per element", choices=(2, 4))
    budget: float = param(0.1, "budget", valid="a fraction or tokens")
    mode: str = param("max", "pool kind", choices=("max", "avg"))

    def validate(self):
        check_budget(self.name, "budget", self.budget)


def test_valid_params_construct_and_label():
    t = Toy(bits=4)
    assert t.params() == {"bits": 4, "budget": 0.1, "mode": "max"}
    assert t.label() == "toy:bits=4"
    assert Toy().label() == "toy"


def test_a_whole_number_budget_labels_as_an_integer_and_spec_shows_every_parameter():
    assert Toy(budget=160).label() == "toy:budget=160" and Toy(budget=160.0).budget == 160.0
    assert Toy(budget=0.05).label() == "toy:budget=0.05"
    assert Toy().spec() == "toy:bits=2,budget=0.1,mode=max"


@pytest.mark.parametrize("kwargs, name", [({"bits": 3}, "bits"), ({"budget": 0.0}, "budget"),
                                          ({"budget": 2.5}, "budget"), ({"mode": "sum"}, "mode"),
                                          ({"bits": "2"}, "bits"), ({"bits": True}, "bits")])
def test_bad_params_name_the_parameter_and_range(kwargs, name):
    with pytest.raises(ParamError) as e:
        Toy(**kwargs)
    assert e.value.name == name
    assert name in str(e.value) and "valid" in str(e.value)


def test_int_budget_becomes_float():
    assert Toy(budget=160).budget == 160.0


def test_budget_tokens():
    assert budget_tokens(0.1, 1000) == 100
    assert budget_tokens(0.075, 32768) == 2458
    assert budget_tokens(160, 32768) == 160
    assert budget_tokens(0.001, 10) == 1


def test_registry_lists_full_and_parses_specs():
    assert "full" in kvbench.available_methods()
    m = kvbench.parse_method("full:grow=64")
    assert m.grow == 64 and m.label() == "full:grow=64"
    assert kvbench.parse_method(m) is m


def test_unknown_method_lists_valid_names():
    with pytest.raises(UnknownMethodError) as e:
        kvbench.parse_method("nosuch:budget=3")
    assert "full" in str(e.value)


def test_unknown_parameter_and_bad_value():
    with pytest.raises(kvbench.KVBenchError, match="no parameter 'nope'"):
        kvbench.parse_method("full:nope=1")
    with pytest.raises(ParamError, match="grow"):
        kvbench.parse_method("full:grow=abc")
    with pytest.raises(ParamError, match=">= 1"):
        kvbench.parse_method("full:grow=0")
