import os

import pytest
import torch

try:  # property-based tests (tests/test_properties.py): a small profile for CI, a larger one for the GPU run
    from hypothesis import HealthCheck, settings

    _common = dict(deadline=None, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.function_scoped_fixture])
    settings.register_profile("ci", max_examples=100, **_common)
    settings.register_profile("gpu", max_examples=400, **_common)
    settings.load_profile(os.environ.get("CUPY_ROI_HYPOTHESIS_PROFILE", "ci"))
except ImportError:
    pass


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


def _nvrtc_compiles(items):
    """tests/test_nvrtc_compile.py and the (family, scalar type, arch) of its
    selected compile tests."""
    selected = [item for item in items if getattr(item, "originalname", "") == "test_kernels_compile"]
    keys = [tuple(item.callspec.params[n] for n in ("family", "scalar_type", "arch")) for item in selected]
    return (selected[0].module if selected else None), keys


def pytest_collection_finish(session):
    # an xdist worker collects every test but runs a share: its tests compile their own
    module, keys = _nvrtc_compiles(session.items)
    if module is not None and "PYTEST_XDIST_WORKER" not in os.environ:
        module.start_compiles(keys)  # in the background from here on
        # one thread for torch's CPU ops beside them: OpenMP workers that spin
        # while they wait would take the compiles' core (user time 110 s
        # against 85 s of work on a 2-core machine)
        torch.set_num_threads(1)


def pytest_sessionfinish(session):
    module, _ = _nvrtc_compiles(session.items)
    if module is not None:
        module.stop_compiles()


def pytest_collection_modifyitems(config, items):
    # The NVRTC compile checks last: they wait on compiles that run on another
    # core from the start, and the tests after them would otherwise run while
    # that core idles.
    items.sort(key=lambda item: getattr(item, "originalname", "") == "test_kernels_compile")
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
