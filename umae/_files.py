"""The files umae writes and reads. Each is written whole or not at all (to a temporary beside it,
then renamed: a crash or a full disk leaves the previous file and no partial one), and a file that
cannot be read raises a ValueError naming the flag and the file, on one line."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import zipfile


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind e: e itself, or one in its __cause__/__context__ chain. torch.save's zip
    writer turns its file's OSError (ENOSPC: disk full) into a bare RuntimeError ('[enforce fail
    at inline_container.cc] unexpected pos ...') raised while that OSError is handled; safetensors'
    writer (Rust) says it in its message only ('No space left on device (os error 28)')."""
    import re

    seen, first = set(), e
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    m = re.search(r"\(os error (\d+)\)", str(first))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else None


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _alive(pid: int) -> bool:
    """Whether a process of this PID namespace runs (a temporary's writer on another host or in another
    container looks dead: umae's outputs are one machine's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: another user's process
        pass
    return True


def _kind(path: str) -> str | None:
    """What is at path (links followed) when it is neither a regular file nor a folder, else None."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode) else
            "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def recover(dst: str) -> None:
    """Puts right what a killed write_whole left beside dst (its process gone): a folder swap cut
    between its two renames (dst missing, the old folder aside as .<dst>.tmp-PID-old) gets the old
    one back; every other leftover (.<dst>.tmp-PID, a completed swap's aside) is removed."""
    dst = os.path.abspath(dst)
    folder, base = os.path.split(dst)
    prefix = f".{base}.tmp-"
    try:
        names = sorted(os.listdir(folder), key=lambda n: not n.endswith("-old"))  # the asides first
    except OSError:
        return
    for name in names:
        pid, _, suffix = name[len(prefix):].partition("-")
        if not (name.startswith(prefix) and pid.isascii() and pid.isdigit() and len(pid) <= 10
                and suffix in ("", "old")) or _alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if suffix == "old" and not os.path.lexists(dst):
                os.replace(path, dst)
            else:
                _remove(path)


def write_whole(dst: str, write, tmp: str | None = None) -> None:
    """write(tmp) (a file or a folder), then tmp renamed to dst; a folder replaces dst's folder as a
    whole. On failure no tmp is left and dst is as it was; an OSError (disk full, I/O error, ...),
    raised as it is or behind torch's RuntimeError, is raised as an OSError naming dst. A symlink at
    dst is written through (its target replaced) unless `tmp` is given; a FIFO, device or socket is
    never replaced (a ValueError). What a killed earlier write left beside dst is put right first
    (`recover`)."""
    if (kind := _kind(dst)) is not None:
        raise ValueError(f"{dst!r} is {kind}, not a regular file: umae writes only files and folders, nothing written")
    # a target the user named (no tmp given) is written through a symlink; one of umae's own files with its
    # tmp beside it (a checkpoint, checkpoint-last.pt) replaces a link there, never the file it points to
    dst = os.path.realpath(dst) if tmp is None else os.path.abspath(dst)
    recover(dst)
    tmp = tmp or os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.tmp-{os.getpid()}")
    old = tmp + "-old"
    try:
        _remove(tmp)
        _remove(old)
        write(tmp)
        if os.path.isdir(tmp) and os.path.isdir(dst):  # a folder cannot be renamed over a non-empty one
            os.replace(dst, old)
            os.replace(tmp, dst)
            _remove(old)
        else:
            os.replace(tmp, dst)
    except BaseException as e:
        if os.path.isdir(old) and not os.path.exists(dst):  # failed between the two renames: put it back
            with contextlib.suppress(OSError):
                os.replace(old, dst)
        _remove(tmp)
        cause = _os_error(e) if isinstance(e, Exception) else None
        if cause is not None and cause.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, "No space left on device", dst) from e
        if cause is not None:  # named by dst, not its temporary (or an OSError behind torch's RuntimeError)
            raise OSError(cause.errno, cause.strerror or os.strerror(cause.errno), dst) from e
        raise


def check_target(dst: str, what: str, folder: bool = False, make_parents: bool = False) -> None:
    """Before the work whose result goes to dst: a ValueError naming `what` when dst is empty, a FIFO,
    a device or a socket (never replaced), a folder where a file goes (or a file where a folder goes),
    or its folder does not exist (unless the writer makes it: `make_parents`)."""
    if not dst:
        raise ValueError(f"{what} is an empty path: name a file")
    if (kind := _kind(dst)) is not None:  # /dev/null, a FIFO: replacing it would break what uses it
        raise ValueError(f"{what} {dst!r} is {kind}, not a regular file: umae writes only files and folders")
    recover(os.path.realpath(dst))
    parent = os.path.dirname(os.path.realpath(dst))
    if not make_parents and not os.path.isdir(parent):
        raise ValueError(f"{what} {dst!r}: its folder {parent!r} does not exist")
    if not folder and os.path.isdir(dst):
        raise ValueError(f"{what} {dst!r} is a folder, not a file")
    if folder and os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"{what} {dst!r} is a file, not a folder")


