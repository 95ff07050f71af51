"""Shard reading: real tars in, samples or error records out, never an exception (no Ray, no model).

Most cases here stop Ray's ``read_webdataset`` (non-contiguous keys, duplicate members, ``a.__key__``) or
pass through it silently (a truncated shard loses its tail, a sparse member is expanded to 1 GiB); the
others pin the normal img2dataset layout and webdataset's naming rule."""

import functools
import gzip
import http.server
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading

import pytest
from PIL import Image

from diffedit.pipelines.shards import DEFAULT_MAX_MEMBER_BYTES, RawSample, iter_shard


def jpeg(seed: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((size, size), 40 + seed).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path, members, fmt=tarfile.GNU_FORMAT):
    """Members are (name, bytes) for regular files or ready TarInfo objects (links, devices, ...)."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def special(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def img2dataset_samples(n=3):
    return {f"{i:09d}": {"jpg": jpeg(i, 32 + 8 * i), "txt": f"a photo of dog {i}".encode(),
                         "json": json.dumps({"caption": f"dog {i}", "width": 32}).encode()} for i in range(n)}


def write_wds(path, samples):
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for key, members in samples.items():
            sink.write({"__key__": key, **members})
    return str(path)


def good(records):
    return {r.key: r.members for r in records if r.error is None}


def errors(records):
    return {r.key: r.error for r in records if r.error is not None}


# --- the normal case and webdataset's naming rules -------------------------------------------------------

def test_img2dataset_layout_written_by_webdataset(tmp_path):
    samples = img2dataset_samples()
    samples["000000001"]["mask.png"] = b"\x89PNG fake mask"
    records = list(iter_shard(write_wds(tmp_path / "00000.tar", samples)))
    assert [r.key for r in records] == list(samples)
    assert good(records) == samples
    assert not any(r.shard_error for r in records)


def test_key_is_name_up_to_first_dot_of_basename_and_others_are_ignored(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("dir.v2/a.b.png", b"1"), ("dir.v2/a.b.txt", b"2"), ("README", b"x"),
                                           ("__meta__", b"x"), ("c.jpg", b"3")])
    assert good(iter_shard(shard)) == {"dir.v2/a": {"b.png": b"1", "b.txt": b"2"}, "c": {"jpg": b"3"}}


def test_non_contiguous_members_of_a_key_are_merged(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("a.png", b"A"), ("b.png", b"B"), ("b.txt", b"b"), ("a.txt", b"a")])
    records = list(iter_shard(shard))
    assert records == [RawSample("a", {"png": b"A", "txt": b"a"}), RawSample("b", {"png": b"B", "txt": b"b"})]


# --- sample errors: the sample is an error record, the others are read -----------------------------------

def test_duplicate_member_is_an_error_for_its_sample(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("a.png", b"1"), ("a.png", b"2"), ("a.txt", b"a"), ("b.png", b"B")])
    records = list(iter_shard(shard))
    assert errors(records) == {"a": "duplicate member 'a.png' (2 copies)"}
    assert good(records) == {"b": {"png": b"B"}}
    assert records[0].members == {}


@pytest.mark.parametrize("ext", ["__key__", "__url__", "__local_path__"])
def test_reserved_extension_is_an_error_for_its_sample(tmp_path, ext):
    shard = write_tar(tmp_path / "s.tar", [("a.png", b"A"), (f"a.{ext}", b"evil"), ("b.png", b"B")])
    records = list(iter_shard(shard))
    assert errors(records) == {"a": f"member 'a.{ext}' has a reserved extension '{ext}'"}
    assert good(records) == {"b": {"png": b"B"}}


def test_member_over_the_size_limit_is_refused(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("a.png", b"x" * 1000), ("a.txt", b"a"), ("b.png", b"x" * 999)])
    records = list(iter_shard(shard, max_member_bytes=999))
    assert errors(records) == {"a": "member 'a.png' is 1000 bytes, over the limit of 999 (--max-member-bytes)"}
    assert good(records) == {"b": {"png": b"x" * 999}}


def test_sample_over_the_total_limit_is_refused(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("a.png", b"x" * 600), ("a.mask.png", b"x" * 600), ("b.png", b"x")])
    records = list(iter_shard(shard, max_member_bytes=1000, max_sample_bytes=1000))
    assert errors(records) == {"a": "members total 1200 bytes, over the limit of 1000 (--max-sample-bytes)"}
    assert good(records) == {"b": {"png": b"x"}}


def test_key_that_is_not_utf8_is_escaped_and_refused(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("a\udcff.png", b"A"), ("b.png", b"B")])  # raw byte 0xff in the name
    assert errors(iter_shard(shard)) == {"a\\udcff": "key is not valid UTF-8"}


def test_links_directories_devices_and_fifos_are_ignored_never_followed(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [
        ("a.txt", b"caption"),
        special("a.png", tarfile.SYMTYPE, "/etc/passwd"),
        special("a.json", tarfile.LNKTYPE, "a.txt"),
        special("a.dir", tarfile.DIRTYPE),
        special("a.dev", tarfile.CHRTYPE),
        special("a.fifo", tarfile.FIFOTYPE),
        special("c.png", tarfile.SYMTYPE, "../../secret.png"),  # a key with no regular member: no sample
    ])
    assert list(iter_shard(shard)) == [RawSample("a", {"txt": b"caption"})]


def gnu_tar():
    tar = shutil.which("tar")
    if tar is None or "GNU tar" not in subprocess.run([tar, "--version"], capture_output=True, text=True).stdout:
        pytest.skip("GNU tar is needed to write a GNU sparse member")
    return tar


def test_sparse_member_is_judged_by_its_expanded_size_before_reading(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "a.png", "wb") as f:
        os.truncate(f.fileno(), 2**30)  # 1 GiB of holes
    (src / "a.txt").write_bytes(b"bomb")
    (src / "b.txt").write_bytes(b"fine")
    shard = tmp_path / "sparse.tar"
    subprocess.run([gnu_tar(), "--sparse", "-cf", str(shard), "-C", str(src), "a.png", "a.txt", "b.txt"], check=True)
    assert shard.stat().st_size < 100_000
    records = list(iter_shard(str(shard)))
    assert errors(records) == {"a": f"member 'a.png' is 1073741824 bytes, over the limit of {DEFAULT_MAX_MEMBER_BYTES} "
                                    "(--max-member-bytes)"}
    assert good(records) == {"b": {"txt": b"fine"}}


def test_sparse_member_under_the_limit_is_expanded(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "a.png", "wb") as f:
        os.truncate(f.fileno(), 2**20)
        f.seek(2**19)
        f.write(b"data in the middle")
    shard = tmp_path / "sparse.tar"
    subprocess.run([gnu_tar(), "--sparse", "-cf", str(shard), "-C", str(src), "a.png"], check=True)
    assert good(iter_shard(str(shard))) == {"a": {"png": (src / "a.png").read_bytes()}}


def test_limits_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="size limits must be positive but are 0 and 1"):
        next(iter_shard(str(tmp_path / "s.tar"), max_member_bytes=0, max_sample_bytes=1))


# --- shard errors: one record naming the shard -----------------------------------------------------------

def shard_errors(records):
    return [r.error for r in records if r.shard_error]


def test_missing_empty_not_a_tar_or_not_a_file_give_one_shard_error(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "text.tar").write_bytes(b"this is not a tar file\n" * 100)
    (tmp_path / "dir.tar").mkdir()
    os.mkfifo(tmp_path / "fifo.tar")  # opening it would block until someone writes
    cases = {"missing.tar": "does not exist", "empty.tar": "is empty (0 bytes)", "text.tar": "is not a readable tar",
             "dir.tar": "is not a regular file", "fifo.tar": "is not a regular file"}
    for name, why in cases.items():
        path = str(tmp_path / name)
        records = list(iter_shard(path))
        assert len(records) == 1 and records[0].shard_error, name
        assert records[0].key == f"<shard {path}>"
        assert records[0].error.startswith(f"shard {path} {why}"), records[0].error


def cut_points(shard):
    """Byte offsets of the full shard where a cut lands: in sample 2's image data, at its header, in its header."""
    with tarfile.open(shard) as tar:
        jpg = tar.getmember("000000002.jpg")
    return {"in data": jpg.offset_data + 100, "at header": jpg.offset, "in header": jpg.offset + 200}


