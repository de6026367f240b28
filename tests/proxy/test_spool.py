"""proxy.spool: segments rotate at their size, are freed once stored, and are found again after a crash."""

from __future__ import annotations

from pathlib import Path

from proxy.spool import Spool, _lock, claimed, leftovers


def test_segments_rotate_free_and_remove(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "s_abc", segment_bytes=100)
    for seq in range(1, 11):
        spool.write(b"%d %s\n" % (seq, b"x" * 40), seq)  # ~43 bytes: three lines a segment
    names = [p.name for p in spool.segments]
    assert names == ["s_abc.jsonl", "s_abc.1.jsonl", "s_abc.2.jsonl", "s_abc.3.jsonl"]
    assert all(p.exists() for p in spool.segments)
    assert (tmp_path / "s_abc.jsonl").read_bytes().count(b"\n") == 3
    spool.stored(5)  # segment 0 holds 1-3: freed; segment 1 holds 4-6: not all stored yet
    assert [p.name for p in tmp_path.iterdir()] and not (tmp_path / "s_abc.jsonl").exists()
    assert (tmp_path / "s_abc.1.jsonl").exists()
    spool.stored(10)  # the current segment is never freed while the session lives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_abc.3.jsonl"]
    spool.remove()
    assert not list(tmp_path.iterdir())
    spool.write(b"late\n", 11)  # after remove: ignored, nothing recreated
    assert not list(tmp_path.iterdir())


def test_leftovers_groups_sessions_in_segment_order(tmp_path: Path) -> None:
    for name in ("s_b.jsonl", "s_a.10.jsonl", "s_a.jsonl", "s_a.2.jsonl", "s_a.1.jsonl"):
        (tmp_path / name).write_text("{}\n")
    found = dict(leftovers(tmp_path))
    assert list(found) == ["s_a", "s_b"]
    assert [p.name for p in found["s_a"]] == ["s_a.jsonl", "s_a.1.jsonl", "s_a.2.jsonl", "s_a.10.jsonl"]


def test_leftovers_finds_every_segment_of_every_session_in_bounded_batches(tmp_path: Path) -> None:
    """Review L4: a cut by file name could split a session; batches of sessions never do."""
    sessions = [f"s_{i:03d}" for i in range(25)]
    for sid in reversed(sessions):
        for n in range(12):
            (tmp_path / (f"{sid}.jsonl" if n == 0 else f"{sid}.{n}.jsonl")).write_text(f"{n}\n")
    (tmp_path / "unrelated.txt").write_text("x")
    seen = []
    for sid, paths in leftovers(tmp_path, batch=4):  # 7 passes over the directory, 4 sessions each
        assert [int(p.read_text()) for p in paths] == list(range(12))
        seen.append(sid)
        if sid != "s_010":  # recover() deletes what it stored; a live session's files stay
            for p in paths:
                p.unlink()
    assert seen == sessions
    assert sorted(p.name for p in tmp_path.iterdir())[:2] == ["s_010.1.jsonl", "s_010.10.jsonl"]
    assert [sid for sid, _ in leftovers(tmp_path, batch=1)] == ["s_010"]


def test_a_live_spool_is_never_claimed_and_a_dead_one_is_whole(tmp_path: Path) -> None:
    """Replicas sharing a state_dir: one's recovery at start once took the other's live sessions (closed
    their rows, deleted their spool). A live spool holds its newest segment's lock, across rotations."""
    spool = Spool(tmp_path, "s_live", segment_bytes=100)
    for seq in range(1, 8):
        spool.write(b"%d %s\n" % (seq, b"x" * 40), seq)
        with claimed(tmp_path, "s_live") as paths:
            assert paths is None  # held at every point, rotations included
    spool.close()  # what a crash leaves: every segment, no lock
    with claimed(tmp_path, "s_live") as paths:
        assert paths is not None
        assert [p.name for p in paths] == ["s_live.jsonl", "s_live.1.jsonl", "s_live.2.jsonl"]
        with claimed(tmp_path, "s_live") as again:
            assert again is None  # a second recovery (another replica starting) waits its turn
    with claimed(tmp_path, "s_gone") as nothing:
        assert nothing == []



def test_a_new_segment_is_never_seen_under_its_name_before_it_is_locked(tmp_path: Path) -> None:
    """A segment was created under its own name and locked just after: a replica's recovery in between
    claimed it, closed the live session in the store and deleted its spool, and the spool wrote on
    without a lock. Here a recovery looks at the spool at that very moment, at the start and at each
    rotation."""
    seen: list[list[Path] | None] = []

    def lock(fd: int) -> bool:
        with claimed(tmp_path, "s_new") as paths:
            seen.append(paths)
        return _lock(fd)

    spool = Spool(tmp_path, "s_new", segment_bytes=100, lock=lock)
    for seq in range(1, 8):
        spool.write(b"%d %s\n" % (seq, b"x" * 40), seq)
    assert len(seen) == 3 and seen[0] == [] and seen[1:] == [None, None]  # nothing to claim, then held
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_new.1.jsonl", "s_new.2.jsonl", "s_new.jsonl"]
    spool.remove()
    assert not list(tmp_path.iterdir())


def test_a_spool_stopped_by_a_failing_disk_still_holds_its_lock(tmp_path: Path) -> None:
    """A failed write closed the segment, and with it the lock, while the session lived on: a replica
    starting then closed that live session in the store as if hoop had crashed. Here the disk fails as
    the spool starts its second segment."""
    def lock(fd: int) -> bool:
        if Path(f"/proc/self/fd/{fd}").resolve().name.startswith("s_full.1."):
            raise OSError(28, "No space left on device")
        return _lock(fd)

    spool = Spool(tmp_path, "s_full", segment_bytes=10, lock=lock)
    spool.write(b"1 xxxxxxxxxx\n", 1)
    spool.write(b"2 xxxxxxxxxx\n", 2)
    assert spool.failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_full.jsonl"]
    with claimed(tmp_path, "s_full") as paths:
        assert paths is None
    spool.write(b"3 x\n", 3)  # stopped: ignored
    spool.remove()
    assert not list(tmp_path.iterdir())
