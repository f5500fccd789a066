"""Outputs whole or absent (vdm_tf.files), image files (vdm_tf.image_files), command-line endings (vdm_tf.cli)."""

import errno
import os
import stat

import numpy as np
import pytest
from PIL import Image

from vdm_tf import cli, files, image_files


def leftovers(directory):
    return sorted(name for name in os.listdir(directory) if "partial" in name)


# ------------------------------------------------------------------------------------------------
# vdm_tf.files


def test_atomic_path_renames_a_complete_file_into_place_with_the_usual_permissions(tmp_path):
    path = tmp_path / "samples.npz"
    with files.atomic_path(path) as temporary:
        assert temporary.endswith(".npz") and os.path.dirname(temporary) == str(tmp_path)
        assert not path.exists()  # nothing under the final name while it is written
        np.savez(temporary, x=np.arange(3))
    assert np.load(path)["x"].tolist() == [0, 1, 2]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, failure):
    path = tmp_path / "out.vdmz"
    path.write_bytes(b"the earlier file")
    with pytest.raises(failure):
        with files.atomic_path(path) as temporary:
            with open(temporary, "wb") as f:
                f.write(b"half of a new one")
            raise failure()
    assert path.read_bytes() == b"the earlier file"
    assert leftovers(tmp_path) == []


def test_an_oserror_while_writing_names_the_path_and_what_is_left(tmp_path, monkeypatch):
    path = tmp_path / "out.vdmz"
    with pytest.raises(files.OutputError, match=r"writing .*out.vdmz failed: No space left on device; nothing was"):
        with files.atomic_path(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    path.write_bytes(b"old")

    def full_disk(descriptor):  # the data reaches the disk at fsync: fail there, as a full disk does
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(files.OutputError, match="the file that was there is unchanged"):
        files.write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_a_full_disk_leaves_no_partial_file_and_the_old_one_intact(small_disk):
    directory = small_disk(64)
    path = os.path.join(directory, "out.vdmz")
    files.write_bytes(path, b"x" * 1000)
    with pytest.raises(files.OutputError, match=r"out.vdmz failed: No space left on device; the file that was"):
        files.write_bytes(path, b"y" * 200_000)
    assert open(path, "rb").read() == b"x" * 1000
    assert leftovers(directory) == []


def test_append_line_cuts_a_failed_append_back(small_disk):
    directory = small_disk(16)
    path = os.path.join(directory, "metrics.jsonl")
    files.append_line(path, '{"step": 1}')
    files.append_line(path, '{"step": 2}\n')
    with pytest.raises(files.OutputError, match="metrics.jsonl failed: No space left on device"):
        files.append_line(path, "z" * 100_000)
    assert open(path).read() == '{"step": 1}\n{"step": 2}\n'


def test_atomic_directory(tmp_path):
    path = tmp_path / "export" / "1"
    with files.atomic_path(path, directory=True) as temporary:
        assert os.path.isdir(temporary) and not path.exists()
        open(os.path.join(temporary, "saved_model.pb"), "wb").close()
    assert (path / "saved_model.pb").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask  # as os.makedirs makes it, not mkdtemp's 0700
    with pytest.raises(ValueError):
        with files.atomic_path(tmp_path / "export" / "2", directory=True) as temporary:
            open(os.path.join(temporary, "saved_model.pb"), "wb").close()
            raise ValueError("export failed")
    assert sorted(os.listdir(tmp_path / "export")) == ["1"]


def test_an_unwritable_directory_is_one_line(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere: make the parent a file instead
        (tmp_path / "a_file").write_text("")
        target = tmp_path / "a_file" / "out.png"
    else:
        os.chmod(tmp_path, 0o500)
        target = tmp_path / "out.png"
    with pytest.raises(files.OutputError, match="out.png failed: .*nothing was written there"):
        files.write_bytes(target, b"data")


# ------------------------------------------------------------------------------------------------
# vdm_tf.image_files


@pytest.fixture
def grey():
    return np.arange(48 * 48, dtype=np.uint32).reshape(48, 48, 1).astype(np.uint8)


def test_grey_and_rgb_read_back_exactly(tmp_path, grey):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image_files.write_image(tmp_path / "g.png", grey)
    image_files.write_image(tmp_path / "c.webp", rgb, format="WEBP", lossless=True, exact=True)
    assert (image_files.read_image(tmp_path / "g.png")[0] == grey).all()
    array, kind = image_files.read_image(tmp_path / "c.webp")
    assert kind == "WEBP" and array.shape == (5, 7, 3) and (array == rgb).all()


def test_several_frames_are_refused_not_cut_to_the_first(tmp_path, grey):
    pages = [image_files.to_pil(grey), image_files.to_pil(255 - grey)]
    pages[0].save(tmp_path / "two.tiff", save_all=True, append_images=pages[1:])
    pages[0].convert("RGB").save(tmp_path / "two.png", save_all=True, append_images=[pages[1].convert("RGB")])
    pages[0].save(tmp_path / "two.gif", save_all=True, append_images=pages[1:])
    for name in ("two.tiff", "two.png", "two.gif"):
        with pytest.raises(image_files.ImageFileError, match=rf"{name}: holds 2 images .*save each frame"):
            image_files.read_image(tmp_path / name)


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("missing.png", None, "no such file"),
        ("empty.png", lambda p: p.write_bytes(b""), "the file is empty"),
        ("notes.txt", lambda p: p.write_text("pixels?"), "not a readable image file"),
        ("truncated.png", "truncated", "not a readable image|a broken image file"),
        ("palette.png", lambda p: Image.new("P", (4, 4)).save(p), "got mode P"),
        ("alpha.png", lambda p: Image.new("LA", (4, 4)).save(p), "got mode LA"),
        ("deep.png", lambda p: Image.new("I;16", (4, 4)).save(p), "got mode I;16"),
        ("cmyk.jpg", lambda p: Image.new("CMYK", (4, 4)).save(p), "got mode CMYK"),
        ("a_directory", lambda p: p.mkdir(), "is a directory"),
    ],
)
def test_what_is_not_one_grey_or_rgb_image_is_one_line(tmp_path, grey, name, make, message):
    path = tmp_path / name
    if make == "truncated":
        image_files.write_image(path, grey)
        path.write_bytes(path.read_bytes()[:60])
    elif make is not None:
        make(path)
    with pytest.raises(image_files.ImageFileError) as caught:
        image_files.read_image(path)
    text = str(caught.value)
    assert name in text and "\n" not in text and "expected a grey (mode L) or RGB image" in text
    assert any(part in text for part in message.split("|")), text


