"""${VAR} interpolation and where names are looked up."""
from __future__ import annotations

import pytest

from runner.interpolate import (
    BrokenVariable, InterpolationError, Resolver, UndefinedVariable, interpolate,
)

ENV = {"A": "alpha", "EMPTY": "", "N": "3"}


@pytest.mark.parametrize("text,expected", [
    ("plain", "plain"),
    ("${A}", "alpha"),
    ("x-${A}-y", "x-alpha-y"),
    ("${A}${N}", "alpha3"),
    ("$$", "$"),
    ("$${A}", "${A}"),
    ("$$$${A}", "$${A}"),
    ("$$${A}", "$alpha"),
    ("$A", "$A"),
    ("cost: 5$", "cost: 5$"),
    ("${B:-dflt}", "dflt"),
    ("${EMPTY:-dflt}", "dflt"),
    ("${EMPTY-dflt}", ""),
    ("${B-dflt}", "dflt"),
    ("${A:-dflt}", "alpha"),
    ("${B:-}", ""),
    ("${B:-${A}/x}", "alpha/x"),
    ("${B:-${C:-deep}}", "deep"),
    ("${B:-a}}", "a}"),
    ("${B:-$$}", "$"),
    ("${A:?must be set}", "alpha"),
    ("${EMPTY?only unset is an error}", ""),
    ("{A}", "{A}"),
    ("", ""),
])
def test_interpolate(text, expected):
    assert interpolate(text, ENV.get) == expected


@pytest.mark.parametrize("text,fragment", [
    ("${B}", "undefined variable 'B' (set it in the environment, with --var B=..., or under variables:)"),
    ("x${", "unterminated"),
    ("${A", "unterminated"),
    ("${}", "expected a variable name"),
    ("${1A}", "expected a variable name"),
    ("${ A}", "expected a variable name"),
    ("${A B}", "malformed"),
    ("${A:x}", "malformed"),
    ("${B:?give B}", "variable 'B' is not set: give B"),
    ("${EMPTY:?}", "variable 'EMPTY' is not set: it is required"),
    ("${B?}", "variable 'B' is not set"),
    ("${B:-${C}}", "undefined variable 'C'"),
])
def test_interpolate_errors(text, fragment):
    with pytest.raises(InterpolationError) as info:
        interpolate(text, ENV.get)
    assert fragment in str(info.value)


def test_undefined_carries_name():
    with pytest.raises(UndefinedVariable) as info:
        interpolate("${NOPE}", ENV.get)
    assert info.value.name == "NOPE"


@pytest.mark.parametrize("overrides,environ,expected", [
    ({}, {}, "pipeline"),
    ({}, {"X": "env"}, "env"),
    ({"X": "cli"}, {"X": "env"}, "cli"),
    ({"X": ""}, {"X": "env"}, ""),
])
def test_precedence(overrides, environ, expected):
    r = Resolver(overrides=overrides, environ=environ, variables={"X": "pipeline"})
    assert r.interpolate("${X}") == expected


def test_pipeline_variables_refer_to_environment_and_each_other():
    r = Resolver(environ={"HOST": "h"}, variables={
        "URL": "https://${HOST}/${PATH_}", "PATH_": "repo", "SELF": "${SELF:-fallback}"})
    assert r.interpolate("${URL}") == "https://h/repo"
    assert r.interpolate("${SELF}") == "fallback"
    values, errors = r.effective_variables()
    assert values == {"URL": "https://h/repo", "PATH_": "repo", "SELF": "fallback"}
    assert errors == {}


def test_variable_cycle_and_broken_variables():
    r = Resolver(variables={"A": "${B}", "B": "${A}", "C": "${A}x", "D": "${NOPE}"})
    with pytest.raises(BrokenVariable):
        r.interpolate("${C}")
    values, errors = r.effective_variables()
    assert values == {}
    assert set(errors) == {"B", "D"}
    assert "cycle: A -> B -> A" in str(errors["B"])
    assert "undefined variable 'NOPE'" in str(errors["D"])


def test_overridden_variable_definition_is_not_evaluated():
    r = Resolver(environ={"X": "env"}, variables={"X": "${UNDEFINED}"})
    assert r.effective_variables() == ({"X": "env"}, {})


def test_secret_backing_variable_is_refused():
    r = Resolver(environ={"TOKEN": "s3cret"}, protected={"TOKEN": "git_token"})
    with pytest.raises(InterpolationError, match="secret 'git_token'"):
        r.interpolate("Bearer ${TOKEN}")
    with pytest.raises(InterpolationError) as info:
        r.interpolate("${TOKEN:-x}")
    assert "s3cret" not in str(info.value)