@pytest.mark.parametrize("where", ["in data", "at header", "in header"])
def test_truncated_shard_keeps_the_samples_before_the_cut(tmp_path, where):
    samples = img2dataset_samples(4)
    shard = write_wds(tmp_path / "s.tar", samples)
    cut = cut_points(shard)[where]
    with open(shard, "r+b") as f:
        f.truncate(cut)
    records = list(iter_shard(shard))
    cut_key = "000000002" if where == "in data" else "000000001"  # the sample that may have lost members
    assert good(records) == {k: v for k, v in samples.items() if k < cut_key}
    assert list(errors(records)) == [cut_key, f"<shard {shard}>"]
    assert records[-1].shard_error and f"shard {shard} is truncated after member" in records[-1].error


def test_garbage_after_a_member_is_a_shard_error(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("a.png", b"A"), ("a.txt", b"a"), ("b.png", b"B")])
    with open(shard, "r+b") as f:
        f.seek(2 * 1024)  # b.png's header: each member is one header block and one data block
        f.write(b"\x17" * 512)
    records = list(iter_shard(shard))
    assert good(records) == {}
    assert shard_errors(records) == [f"shard {shard} has an unreadable header after member 'a.txt'; "
                                     "the rest is not read"]


def test_gzip_shard_is_read_and_its_truncation_reported(tmp_path):
    samples = img2dataset_samples(3)
    plain = write_wds(tmp_path / "s.tar", samples)
    packed = tmp_path / "s.tar.gz"
    packed.write_bytes(gzip.compress(open(plain, "rb").read()))
    assert good(iter_shard(str(packed))) == samples
    packed.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    records = list(iter_shard(str(packed)))
    assert len(shard_errors(records)) == 1 and "truncated" in shard_errors(records)[0]


