"""benchmarks.peer_arcface_torch: the vendored arcface_torch files are the upstream ones, and
one step of each side runs and computes the same loss from the same weights."""

import hashlib
import re
import shutil

import pytest
import torch

from benchmarks import peer_arcface_torch as peer

README_ROW = re.compile(r"^\| `(?P<name>[^`]+)` \| `recognition/arcface_torch/(?P=name)` \| "
                        r"`(?P<blob>[0-9a-f]{40})` \|$", re.MULTILINE)


def git_blob_id(data: bytes) -> str:
    """What ``git hash-object`` prints: the id the upstream tree gives the file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_vendored_files_are_the_upstream_blobs():
    readme = (peer.PEER / "README.md").read_text()
    rows = {m["name"]: m["blob"] for m in README_ROW.finditer(readme)}
    assert sorted(rows) == sorted(peer.check_vendored())  # every hashed file has its upstream id
    for name, blob in rows.items():
        assert git_blob_id((peer.PEER / name).read_bytes()) == blob, name


def test_a_changed_or_missing_copy_is_refused(tmp_path):
    copy = tmp_path / "arcface_torch"
    shutil.copytree(peer.PEER, copy)
    losses = copy / "losses.py"
    losses.write_bytes(losses.read_bytes().replace(b"self.s = s", b"self.s = s * 1.0"))
    with pytest.raises(peer.VendoredFileError, match=r"losses\.py: not the pinned upstream"):
        peer.check_vendored(copy)
    losses.unlink()
    with pytest.raises(peer.VendoredFileError, match=r"losses\.py: missing"):
        peer.check_vendored(copy)


def test_the_peer_step_is_train_v2s_loop_body():
    body = peer.train_v2_step()
    names = set(body.co_names)
    assert {"backbone", "module_partial_fc", "clip_grad_norm_", "lr_scheduler", "loss_am"} <= names


@pytest.fixture
def one_thread():
    """One thread: on a loaded machine, two threads wait at every operator's barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_one_step_of_each_side_from_the_same_weights_gives_the_same_loss(one_thread):
    result = peer.run([18], batch=2, classes=10, steps=1, device=torch.device("cpu"),
                      layouts=(False,))[0]
    facetrain_loss, arcface_torch_loss = result.first_losses
    # Two implementations of IResNet-18 + ArcFace on one batch, from the same initial weights.
    assert facetrain_loss == pytest.approx(arcface_torch_loss, rel=1e-5)
    assert result.steps == (2, 2)  # both sides stepped: a warm-up and one timed step
    assert result.facetrain > 0 and result.arcface_torch > 0 and result.skipped == 0
