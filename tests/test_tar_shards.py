"""The tar parser against Python's tarfile: formats, long names, odd members, gzip, damage."""

from __future__ import annotations

import io
import tarfile

import pytest
from data_samples import make_samples

from clip_jax.data import tar_shards
from clip_jax.data.make_shards import write_shards


def _reference(path):
    """(key, {ext: data}) per sample as tarfile reads them, grouped like WebDataset."""
    out, current = [], None
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            prefix = m.name[: len(m.name) - len(base)]
            stem, ext = base.split(".", 1)
            key = prefix + stem
            if key != current:
                out.append((key, {}))
                current = key
            out[-1][1][ext.lower()] = tar.extractfile(m).read()
    return out


def _write(path, fmt, gz=False):
    long_dir = "d" * 120 + "/sub"
    members = [
        ("a/000.jpg", b"\xff\xd8jpeg0"),
        ("a/000.txt", b"cap 0"),
        (f"{long_dir}/001.JPG", b"jpeg1" * 300),
        (f"{long_dir}/001.json", b"{}"),
        ("noext", b"ignored"),
        ("002.seg.png", b"png2"),
        ("002.txt", "é".encode()),
    ]
    with tarfile.open(path, "w:gz" if gz else "w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("a"))  # a non-file member (type 0 with size 0 is a file)
        d = tarfile.TarInfo("adir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1.5  # a float mtime makes pax headers in PAX_FORMAT
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("003.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "a/000.jpg"
        tar.addfile(link)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("gz", [False, True])
def test_parser_matches_tarfile(tmp_path, fmt, gz):
    path = str(tmp_path / ("s.tar.gz" if gz else "s.tar"))
    _write(path, fmt, gz)
    expected = _reference(path)
    assert [k for k, _ in expected] == ["a/000", "d" * 120 + "/sub/001", "002"]
    got = list(tar_shards.iter_samples(path))
    assert got == expected
    assert tar_shards.count_records(path) == len(expected)
    for start in range(len(expected) + 1):
        assert list(tar_shards.iter_samples(path, start=start)) == expected[start:]


def test_damage_keeps_what_came_before(tmp_path):
    path = str(tmp_path / "s.tar")
    _write(path, tarfile.GNU_FORMAT)
    data = open(path, "rb").read()
    full = _reference(path)
    for cut in (len(data) // 3, len(data) // 2, len(data) - 1500):
        damaged = str(tmp_path / f"cut{cut}.tar")
        with open(damaged, "wb") as f:
            f.write(data[:cut])
        got = list(tar_shards.iter_samples(damaged))
        assert tar_shards.count_records(damaged) == len(got)
        assert [k for k, _ in got] == [k for k, _ in full[: len(got)]]
    # A corrupted header (checksum mismatch) ends the shard there, counted the same way.
    corrupt = bytearray(data)
    headers = [i for i in range(0, len(data), 512) if data[i + 257 : i + 262] == b"ustar"]
    corrupt[headers[-2] + 10] ^= 0x11
    damaged = str(tmp_path / "corrupt.tar")
    with open(damaged, "wb") as f:
        f.write(bytes(corrupt))
    got = list(tar_shards.iter_samples(damaged))
    assert 0 < len(got) <= len(full) and tar_shards.count_records(damaged) == len(got)


def test_sample_offsets_make_a_seek_equal_to_a_walk(tmp_path, monkeypatch):
    # A read from the start notes every 4th sample's byte offset; starting from one of them
    # gives the same samples as walking the headers, and walks only the members after it.
    monkeypatch.setattr(tar_shards, "SEEK_EVERY", 4)
    (path,) = write_shards(make_samples(22, prefix="o"), str(tmp_path / "o"), fmt="tar")
    offsets = []
    assert tar_shards.count_records(path, offsets) == 22
    assert len(offsets) == 6 and offsets[0] == 0 and offsets == sorted(set(offsets))
    walked = []
    real = tar_shards._iter_members

    def counting(f, want_data):
        for member in real(f, want_data):
            walked.append(member)
            yield member

    monkeypatch.setattr(tar_shards, "_iter_members", counting)
    walk = list(tar_shards.iter_records(path, start=17))
    walked_without = len(walked)
    walked.clear()
    seek = list(tar_shards.iter_records(path, start=17, seek_hint=(16, offsets[4])))
    assert seek == walk and len(walk) == 5
    assert len(walked) < walked_without / 3
    # A read that starts inside the shard notes no offsets (it does not see them all).
    later = []
    list(tar_shards.iter_samples(path, start=3, offsets=later))
    assert later == []
