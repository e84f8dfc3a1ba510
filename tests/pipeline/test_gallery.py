"""Gallery: output shards read back, boxes drawn in the EXIF frame, a deterministic, escaped page."""
from __future__ import annotations

import io
import re
import tarfile

import pytest
from PIL import Image

from pipeline.gallery import draw_sample, gallery_from_shards, phrase_groups, write_gallery
from pipeline.storage import StorageError, iter_output_samples
from stages.readers.output import read_output_samples
from stages.schema import Phrase, Sample, check_record
from stages.write import encode_shard

GREY = (128, 128, 128)
LABELER = {"model": "glip_t", "checkpoint_sha256": "ab" * 32, "config_sha256": "cd" * 32,
           "min_score": 0.3}
DOG = "a brown dog chasing a red ball on the beach"
EVIL = "<script>alert('x')</script> a cat & a hat"


def encode(size, color=GREY, fmt="JPEG", orientation=None) -> bytes:
    buf = io.BytesIO()
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    Image.new("RGB", size, color).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def sample(key, caption, spans, boxes, tokens, scores=(), size=(200, 120), image=None, ext="jpg",
           shard="00000") -> Sample:
    return Sample(key=key, input_shard=shard, source="test", image=image or encode(size),
                  image_ext=ext, caption=caption, width=size[0], height=size[1],
                  phrases=[Phrase(caption[s:e], (s, e)) for s, e in spans], boxes=boxes,
                  tokens_positive=tokens, scores=list(scores),
                  labeler=LABELER if scores else None)


def shard_samples() -> dict[str, list[Sample]]:
    first = [
        sample("dog", DOG, [(0, 11), (20, 30), (34, 43)], [[20, 30, 120, 110], [140, 60, 180, 100]],
               [[[0, 11]], [[20, 30]]], scores=[0.82, 0.4]),
        # stored 160x100 with orientation 6: displayed (and boxed) as 100x160
        sample("rotated", "a tall tower", [(0, 12)], [[10, 100, 90, 150]], [[[0, 12]]],
               scores=[0.9], size=(100, 160), image=encode((160, 100), orientation=6)),
        sample("evil", EVIL, [(28, 33), (36, 41)], [[5, 5, 60, 60]], [[[28, 33]]], scores=[0.7],
               size=(80, 80), image=encode((80, 80), fmt="PNG"), ext="png"),
        sample("weak", "a faint ghost", [(0, 13)], [[1, 1, 30, 30]], [[[0, 13]]], scores=[0.35],
               size=(64, 64)),
    ]
    second = [
        sample(f"s1-{i}", f"a box number {i}", [(0, 5)], [[2, 2, 40, 30]], [[[0, 5]]],
               scores=[0.5 + i / 20], size=(64, 48), shard="00001") for i in range(4)
    ] + [
        # human labels: no scores, one box grounding two spans that match no phrase
        sample("human", "a man and a woman", [(0, 5), (10, 17)], [[3, 3, 50, 40]],
               [[[0, 5], [10, 17]]], size=(64, 48), image=encode((64, 48), fmt="WEBP"),
               ext="webp", shard="00001"),
    ]
    return {"00000": first, "00001": second}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("output")
    made = shard_samples()
    paths = []
    for name, samples in made.items():
        path = root / f"{name}.tar"
        path.write_bytes(encode_shard(samples))
        paths.append(str(path))
    records = {s.key: s.to_record() for samples in made.values() for s in samples}
    return paths, records


def page_keys(page: str) -> list[str]:
    return re.findall(r'<figure class="card" data-key="([^"]*)">', page)


def test_read_output_samples_gives_back_every_record_and_image_in_order(shards):
    paths, records = shards
    got = list(iter_output_samples(paths))
    assert [s.key for s in got] == list(records)
    assert [s.input_shard for s in got] == ["00000"] * 4 + ["00001"] * 5
    for item in got:                                   # Sample.from_record inverts to_record
        assert item.to_record() == records[item.key]
    by_key = {s.key: s for s in got}
    assert by_key["evil"].image_ext == "png" and by_key["human"].image_ext == "webp"
    assert by_key["rotated"].image == shard_samples()["00000"][1].image       # original bytes
    with open(paths[0], "rb") as fh:                                          # bytes or a file
        assert [s.key for s in read_output_samples(fh.read())] == list(records)[:4]
    assert list(read_output_samples(encode_shard([]))) == []     # every sample was dropped