def test_bilevel_masks_read_as_0_and_255(tmp_path):
    Image.fromarray(np.eye(4, dtype=bool)).save(tmp_path / "mask.png")
    mask, _ = image_files.read_image(tmp_path / "mask.png", modes=("1", "L"))
    assert mask.dtype == np.uint8 and mask[..., 0].tolist() == (255 * np.eye(4, dtype=int)).tolist()


def test_to_pil_names_the_form_it_expects():
    with pytest.raises(ValueError, match=r"expected a uint8 image \[H, W, 1 or 3\]; got float32 \[4, 4, 1\]"):
        image_files.to_pil(np.zeros((4, 4, 1), np.float32))


# ------------------------------------------------------------------------------------------------
# vdm_tf.cli


@pytest.mark.parametrize(
    "raised, status, line",
    [
        (cli.Failure("--steps must be >= 1;\n got 0"), 1, "prog: error: --steps must be >= 1; got 0"),
        (files.OutputError(errno.ENOSPC, "writing a.png failed: No space"), 1, "prog: error: writing a.png failed"),
        (KeyboardInterrupt(), 130, "prog: interrupted"),
        (MemoryError(), 1, "prog: error: out of memory"),
    ],
)
def test_run_ends_in_one_line_and_the_exit_code(capsys, raised, status, line):
    def main():
        print("work done so far")
        raise raised

    with pytest.raises(SystemExit) as exited:
        cli.run(main, prog="prog")
    out, err = capsys.readouterr()
    assert exited.value.code == status and out == "work done so far\n"
    assert err.startswith(line) and err.count("\n") == 1 and "Traceback" not in err


def test_run_keeps_the_traceback_of_a_bug_and_the_status_of_main():
    with pytest.raises(SystemExit) as exited:
        cli.run(lambda: 3, prog="prog")
    assert exited.value.code == 3
    with pytest.raises(ZeroDivisionError):
        cli.run(lambda: 1 / 0, prog="prog")


def test_a_redirected_progress_bar_writes_plain_lines(capsys):
    progress = cli.progress_bar(50, unit_name="step")
    for step in range(1, 51):
        progress.update(step)
    lines = capsys.readouterr().out.splitlines(keepends=True)
    assert [line.split()[0] for line in lines] == [f"{5 * k}/50" for k in range(1, 11)], lines  # one each tenth
    assert not any("\r" in line or "\x1b" in line for line in lines), lines
    quiet = cli.progress_bar(50, verbose=False)
    quiet.update(50)
    assert capsys.readouterr().out == ""
