"""Set-up of the property suite: implementations under test, Hypothesis profiles, skips.

* ``REFUSAL_CORE_IMPL`` names the module(s) under test (default: the reference,
  ``refusal_core.functional``); a test that takes an ``impl`` argument runs once per module.
* ``REFUSAL_CORE_HYPOTHESIS_PROFILE`` picks the Hypothesis profile: ``dev`` (default,
  quick, random), ``ci`` (derandomized, so every run draws the same examples), ``nightly``
  (many examples). ``meta`` is the profile the meta-tests run the suite with: derandomized
  like ``ci``, as many examples as ``dev``, and no shrink phase, since there only *whether*
  a property fails matters.
* ``@pytest.mark.needs("fn", ...)`` skips a test, naming the function, when the module
  under test lacks one of the protocol functions it calls.
* ``@pytest.mark.differential`` tests compare with the reference and are skipped when the
  reference itself is under test (they could not fail).
* ``@pytest.mark.bad_input`` marks the project's bad-input policy checks: the reference and
  modules declaring ``RAISES_REFUSAL_CORE_ERRORS = True`` are always held to them; any other
  outside module only when the run selects the marker (``-m bad_input``), else they skip.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, settings

from refusal_core.testing.oracle import (
    BAD_INPUT_MARKER,
    STRICT_ERRORS_ATTRIBUTE,
    Implementation,
    describe_implementations,
    load_implementations,
    marker_selected,
    require,
)

PROFILE_ENV_VAR = "REFUSAL_CORE_HYPOTHESIS_PROFILE"

# torch calls are slow to start and vary in time: no per-example deadline anywhere.
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("dev", max_examples=30, **_COMMON)
settings.register_profile("ci", max_examples=60, derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("nightly", max_examples=2000, print_blob=True, **_COMMON)
settings.register_profile(
    "meta",
    max_examples=30,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    **_COMMON,
)
PROFILE = os.environ.get(PROFILE_ENV_VAR, "dev") or "dev"
settings.load_profile(PROFILE)

IMPLEMENTATIONS: tuple[Implementation, ...] = load_implementations()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs(*functions): protocol functions the test calls; skipped when the module lacks one"
    )
    config.addinivalue_line(
        "markers", "differential: compares with the reference; skipped when the reference is under test"
    )
    config.addinivalue_line(
        "markers",
        f"{BAD_INPUT_MARKER}: the project's bad-input policy; outside modules are held to it only when "
        f"they declare {STRICT_ERRORS_ATTRIBUTE} = True or the run selects -m {BAD_INPUT_MARKER}",
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [describe_implementations(IMPLEMENTATIONS), f"hypothesis profile: {PROFILE}"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", IMPLEMENTATIONS, ids=[i.label for i in IMPLEMENTATIONS])


def pytest_runtest_setup(item: pytest.Item) -> None:
    callspec = getattr(item, "callspec", None)
    impl = callspec.params.get("impl") if callspec is not None else None
    if impl is None:
        return
    if item.get_closest_marker(BAD_INPUT_MARKER) is not None and not impl.held_to_bad_input(
        marker_selected(str(item.config.getoption("markexpr", "") or ""))
    ):
        pytest.skip(
            f"bad-input policy check: {impl.label} does not declare {STRICT_ERRORS_ATTRIBUTE} = True; "
            f"select -m {BAD_INPUT_MARKER} to hold it to the policy"
        )
    for marker in item.iter_markers("needs"):
        for name in marker.args:
            require(impl, name)
    if impl.is_reference and item.get_closest_marker("differential") is not None:
        pytest.skip("differential check: the implementation under test is the reference itself")
