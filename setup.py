"""Packages of the wheel; everything else is in pyproject.toml.

``properties/`` (the property suite) is installed as ``refusal_core.testing.properties`` so that
``refusal-core oracle`` works from a plain ``pip install``; in the checkout it stays where tox,
the meta-tests and ``pytest properties`` expect it.
"""

from setuptools import find_packages, setup

SUITE = "refusal_core.testing.properties"

setup(
    packages=[*find_packages(include=["refusal_core", "refusal_core.*"]), SUITE],
    package_dir={SUITE: "properties"},
)
