"""Shared test setup: never touch a model hub, never draw progress bars."""

import os

# Must be set before huggingface_hub is first imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SAEV_REPORT_PROGRESS", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one torch thread is faster and immune to other processes' load."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium (tests/headless.py), one per test module."""
    from headless import start_browser

    driver = start_browser(tmp_path_factory.mktemp("chromium"))
    yield driver
    driver.quit()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that drives Chromium `browser`, from the fixture it takes: no test can forget it."""
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
