"""Meta-tests: the property suite catches deliberately wrong implementations.

The suite in ``properties/`` is only as good as the bugs it finds. These tests run it in a
subprocess (``python -m pytest properties/... -p no:cacheprovider -q``) with
``REFUSAL_CORE_IMPL`` pointing at the modules of ``tests/meta_impls``:

* every ``wrong_*`` module (the reference with one function broken) must fail each property
  test that ``meta_impls.WRONG`` lists for it; there is at least one per protocol function;
* ``correct_float32`` (correct, computed differently) must pass the whole suite;
* ``partial_two`` (two functions only) must pass their tests and skip every other one with a
  reason naming the missing function;
* ``lenient_three`` (three functions, no validation, no ``RAISES_REFUSAL_CORE_ERRORS``) must get
  no failure at all in a plain run: the project's bad-input policy (marker ``bad_input``) does
  not apply to it unless the run selects the marker; with ``-m bad_input`` its missing checks
  must be caught.

The wrong-module run selects the marker (``-m "(bad_input or not bad_input) and not gpu ..."``:
every test of the CPU tier, the policy included), since several wrong modules break only the
policy and do not declare the strict rule. To stay fast, the wrong modules run in one
subprocess on exactly the listed test ids, the correct and partial modules in a second one,
and the lenient module in two more (plain, then ``-m bad_input`` on the bad-input file only);
all with the ``meta`` Hypothesis profile (CI's derandomized examples, no shrinking: only
*whether* a property fails matters here). Each subprocess belongs to a single test, so under
pytest-xdist they run in parallel, once each.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from refusal_core.testing.oracle import BAD_INPUT_MARKER, PROTOCOL

pytestmark = pytest.mark.meta

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
PACKAGE = "meta_impls"

#: the property files of the functional core (model-level property files are not run here)
PROPERTY_FILES = (
    "test_ablation.py",
    "test_orthogonalization.py",
    "test_aird.py",
    "test_directions.py",
    "test_pruning.py",
    "test_int8.py",
    "test_group_quantization.py",
    "test_refusal_score.py",
    "test_differential.py",
    "test_bad_input.py",
)


def _load_catalogue() -> ModuleType:
    """``tests/meta_impls/__init__.py``, loaded from its path (``tests`` is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_{PACKAGE}_catalogue", TESTS / PACKAGE / "__init__.py")
    assert spec is not None, "cannot load tests/meta_impls/__init__.py"
    assert spec.loader is not None, "cannot load tests/meta_impls/__init__.py"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CATALOGUE = _load_catalogue()
WRONG: dict[str, tuple[str, tuple[str, ...]]] = CATALOGUE.WRONG


@dataclass(frozen=True)
class SuiteRun:
    """Outcomes of one subprocess run: ``"file::test[params]"`` -> (outcome, message)."""

    outcomes: dict[str, tuple[str, str]]
    returncode: int
    output: str

    def tail(self) -> str:
        return self.output[-4000:]


#: a marker expression that selects every test and opts outside modules into the bad-input policy
SELECT_ALL_WITH_POLICY = "(bad_input or not bad_input) and not gpu and not real and not slow"


def _run_suite(impls: list[str], targets: list[str], junit: Path, markexpr: str | None = None) -> SuiteRun:
    env = dict(os.environ)
    env.update(
        {
            "REFUSAL_CORE_IMPL": ",".join(f"{PACKAGE}.{m}" for m in impls),
            "REFUSAL_CORE_HYPOTHESIS_PROFILE": "meta",
            "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p),
            "OMP_NUM_THREADS": "1",
        }
    )
    cmd = [sys.executable, "-m", "pytest", *targets, "-p", "no:cacheprovider", "-q", "-p", "no:xdist"]
    if markexpr is not None:
        cmd += ["-m", markexpr]
    proc = subprocess.run(
        [*cmd, f"--junitxml={junit}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    outcomes: dict[str, tuple[str, str]] = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            key = f"{case.get('classname', '').split('.')[-1]}.py::{case.get('name')}"
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome, message = "failed", child.get("message", "")
                elif child.tag == "skipped":
                    outcome, message = "skipped", child.get("message", "")
            outcomes[key] = (outcome, message)
    return SuiteRun(outcomes, proc.returncode, proc.stdout + proc.stderr)


def _node(expected: str, module: str) -> str:
    """The pytest node id of an expectation for ``module``.

    ``file::test`` -> ``file::test[meta_impls.module]``, ``file::test[case]`` ->
    ``file::test[meta_impls.module-case]`` (the implementation parameter comes first).
    """
    if expected.endswith("]"):
        base, case = expected[:-1].split("[", 1)
        return f"{base}[{PACKAGE}.{module}-{case}]"
    return f"{expected}[{PACKAGE}.{module}]"


def test_catalogue_breaks_every_protocol_function() -> None:
    broken = {fn for fn, _ in WRONG.values()}
    missing = [fn for fn in PROTOCOL if fn not in broken]
    assert not missing, f"protocol functions without a deliberately wrong implementation: {missing}"
    files = {p.stem for p in (TESTS / PACKAGE).glob("wrong_*.py")}
    assert files == set(WRONG), (
        f"wrong_*.py files not in meta_impls.WRONG: {sorted(files - set(WRONG))}; "
        f"catalogue entries without a file: {sorted(set(WRONG) - files)}"
    )


def test_meta_runs_every_property_file() -> None:
    on_disk = {p.name for p in (ROOT / "properties").glob("test_*.py") if "needs(" in p.read_text()}
    assert on_disk <= set(PROPERTY_FILES), (
        "property files using the oracle but not run by the meta-tests: "
        f"{sorted(on_disk - set(PROPERTY_FILES))}"
    )


def test_every_wrong_implementation_is_caught(tmp_path: Path) -> None:
    expectations = dict(WRONG)
    targets = sorted({f"properties/{_node(e, m)}" for m, (_, tests) in expectations.items() for e in tests})
    run = _run_suite(sorted(expectations), targets, tmp_path / "wrong.xml", SELECT_ALL_WITH_POLICY)
    uncaught = []
    for module, (function, expected) in sorted(expectations.items()):
        for e in expected:
            node = _node(e, module)
            outcome, _ = run.outcomes.get(node, ("not run", ""))
            if outcome != "failed":
                uncaught.append(
                    f"{PACKAGE}.{module} (a wrong {function}) was not caught by {node}: {outcome}"
                )
    assert run.outcomes, f"the suite did not run; exit {run.returncode}, output tail:\n{run.tail()}"
    assert not uncaught, (
        "\n".join(uncaught) + f"\nsubprocess exit {run.returncode}, output tail:\n{run.tail()}"
    )


def _outcomes_of(run: SuiteRun, module: str) -> dict[str, tuple[str, str]]:
    tag = f"{PACKAGE}.{module}"
    return {k: v for k, v in run.outcomes.items() if f"[{tag}]" in k or f"[{tag}-" in k}


def test_outside_implementations_pass_and_skip_only_missing_functions(tmp_path: Path) -> None:
    files = [f"properties/{f}" for f in PROPERTY_FILES]
    run = _run_suite([CATALOGUE.CORRECT, CATALOGUE.PARTIAL], files, tmp_path / "outside.xml")
    _check_correct(run)
    _check_partial(run)


def _check_correct(run: SuiteRun) -> None:
    """``correct_float32`` passes every test, differential checks included; nothing is skipped."""
    mine = _outcomes_of(run, CATALOGUE.CORRECT)
    assert len(mine) >= 100, f"only {len(mine)} tests ran for {CATALOGUE.CORRECT}; output tail:\n{run.tail()}"
    bad = {k: v for k, v in mine.items() if v[0] != "passed"}
    assert not bad, f"the correct outside implementation {CATALOGUE.CORRECT} did not pass: " + "; ".join(
        f"{k}: {o} {m[:300]}" for k, (o, m) in sorted(bad.items())
    )


def _check_partial(run: SuiteRun) -> None:
    """``partial_two`` passes the tests of its two functions; every other test skips naming its function."""
    mine = _outcomes_of(run, CATALOGUE.PARTIAL)
    provided = CATALOGUE.PARTIAL_PROVIDES
    failed = {k: m[:300] for k, (o, m) in mine.items() if o == "failed"}
    assert not failed, f"{CATALOGUE.PARTIAL} failed: {failed}"
    skipped_for = set()
    for key, (outcome, message) in mine.items():
        if outcome != "skipped":
            continue
        named = [fn for fn in PROTOCOL if f"protocol function {fn}()" in message]
        if named:
            assert named[0] not in provided, (
                f"{key} skipped for {named[0]}, which the module provides: {message}"
            )
            skipped_for.add(named[0])
    missing = set(PROTOCOL) - set(provided)
    assert skipped_for == missing, (
        f"skips named {sorted(skipped_for)}; expected every missing function {sorted(missing)}"
    )
    ran = [k for k, (o, _) in mine.items() if o == "passed"]
    for fn in provided:
        assert any(f"test_{fn}_" in k or f"-{fn}-" in k for k in ran), (
            f"no test of {fn} ran for {CATALOGUE.PARTIAL}; outcomes: {sorted(mine.items())[:20]}"
        )


def test_module_without_declaration_gets_no_bad_input_failures(tmp_path: Path) -> None:
    """A three-function module that validates nothing passes a plain run: the policy is opt-in."""
    files = [f"properties/{f}" for f in PROPERTY_FILES]
    run = _run_suite([CATALOGUE.LENIENT], files, tmp_path / "lenient.xml")
    mine = _outcomes_of(run, CATALOGUE.LENIENT)
    assert mine, f"nothing ran for {CATALOGUE.LENIENT}; exit {run.returncode}, output tail:\n{run.tail()}"
    failed = {k: m[:300] for k, (o, m) in mine.items() if o == "failed"}
    assert not failed, f"{CATALOGUE.LENIENT} (no RAISES_REFUSAL_CORE_ERRORS) failed: {failed}"
    policy = {k: v for k, v in mine.items() if "test_bad_input.py::test_rejects_bad_input[" in k}
    for fn in CATALOGUE.LENIENT_PROVIDES:
        own = {k: v for k, v in policy.items() if f"-{fn}-" in k}
        assert own, f"no bad-input test of {fn} was collected for {CATALOGUE.LENIENT}"
        not_skipped = {k: v for k, v in own.items() if v[0] != "skipped" or "bad-input policy" not in v[1]}
        assert not not_skipped, (
            f"bad-input tests of {fn} for {CATALOGUE.LENIENT} did not skip as policy checks: {not_skipped}"
        )
        assert any(o == "passed" and f"test_{fn}_" in k for k, (o, _) in mine.items()), (
            f"no math property of {fn} passed for {CATALOGUE.LENIENT}; outcomes: {sorted(mine.items())[:20]}"
        )
    # Opting in with the marker holds it to the (lenient) policy: its missing checks are caught.
    opted = _run_suite(
        [CATALOGUE.LENIENT], ["properties/test_bad_input.py"], tmp_path / "opted.xml", BAD_INPUT_MARKER
    )
    for expected in CATALOGUE.LENIENT_FAILS_WHEN_SELECTED:
        node = _node(expected, CATALOGUE.LENIENT)
        outcome, _ = opted.outcomes.get(node, ("not run", ""))
        assert outcome == "failed", (
            f"with -m {BAD_INPUT_MARKER}, {node} was {outcome}, expected failed; output tail:\n{opted.tail()}"
        )
