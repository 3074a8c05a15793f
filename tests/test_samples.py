"""Sample files: reused only with the same provenance, never half written, resumed in whole batches after a kill."""

import json
import subprocess
import sys
import textwrap

from sdd import samples


def test_write_read_and_a_changed_provenance_or_damage_means_sample_again(tmp_path):
    path = tmp_path / "s.jsonl"
    rows = [{"id": "a", "correct": [True]}, {"id": "b", "correct": [False]}]
    samples.write(path, {"model": "m1"}, rows, checkpoint={"label": "x"})
    assert json.loads(path.read_text().splitlines()[0]) == {"provenance": {"model": "m1"}, "checkpoint": {"label": "x"}}
    assert samples.read(path, {"model": "m1"}) == rows == samples.rows(path)
    assert samples.read(path, {"model": "m2"}) is None
    assert samples.read(tmp_path / "absent.jsonl", {"model": "m1"}) is None and samples.rows(tmp_path / "absent") == []
    path.write_text(path.read_text()[:-5])  # a row cut short
    assert samples.read(path, {"model": "m1"}) is None


def test_partial_file_resumes_whole_batches_after_a_real_kill(tmp_path):
    """A child process appends two batches of two rows, starts a third and dies mid-line (os._exit)."""
    path = tmp_path / "teacher.jsonl"
    child = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from sdd import samples
        partial = samples.Partial(Path({str(path)!r}), {{"teacher": "t"}})
        assert partial.resume(whole=2) == []
        with partial.append() as out:
            out.write_rows([{{"i": 0}}, {{"i": 1}}])
            out.write_rows([{{"i": 2}}, {{"i": 3}}])
            out.handle.write('{{"i": 4}}\\n{{"i": 5')  # the third batch, torn by the kill
            out.handle.flush()
            os._exit(9)
    """)
    assert subprocess.run([sys.executable, "-c", child]).returncode == 9
    partial = samples.Partial(path, {"teacher": "t"})
    assert not path.exists() and partial.file.is_file()
    assert partial.resume(whole=2) == [{"i": i} for i in range(4)]  # row 4 is whole but its batch is not
    assert partial.file.read_text().splitlines()[1:] == [json.dumps({"i": i}) for i in range(4)]
    with partial.append() as out:
        out.write_rows([{"i": 4}, {"i": 5}])
    partial.finish()
    assert samples.read(path, {"teacher": "t"}) == [{"i": i} for i in range(6)] and not partial.file.exists()
    # another teacher's partial file is started afresh, not reused
    other = samples.Partial(path, {"teacher": "u"})
    other.file.write_text(json.dumps({"provenance": {"teacher": "t"}}) + "\n" + json.dumps({"i": 0}) + "\n")
    assert other.resume(whole=1) == [] and other.file.read_text() == json.dumps({"provenance": {"teacher": "u"}}) + "\n"


def test_partial_resumes_whole_groups_of_uneven_sizes_and_a_reader_leaves_the_file_alone(tmp_path):
    """Warmup's shards: groups of 3, 3 and 1 rows (a rank's positions in chunks of 5, 5 and 2); a torn row
    of the second group keeps only the first. A tensor-parallel peer (writer=False) reads the same rows
    and changes nothing; an extra header key (the shard) must match too."""
    path = tmp_path / "s.jsonl.shard1-of-2"
    partial = samples.Partial(path, {"teacher": "t"}, shard=[1, 2])
    assert partial.resume(whole=[3, 3, 1]) == []
    with partial.append() as out:
        out.write_rows([{"i": i} for i in range(5)])
    before = partial.file.read_bytes()
    assert samples.Partial(path, {"teacher": "t"}, shard=[1, 2]).resume(whole=[3, 3, 1], writer=False) == [
        {"i": i} for i in range(3)]
    assert partial.file.read_bytes() == before
    assert partial.resume(whole=[3, 3, 1]) == [{"i": i} for i in range(3)]
    assert len(partial.file.read_text().splitlines()) == 1 + 3
    assert samples.Partial(path, {"teacher": "t"}, shard=[0, 2]).resume(whole=[3, 3, 1], writer=False) == []
    with partial.append() as out:
        out.write_rows([{"i": i} for i in range(3, 7)])
    partial.finish()
    assert samples.read(path, {"teacher": "t"}, shard=[1, 2]) == [{"i": i} for i in range(7)]
    assert samples.read(path, {"teacher": "t"}, shard=[0, 2]) is None
    assert samples.read(path, {"teacher": "t"}) == [{"i": i} for i in range(7)]  # keys not asked for are not compared
