"""Multi-host set-up without processes: the --distributed flag combinations the CLIs refuse, and the hybrid
ICI/DCN device layout of mesh.dcn_shape (on stand-in devices of 4 hosts x 2, and of 2 TPU slices)."""

import numpy as np
import pytest

from dsjax import sharding
from dsjax.config import load_config, validate_train
from dsjax.convert import main as convert
from dsjax.errors import ConfigError
from dsjax.main import main


@pytest.mark.parametrize("flags, sentence", [
    (["--process_id=1"], "--process_id is only read with --distributed"),
    (["--distributed", "--process_id=1"], "--process_id needs --num_processes too"),
    (["--distributed", "--num_processes=2"], "--num_processes needs --process_id too"),
    (["--distributed", "--num_processes=2", "--process_id=2", "--coordinator_address=h:1"], "must be in [0, 2)"),
    (["--distributed", "--num_processes=2", "--process_id=1"], "need --coordinator_address=HOST:PORT"),
    (["--distributed", "--num_processes=2", "--process_id=0", "--coordinator_address=h"], "must be HOST:PORT"),
])
def test_bad_flag_combinations_are_one_sentence(flags, sentence, capsys, monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert main(["dsjax.main", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert sentence in err and err.count("\n") == 0
    assert convert(["export-hf", "a", "b", *flags]) == 2
    assert sentence in capsys.readouterr().err


class Device:
    """What the mesh layout reads of a device."""

    def __init__(self, id, process_index, slice_index=None):
        self.id, self.process_index, self.platform, self.device_kind = id, process_index, "cpu", "cpu"
        if slice_index is not None:
            self.slice_index = slice_index

    def __repr__(self):
        return f"d{self.id}"


HOSTS = [Device(i, i // 2) for i in range(8)]  # 4 hosts of 2 devices


def _hosts(grid):
    return np.vectorize(lambda d: d.process_index)(grid)


def test_dcn_axes_cross_hosts_and_ici_axes_stay_inside():
    grid = sharding.device_grid((2, 4, 1), (2, 2, 1), HOSTS)  # data over 2 hosts, fsdp over 2 hosts x 2 devices
    assert _hosts(grid)[:, :, 0].tolist() == [[0, 0, 1, 1], [2, 2, 3, 3]]
    grid = sharding.device_grid((4, 2, 1), (4, 1, 1), HOSTS)  # fsdp inside a host, data across
    assert _hosts(grid)[:, :, 0].tolist() == [[0, 0], [1, 1], [2, 2], [3, 3]]
    assert [d.id for d in sharding.device_grid((8, 1, 1), None, HOSTS).ravel()] == list(range(8))


def test_slices_go_over_dcn_even_unasked():
    devices = [Device(i, i // 2, slice_index=i // 4) for i in range(8)]  # 2 slices of 2 hosts
    slices = np.vectorize(lambda d: d.slice_index)(sharding.device_grid((2, 2, 2), None, devices))
    assert (slices[0] == 0).all() and (slices[1] == 1).all()  # the first axis spans the slices
    slices = np.vectorize(lambda d: d.slice_index)(sharding.device_grid((1, 8, 1), (1, 2, 1), devices))
    assert slices[0, :, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("dcn, sentence", [
    ((3, 1, 1), "spans 3 processes, but the devices are on 4"),
    ((1, 1, 4), "does not divide mesh.shape=(8, 1, 1)"),
])
def test_dcn_shape_that_does_not_fit_the_devices_is_one_sentence(dcn, sentence):
    with pytest.raises(ConfigError, match=sentence.replace("(", r"\(").replace(")", r"\)")):
        sharding.device_grid((8, 1, 1), dcn, HOSTS)


@pytest.mark.parametrize("dcn", [(2, 1), (0, 1, 1), (1.5, 1, 1)])
def test_malformed_dcn_shape_is_refused_with_the_config(dcn):
    config = load_config("tiny")
    config.mesh.dcn_shape = dcn
    with pytest.raises(ConfigError, match=r"mesh.dcn_shape=.* needs one positive size per mesh axis \(3\)"):
        validate_train(config)
