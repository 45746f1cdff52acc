"""The environment of a benchmark run, recorded once: in pytest's header and, under
pytest-benchmark, in its JSON's machine_info (fercuda.compare.environment)."""

import pytest

import fercuda  # noqa: F401  (loaded first, so the record names its CPU kernels' path)
from fercuda.compare.environment import describe, environment


def pytest_report_header(config):
    return "environment: " + describe(environment())


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fercuda_environment"] = environment()
