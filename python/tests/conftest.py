"""Where torch is missing, the torch suites are left out, visibly (a line in
the report); with CULOSS_REQUIRE_TORCH=1 (CI) a missing torch is a failure."""
import importlib.util
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)  # torch_ref
if not os.environ.get("CULOSS_TEST_INSTALLED"):
    sys.path.insert(0, os.path.join(here, ".."))  # the source tree's culoss package

TORCH_SUITES = ["test_torch_opinfo.py", "test_torch_ops.py", "test_torch_semantics.py",
                "test_torch_distributed.py", "test_torch_more_losses.py", "test_torch_distill.py"]
HAVE_TORCH = importlib.util.find_spec("torch") is not None
collect_ignore = []
if not HAVE_TORCH:
    if os.environ.get("CULOSS_REQUIRE_TORCH"):
        raise RuntimeError("CULOSS_REQUIRE_TORCH is set but torch is not importable: "
                           "the torch suites must run here")
    collect_ignore = TORCH_SUITES


def pytest_report_header(config):
    if not HAVE_TORCH:
        return f"skipped: torch is not installed, so {', '.join(TORCH_SUITES)} do not run"
    import torch
    return f"torch {torch.__version__}"
