"""A run folder whose checkpoints are not as the last save left them: `latest` gone or naming nothing, a file of
the latest checkpoint truncated. A start resumes from the newest complete checkpoint or stops naming the file and
the command that goes back to the one before; it never starts the stage afresh over its checkpoints."""
from __future__ import annotations

from train import checkpoint as ckpt


def _fake_step(ckpt_dir, step, complete=True):
    (ckpt_dir / f"step-{step}").mkdir(parents=True)
    if complete:
        (ckpt_dir / f"step-{step}" / "meta.json").write_text("{}")


def test_without_latest_the_newest_complete_checkpoint_is_resumed(tmp_path):
    """A crash between a save's rename and its `latest`, or `latest` deleted: the start resumed nothing, and its
    own saves then deleted the checkpoints (step-3 overwritten, the older ones pruned)."""
    assert ckpt.latest_checkpoint(tmp_path / "none") is None and ckpt.latest_checkpoint(tmp_path) is None
    for step in (3, 6):
        _fake_step(tmp_path, step)
    _fake_step(tmp_path, 9, complete=False)
    (tmp_path / "step-12.tmp").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-6"
