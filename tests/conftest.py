from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture
def ethanol_train():
    return DATA / "rmd17_ethanol_train_mini.npz"


@pytest.fixture
def ethanol_test():
    return DATA / "rmd17_ethanol_test_mini.npz"


@pytest.fixture
def aspirin_test():
    return DATA / "rmd17_aspirin_test_mini.npz"
