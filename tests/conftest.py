import pytest
import torch


def _gpu_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        return f"cupy not importable: {e}"
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and CuPy (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    reason = _gpu_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed_record():
    from . import cases

    cases.seeds_drawn.clear()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        from . import cases

        if cases.seeds_drawn:
            seeds = ", ".join(str(s) for s in cases.seeds_drawn)
            report.sections.append(("random seeds", f"seeds drawn: {seeds}; replay with "
                                                    f"{cases.SEED_ENV}=<seed> (one per generator)"))
