"""One line for a user error, also when a DataLoader worker process raised it."""

import pytest
from torch.utils.data import DataLoader, Dataset

from facetrain.cli import user_errors
from facetrain.data.images import DatasetError

MESSAGE = "verification set 'lfw': a.jpg has a readable header but does not decode"


class Broken(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise DatasetError(MESSAGE)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_data_error_is_one_line_with_or_without_workers(workers):
    with pytest.raises(SystemExit) as stop, user_errors("facetrain"):
        list(DataLoader(Broken(), num_workers=workers))
    assert str(stop.value) == f"facetrain: data error: {MESSAGE}"
