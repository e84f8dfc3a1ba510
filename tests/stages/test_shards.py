"""Reading img2dataset shards: grouping, keys, unsafe members, truncated and corrupt tars."""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile

import fsspec
import pytest

from stages.schema import DropReason, Status
from stages.shards import ShardContents, output_key, read_shard, split_member_name


def _tar(members) -> bytes:
    """members: (name, bytes) or (name, tarfile type, linkname) tuples, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item in members:
            info = tarfile.TarInfo(item[0])
            if len(item) == 3:
                info.type, info.linkname = item[1], item[2]
                tar.addfile(info)
            else:
                info.size = len(item[1])
                tar.addfile(info, io.BytesIO(item[1]))
    return buf.getvalue()


def _by_key(contents: ShardContents):
    return {s.key: s for s in contents.samples}


def test_reads_every_key_with_its_members(synthetic_shards):
    root, expected = synthetic_shards
    path = root / "00001.tar"
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    with open(path, "rb") as fh:
        contents = read_shard(fh, "00001", source="laion")
    assert contents.error is None
    want = sorted(k for (shard, k) in expected if shard == "00001")
    assert [s.key for s in contents] == want            # file order = key order here
    for sample in contents:
        assert sample.kept and sample.input_shard == "00001" and sample.source == "laion"
        assert sample.image == members[f"{sample.key}.{sample.image_ext}"]
        assert sample.raw_caption == members[f"{sample.key}.txt"]
        assert sample.meta == json.loads(members[f"{sample.key}.json"])
        assert sample.caption is None                   # decoding is ingest's job


def test_groups_by_key_in_file_order_webdataset_convention():
    contents = read_shard(io.BytesIO(_tar([
        ("b.jpg", b"B-image"), ("a.txt", b"caption a"), ("a.JPEG", b"A-image"),
        ("b.txt", b"caption b"), ("a.png", b"second image: ignored"),
        ("d/c.seg.png", b"not the image: extension seg.png"), ("d/c.txt", b"c"),
        ("b.json", b"[1, 2]"), ("README", b"no extension"), ("./e.webp", b"E"), ("e.txt", b"e"),
    ])), "s")
    samples = _by_key(contents)
    assert [s.key for s in contents] == ["b", "a", "d_c", "README", "e"]
    assert samples["e"].image == b"E" and samples["e"].raw_caption == b"e"
    assert samples["a"].image == b"A-image" and samples["a"].image_ext == "jpeg"
    assert samples["b"].raw_caption == b"caption b"
    assert samples["b"].meta == {}                       # json that is not an object
    assert samples["d_c"].drop_reason is DropReason.NO_IMAGE
    assert samples["d_c"].meta == {"input_key": "d/c"}
    assert samples["README"].drop_reason is DropReason.NO_IMAGE
    assert split_member_name("dir/0001.seg.PNG") == ("dir/0001", "seg.png")


def test_bad_json_gives_empty_meta_and_is_not_a_drop():
    contents = read_shard(io.BytesIO(_tar([
        ("1.jpg", b"x"), ("1.txt", b"a dog"), ("1.json", b'{"url": "http://'),
        ("2.jpg", b"x"), ("2.txt", b"a cat"), ("2.json", b"\xff\xfe"),
    ])), "s")
    assert [(s.key, s.status, s.meta) for s in contents] == [
        ("1", Status.KEPT, {}), ("2", Status.KEPT, {})]


@pytest.mark.parametrize("member", [
    ("../evil.jpg", b"x"),
    ("/etc/cron.d/evil.jpg", b"x"),
    ("ok/../../evil.jpg", b"x"),
    ("..\\evil.jpg", b"x"),
    ("evil.jpg", tarfile.SYMTYPE, "/etc/passwd"),
    ("evil.jpg", tarfile.LNKTYPE, "/etc/shadow"),
    ("evil.jpg", tarfile.CHRTYPE, ""),
    ("evil.jpg", tarfile.FIFOTYPE, ""),
    (".hidden.jpg", b"x"),
])
def test_unsafe_members_are_dropped_and_nothing_is_written(member, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _tar([member, ("evil.txt", b"a caption"), ("good.jpg", b"img"), ("good.txt", b"a dog")])
    contents = read_shard(io.BytesIO(data), "s")
    assert contents.error is None
    by_key = _by_key(contents)
    unsafe = [s for s in contents if s.drop_reason is DropReason.UNSAFE_NAME]
    assert len(unsafe) == 1 and unsafe[0].image is None
    assert by_key["good"].kept and by_key["good"].image == b"img"
    for sample in contents:
        assert "." not in sample.key and "/" not in sample.key and "\\" not in sample.key
    assert len({s.key for s in contents}) == len(contents)
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "evil.jpg").exists()


def test_synthetic_escaping_and_symlink_members(synthetic_shards):
    root, expected = synthetic_shards
    with open(root / "00000.tar", "rb") as fh:
        contents = read_shard(fh, "00000")
    by_key = _by_key(contents)
    unsafe = {k for (shard, k), e in expected.items() if e.reason is DropReason.UNSAFE_NAME}
    assert unsafe == {"___evil", next(k for (_, k), e in expected.items()
                                      if e.case == "symlink_member")}
    for key in unsafe:
        assert by_key[key].drop_reason is DropReason.UNSAFE_NAME
    assert by_key["___evil"].meta == {"input_key": "../evil"}


def test_key_without_image_is_dropped_no_image():
    contents = read_shard(io.BytesIO(_tar([("7.txt", b"a dog"), ("7.json", b"{}")])), "s")
    assert [(s.key, s.drop_reason) for s in contents] == [("7", DropReason.NO_IMAGE)]


def test_output_keys_are_dot_free_slash_free_unique_and_deterministic():
    names = ["x/1.jpg", "x_1.jpg", "x_1-1.jpg", "caf\u00e9 bar.jpg", ("k" * 200) + ".jpg",
             ("k" * 200) + "z.jpg"]
    data = _tar([(n, b"img") for n in names])
    first = [s.key for s in read_shard(io.BytesIO(data), "s")]
    again = [s.key for s in read_shard(io.BytesIO(data), "s")]
    assert first == again
    assert first[:4] == ["x_1", "x_1-1", "x_1-1-1", "caf__bar"]
    assert len(set(first)) == len(first)
    assert all(len(k) <= 80 and set(k) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-ABCDEF")
               for k in first[4:])
    assert first[4] != first[5]
    assert output_key("000010042") == "000010042"


def _shard_bytes(root) -> bytes:
    return (root / "00001.tar").read_bytes()


def test_truncated_tar_keeps_what_was_read_and_reports_the_error(synthetic_shards):
    root, expected = synthetic_shards
    data = _shard_bytes(root)
    full = read_shard(io.BytesIO(data), "00001")
    assert full.error is None and len(full) == 12
    # Cut inside a member's data, exactly at a member boundary and inside a header.
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    seventh_image = next(m for m in infos if m.name.startswith(full[6].key) and
                         not m.name.endswith((".txt", ".json")))
    cuts = [seventh_image.offset_data + 10, seventh_image.offset, seventh_image.offset + 100]
    for cut in cuts:
        part = read_shard(io.BytesIO(data[:cut]), "00001")
        assert part.error is not None and part.error.startswith("00001: truncated or corrupt tar")
        keys = [s.key for s in part]
        assert keys == [s.key for s in full][: len(keys)]
        # Every key before the break is complete and kept; the key in progress is dropped.
        assert all(s.kept and s.image == f.image for s, f in zip(part[:-1], full))
        assert part[-1].drop_reason is DropReason.DECODE_ERROR
        assert "breaks off" in part[-1].drop_detail


@pytest.mark.parametrize("data", [b"", b"garbage" * 200, b"\x1f\x8b" + os.urandom(300)])
def test_not_a_tar_gives_no_samples_and_an_error(data):
    contents = read_shard(io.BytesIO(data), "bad")
    assert contents.samples == [] and contents.error.startswith("bad: ")


def test_gzip_shard_and_fsspec_files(synthetic_shards, tmp_path):
    root, _ = synthetic_shards
    data = _shard_bytes(root)
    plain = [(s.key, s.image, s.raw_caption) for s in read_shard(io.BytesIO(data), "00001")]
    (tmp_path / "00001.tar.gz").write_bytes(gzip.compress(data, mtime=0))
    with fsspec.open(str(tmp_path / "00001.tar.gz"), "rb") as fh:
        gz = read_shard(fh, "00001")
    assert gz.error is None and [(s.key, s.image, s.raw_caption) for s in gz] == plain
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/00001.tar", data)
    with fs.open("/bucket/00001.tar", "rb") as fh:
        mem = read_shard(fh, "00001")
    assert mem.error is None and [(s.key, s.image, s.raw_caption) for s in mem] == plain


def test_a_failing_file_object_raises_instead_of_passing_for_a_bad_tar(synthetic_shards):
    """An unreadable location (network, permissions) must stop the run, not look like a bad tar."""
    data = _shard_bytes(synthetic_shards[0])

    class Flaky(io.RawIOBase):
        def __init__(self):
            self.pos = 0

        def readable(self):
            return True

        def readinto(self, buf):
            if self.pos > 4096:
                raise ConnectionResetError("connection reset by peer")
            n = min(len(buf), len(data) - self.pos)
            buf[:n] = data[self.pos:self.pos + n]
            self.pos += n
            return n

    with pytest.raises(ConnectionResetError):
        read_shard(io.BufferedReader(Flaky()), "00001")


def test_oversized_member_is_not_read():
    contents = read_shard(io.BytesIO(_tar([("1.jpg", b"x" * 5000), ("1.txt", b"a dog"),
                                           ("2.jpg", b"y"), ("2.txt", b"a cat")])),
                          "s", max_member_bytes=1000)
    by_key = _by_key(contents)
    assert by_key["1"].drop_reason is DropReason.DECODE_ERROR
    assert "max_member_bytes" in by_key["1"].drop_detail
    assert by_key["2"].kept