def test_no_cut_or_damage_raises(tmp_path):
    """Cut or scribble on the shard at every 128th byte: records every time, never an exception. A cut shard
    keeps intact samples only, and says so unless the cut spares the end-of-archive block."""
    samples = img2dataset_samples(3)
    full = write_wds(tmp_path / "s.tar", samples)
    with tarfile.open(full) as tar:
        end = (tar.getmembers(), tar.offset)[1]  # where the end-of-archive block starts
    data = open(full, "rb").read()
    shard = tmp_path / "bad.tar"
    for at in range(0, len(data), 128):
        shard.write_bytes(data[:at])
        records = list(iter_shard(str(shard)))
        assert all(members == samples[key] for key, members in good(records).items())
        assert len(shard_errors(records)) == (at < end + 512)
        shard.write_bytes(data[:at] + b"\xff" * 7 + data[at + 7:])
        assert list(iter_shard(str(shard)))


# --- remote shards ---------------------------------------------------------------------------------------

@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server over a temporary folder: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_shard_is_read_like_a_local_one_and_leaves_no_temporary_file(http_root, tmp_path, monkeypatch):
    root, base = http_root
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    samples = img2dataset_samples()
    write_wds(root / "00000.tar", samples)
    records = list(iter_shard(f"{base}/00000.tar"))
    assert good(records) == samples and len(records) == len(samples)
    assert os.listdir(scratch) == []


def test_http_404_is_one_shard_error(http_root):
    _, base = http_root
    url = f"{base}/missing.tar"
    records = list(iter_shard(url))
    assert len(records) == 1 and records[0].shard_error and records[0].key == f"<shard {url}>"
    assert records[0].error == f"shard {url} could not be read: HTTPError: HTTP Error 404: File not found"


def test_truncated_http_shard_keeps_the_samples_before_the_cut(http_root):
    root, base = http_root
    samples = img2dataset_samples(4)
    shard = write_wds(root / "00000.tar", samples)
    with open(shard, "r+b") as f:
        f.truncate(cut_points(shard)["in data"])
    records = list(iter_shard(f"{base}/00000.tar"))
    assert list(good(records)) == ["000000000", "000000001"]
    assert shard_errors(records) and "truncated" in shard_errors(records)[0]


def test_file_url_goes_through_pyarrow(tmp_path):
    pytest.importorskip("pyarrow")
    samples = img2dataset_samples()
    shard = write_wds(tmp_path / "00000.tar", samples)
    assert good(iter_shard(f"file://{shard}")) == samples
    missing = f"file://{tmp_path}/missing.tar"
    [record] = iter_shard(missing)
    assert record.shard_error and record.error.startswith(f"shard {missing} could not be read: FileNotFoundError")


def test_scheme_pyarrow_does_not_know_goes_through_fsspec(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    samples = img2dataset_samples()
    shard = write_wds(tmp_path / "00000.tar", samples)
    with fsspec.open("memory://shards/00000.tar", "wb") as f:
        f.write(open(shard, "rb").read())
    assert good(iter_shard("memory://shards/00000.tar")) == samples
    [record] = iter_shard("memory://shards/missing.tar")
    assert record.shard_error and "FileNotFoundError" in record.error