def test_damaged_shards_are_errors_that_name_the_shard(shards, tmp_path):
    data = open(shards[0][0], "rb").read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    boundary = members[2].offset                       # cut right after the first sample's pair
    got = []
    with pytest.raises(ValueError, match=r"cut\.tar: \(end\): .*end-of-archive marker"):
        for sample in read_output_samples(data[:boundary], name="cut.tar"):
            got.append(sample.key)
    assert got == ["dog"]                              # what came before the cut was read
    inside = members[1].offset_data + 10               # cut inside the first record
    with pytest.raises(ValueError, match=r"cut\.tar: .*(truncated|not a readable tar)"):
        list(read_output_samples(data[:inside], name="cut.tar"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("k1.json")
        body = b'{"key": "k1", "caption": "x", "width": 4, "height": 4, "boxes": [[0, 0, 9]]}'
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    with pytest.raises(ValueError, match=r"odd\.tar: k1\.json: boxes\[0\]: expected 4 finite"):
        list(read_output_samples(buf.getvalue(), name="odd.tar"))
    record = shard_samples()["00000"][0].to_record()
    with pytest.raises(ValueError, match=r"tokens_positive\[1\]\[0\]: expected a \[start, end\)"):
        check_record({**record, "tokens_positive": [[[0, 11]], [[20, 99]]]}, "x")
    with pytest.raises(StorageError, match="missing.tar does not exist"):
        list(iter_output_samples([str(tmp_path / "missing.tar")]))


def test_phrases_get_distinct_colours_in_caption_order():
    record = shard_samples()["00000"][0].to_record()
    box_group, groups = phrase_groups(record)
    assert [groups[g]["text"] for g in box_group] == ["a brown dog", "a red ball"]
    assert groups[0]["color"] != groups[1]["color"] and groups[2]["color"] is None
    human = shard_samples()["00001"][-1].to_record()
    box_group, groups = phrase_groups(human)
    assert groups[box_group[0]]["text"] == "a man a woman"      # two spans: a group of its own
    assert groups[box_group[0]]["color"] and groups[0]["color"] is None


def test_drawn_boxes_change_pixels_at_their_border_in_the_phrase_colour():
    dog = shard_samples()["00000"][0]
    record = dog.to_record()
    _, groups = phrase_groups(record)
    drawn = draw_sample(record, dog.image)
    assert drawn.size == (200, 120)
    plain = Image.open(io.BytesIO(dog.image)).convert("RGB")
    for x, y in [(20, 70), (120, 70), (70, 110)]:                 # left, right, bottom edges
        assert drawn.getpixel((x, y)) == groups[0]["color"]
        assert max(abs(a - b) for a, b in zip(plain.getpixel((x, y)), GREY)) < 8
    assert drawn.getpixel((60, 70)) == plain.getpixel((60, 70))   # inside: untouched
    assert drawn.getpixel((140, 80)) == groups[1]["color"]
    # A large image gets thicker lines (and a larger font) so both stay legible.
    big = dict(record, width=2000, height=1200,
               boxes=[[200, 300, 1200, 1100], [1400, 600, 1800, 1000]])
    drawn = draw_sample(big, encode((2000, 1200)))
    assert all(drawn.getpixel((200 + dx, 700)) == groups[0]["color"] for dx in range(6))
    # max_side shrinks the image and the boxes with it
    small = draw_sample(big, encode((2000, 1200)), max_side=500)
    assert small.size == (500, 300) and small.getpixel((50, 175)) == groups[0]["color"]


def test_boxes_are_drawn_in_the_exif_oriented_frame():
    rotated = shard_samples()["00000"][1]
    record = rotated.to_record()
    drawn = draw_sample(record, rotated.image)
    assert drawn.size == (100, 160)
    assert drawn.getpixel((10, 125)) == phrase_groups(record)[1][0]["color"]


def test_gallery_lists_exactly_the_selected_keys_deterministically(shards, tmp_path):
    paths, records = shards
    first = gallery_from_shards(paths, tmp_path / "a", n=4, seed=7)
    page = (tmp_path / "a" / "index.html").read_text()
    assert first["seen"] == first["eligible"] == len(records) and first["shown"] == 4
    assert page_keys(page) == first["keys"] and len(set(first["keys"])) == 4
    assert set(first["keys"]) <= set(records)
    again = gallery_from_shards(list(reversed(paths)), tmp_path / "b", n=4, seed=7)
    assert again["keys"] == first["keys"]                         # shard order does not matter
    others = [gallery_from_shards(paths, tmp_path / f"s{s}", n=4, seed=s)["keys"]
              for s in range(3)]
    assert len({tuple(sorted(k)) for k in others}) > 1            # the seed picks the samples
    for png in first["images"]:
        assert (tmp_path / "a" / png).is_file() and f'src="{png}"' in page


def test_gallery_escapes_captions_and_keeps_oriented_sizes(shards, tmp_path):
    paths, records = shards
    summary = gallery_from_shards(paths, tmp_path, n=100, seed=0, title="<b>run</b>")
    page = (tmp_path / "index.html").read_text()
    assert sorted(page_keys(page)) == sorted(records)
    assert "<script" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "a cat &amp; a hat" not in page                        # phrases are split into marks
    assert "&amp;" in page and "<b>run</b>" not in page and "&lt;b&gt;run&lt;/b&gt;" in page
    assert re.search(r"<mark[^>]*>a cat</mark>", page)            # grounded phrase highlighted
    assert '<span class="ungrounded">a hat</span>' in page        # phrase without a box
    sizes = {k: Image.open(tmp_path / p).size for k, p in zip(summary["keys"], summary["images"])}
    assert sizes["rotated"] == (100, 160) and sizes["dog"] == (200, 120)
    assert "0.82" in page and "glip_t" in page and "none (human labels)" in page


def test_gallery_min_score_hides_boxes_and_filters_samples(shards, tmp_path):
    paths, records = shards
    summary = gallery_from_shards(paths, tmp_path, n=100, min_score=0.5, only_with_boxes=True)
    # "weak" (0.35) loses its only box; "dog" loses its 0.4 box; "human" has no scores: kept
    assert summary["boxes_below_min_score"] == 2
    assert summary["eligible"] == len(records) - 1 and "weak" not in summary["keys"]
    png = tmp_path / summary["images"][summary["keys"].index("dog")]
    drawn = Image.open(png).convert("RGB")
    _, groups = phrase_groups(records["dog"])
    assert drawn.getpixel((20, 70)) == groups[0]["color"]
    assert drawn.getpixel((140, 80)) != groups[1]["color"]       # the 0.4 box is not drawn
    shown_all = write_gallery(iter_output_samples(paths), tmp_path / "all", n=100, min_score=0.5)
    assert "weak" in shown_all["keys"]                            # without only_with_boxes
    with pytest.raises(ValueError, match="n: expected a positive"):
        write_gallery([], tmp_path / "none", n=0)