def write_text(dst: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_whole(dst, write)


def write_json(dst: str, data) -> None:
    write_text(dst, json.dumps(data, indent=1))


def _readable(path: str, what: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder, not a file")
    if not os.path.exists(path):
        raise ValueError(f"{what} {path!r}: no such file")


def verify_checksums(path: str, what: str) -> None:
    """A torch.save file is a zip whose every record carries its CRC-32: a bit flipped on disk or in
    a copy fails it (torch.load itself does not check: it would load the damaged tensor). A file
    that is not a zip (torch's legacy format, or not a checkpoint at all) is left to torch.load."""
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, NotImplementedError):
        return  # not a zip: torch.load says what it is
    with z:
        if all(info.CRC == 0 for info in z.infolist()):  # saved without checksums (torch's set_crc32_options)
            return
        try:
            bad = z.testzip()
        except Exception as e:  # a flipped bit in the directory: zlib.error, "is encrypted", ...
            raise ValueError(f"{what} {path!r} is damaged: its zip directory cannot be read ({type(e).__name__}: "
                             f"{e})") from None
    if bad is not None:
        raise ValueError(f"{what} {path!r} is damaged: its record {bad!r} fails its CRC-32 checksum (the file "
                         "changed after it was written: a disk or copy error?)")


def read_checkpoint(path: str, what: str) -> dict:
    """torch.load of a checkpoint file (a dict) after its checksums are verified; a ValueError
    naming `what` and the file when it is missing, a folder, damaged, not something torch can read,
    or not a dict."""
    import torch

    _readable(path, what)
    verify_checksums(path, what)
    try:
        with open(path, "rb") as f:
            ck = torch.load(f, map_location="cpu", weights_only=False)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            raise ValueError(f"{what} {path!r} cannot be read: {e.strerror}") from None
        if e.errno is not None and e.errno != errno.EINVAL:  # torch's zip reader says EINVAL for a truncated file
            raise
        why = e.strerror or str(e)
    except Exception as e:  # torch.load raises RuntimeError, UnpicklingError, EOFError, ... for a bad file
        why = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
        why = f"{type(e).__name__}: {why}" if why else type(e).__name__
    else:
        if not isinstance(ck, dict):  # a state dict, or a checkpoint's dict holding one
            raise ValueError(f"{what} {path!r} is not a checkpoint: it holds a {type(ck).__name__}, not a dict")
        return ck
    raise ValueError(f"{what} {path!r} is not a readable checkpoint (corrupt, truncated or empty?): {why}")


def reason(e: BaseException) -> str:
    """An exception's message on one line, at most 300 characters."""
    why = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, KeyError):
        why = f"no entry {why}"
    return why[:300] + " ..." if len(why) > 300 else why


# what a load_state_dict raises for a state dict of the wrong shape or content
LOAD_ERRORS = (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError)


def load_weights(model, state: dict, path: str, what: str, name: str | None = None) -> None:
    """model.load_state_dict, or a ValueError naming the file when the weights do not fit `name`
    (default: the model's class)."""
    try:
        model.load_state_dict(state)
    except LOAD_ERRORS as e:
        raise ValueError(f"{what} {path!r} does not fit the model {name or type(model).__name__}: {reason(e)}") from None


def check_finite_weights(model, path: str, what: str) -> None:
    """A ValueError naming the file when a loaded model holds a NaN or inf weight (a diverged run's:
    every feature NaN, every number computed from it meaningless)."""
    import torch

    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{what} {path!r} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): the run "
                         "diverged before it was saved")


def check_recorded_config(model, ck: dict, path: str, what: str, name: str) -> None:
    """A ValueError naming both values where the architecture the checkpoint records ("config": every
    umae checkpoint has it) differs from the model built for it (`name`): its weights would load into
    another model (a LayerNorm eps, a head count) without a word."""
    config = ck.get("config")
    if not isinstance(config, dict):
        return
    ours = model.arch_config()
    # norm_pix_loss is recorded beside the architecture (HF's config holds it) but is a loss setting
    differ = [k for k in config if k in ours and k != "norm_pix_loss" and config[k] != ours[k]]
    if differ:
        raise ValueError(f"{what} {path!r} records " + ", ".join(f"{k}={config[k]!r}" for k in differ)
                         + f" where {name} has " + ", ".join(f"{k}={ours[k]!r}" for k in differ))


def read_json(path: str, what: str) -> dict:
    """A JSON file holding an object; a ValueError naming `what` and the file otherwise."""
    _readable(path, what)
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path!r} holds a JSON {type(data).__name__}, not an object")
    return data


def read_text(path: str, what: str) -> str:
    _readable(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path!r} is not a UTF-8 text file ({e.reason} at byte {e.start})") from None
