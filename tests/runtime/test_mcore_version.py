"""Installed packages that break a Megatron-Core release are named before it is imported."""

import importlib.util
import subprocess
import sys

from packaging.version import Version

import pytest

from mm1_megatron.runtime.mcore_version import (MCORE_RELEASE, NVRX_MIN_FOR_DIST_CHECKPOINTING,
                                                environment_problem)

pytestmark = pytest.mark.mcore


def test_an_old_resiliency_ext_is_refused_only_where_megatron_core_imports_it():
    line = environment_problem(Version("0.19.2"), "0.4.1")
    assert line == ("nvidia-resiliency-ext 0.4.1 is installed, but Megatron-Core 0.19.2 needs "
                    ">= 0.6.0 or none (with an older one its dist_checkpointing fails to "
                    "import): upgrade it, or pip uninstall nvidia-resiliency-ext")
    assert environment_problem(Version("0.19.2"), "0.6.0") is None
    assert environment_problem(Version("0.16.1"), "0.4.1") is None  # 0.16 does not import it


def test_the_minimum_is_the_one_megatron_core_asks_for():
    if MCORE_RELEASE >= Version("0.19"):  # the second CI leg
        from megatron.core.dist_checkpointing.strategies import nvrx

        assert Version(nvrx.NVRX_MIN_VERSION) == NVRX_MIN_FOR_DIST_CHECKPOINTING
    else:
        assert importlib.util.find_spec("megatron.core.dist_checkpointing.strategies.nvrx") \
            is None


def test_mm1_train_checks_before_megatron_core_is_imported():
    code = ("import sys, mm1_megatron.cli, mm1_megatron.runtime.mcore_version; "
            "print('megatron.core' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
