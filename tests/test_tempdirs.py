"""compression.tempdirs: temporary folders named for their process, swept once that process is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from compression import tempdirs
from compression.tempdirs import owner_pid, pid_alive, sweep


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_prefix_carries_this_pid():
    assert tempdirs.prefix("compression-trainer") == f"compression-trainer-{os.getpid()}-"
    name = os.path.basename(tempfile.mkdtemp(prefix=tempdirs.prefix("x"), dir=tempfile.gettempdir()))
    os.rmdir(os.path.join(tempfile.gettempdir(), name))
    assert owner_pid(name, "x") == os.getpid()


@pytest.mark.parametrize(("name", "stem", "pid"), [
    ("compression-trainer-123-ab_c9xyz", "compression-trainer", 123),
    (".pruned_student_int8-0123abcd-77-q1w2e3r4", r"\..+", 77),
    ("compression-trainer-ab_c9xyz", "compression-trainer", None),  # older names: no PID
    ("compression-trainer-123-ab-c", "compression-trainer", None),  # mkdtemp never puts a hyphen there
    ("other-123-abcdefgh", "compression-trainer", None),
])
def test_owner_pid(name, stem, pid):
    assert owner_pid(name, stem) == pid


def test_pid_alive():
    assert pid_alive(os.getpid())
    assert not pid_alive(dead_pid())
    assert not pid_alive(0)


def test_a_zombie_is_not_alive():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: a zombie
    try:
        assert not pid_alive(proc.pid)
    finally:
        proc.wait()


def test_sweep_removes_only_folders_of_dead_processes(tmp_path):
    dead = dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = tmp_path / f"compression-trainer-{dead}-abcdefgh"
        kept = [tmp_path / f"compression-trainer-{alive.pid}-abcdefgh",
                tmp_path / f"compression-trainer-{os.getpid()}-x",
                tmp_path / f"other-{dead}-abcdefgh", tmp_path / "compression-trainer-abcdefgh"]
        for folder in [gone, *kept]:
            (folder / "sub").mkdir(parents=True)
        (tmp_path / f"compression-trainer-{dead}-file").write_text("a file: not ours")
        assert sweep(tmp_path, "compression-trainer") == [gone]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [p.name for p in kept] + [f"compression-trainer-{dead}-file"])
    finally:
        alive.kill()
        alive.wait()


def test_sweep_asks_before_removing(tmp_path):
    folder = tmp_path / f"compression-trainer-{dead_pid()}-abcdefgh"
    folder.mkdir()
    assert sweep(tmp_path, "compression-trainer", may_remove=lambda f: False) == []
    assert folder.is_dir()


def test_sweep_of_a_missing_folder_is_nothing(tmp_path):
    assert sweep(tmp_path / "nowhere", "x") == []


def test_finetune_sweeps_the_trainer_folders_of_dead_runs(tmp_path, monkeypatch, tiny_model, tiny_tokenizer):
    from compression import train
    from compression.data import tokenize
    from conftest import make_sentences

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"compression-trainer-{dead_pid()}-abcdefgh"
    stale.mkdir()
    used = []
    real = train.training_arguments

    def spy(config, output_dir, use_cpu=None, *rest):
        used.append(output_dir)
        return real(config, output_dir, use_cpu, *rest)

    monkeypatch.setattr(train, "training_arguments", spy)
    import datasets

    sentences = make_sentences(8)
    rows = tokenize(datasets.Dataset.from_dict({"sentence": [s for s, _ in sentences],
                                                "label": [y for _, y in sentences]}), tiny_tokenizer, 16)
    train.finetune(tiny_model, tiny_tokenizer, rows, train.TrainConfig(epochs=1.0, batch_size=4, bf16=False))
    assert not stale.exists()
    (folder,) = used
    assert os.path.basename(folder).startswith(f"compression-trainer-{os.getpid()}-")
    assert list(tmp_path.iterdir()) == []  # and its own folder is gone when it returns
