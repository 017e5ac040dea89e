"""The build's folders beside its target: where a bundle is assembled, and how it replaces one.

    .NAME.lsaq-tmp-PID/    the working folder: the bundle being assembled, and in .lsaq-job/
                           the job record (job.json, measurements, plans); kept when a build
                           is killed, for --resume; the job record is dropped and the folder
                           renamed to NAME when the bundle is complete
    .NAME.lsaq-old-PID/    the bundle it replaces, until the new one is in place

A folder whose PID is dead belongs to a build that died: a build of NAME cleans them up, or
with --resume continues the newest one. Nothing else is ever deleted, and an existing target
is replaced only when it is an LSAQ bundle (`replace_refusal`) and --force.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lsaq_runtime.errors import LsaqRuntimeError
from lsaq_runtime.bundle_folder import replace_refusal
from lsaq_runtime.format import swap_journal
from lsaq_runtime.verify import verify_bundle

from .errors import LsaqError
from .job import JOB_DIR, JOB_FILE

TMP_MARK = ".lsaq-tmp-"


def _tmp_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}{TMP_MARK}{os.getpid()}"


def _owner_pid(folder: Path) -> int | None:
    pid = folder.name.rsplit("-", 1)[-1]
    return int(pid) if pid.isdigit() else None


def _dead(folder: Path) -> bool:
    pid = _owner_pid(folder)
    return not (pid is not None and _pid_alive(pid))


def _clean_stale_tmp(out: Path) -> None:
    """Remove the working folders of earlier builds of this target that died midway (after
    _recover_swap: a finished bundle an interrupted swap left hidden is put in place first).
    A live build's folder stays."""
    for p in out.parent.glob(f".{out.name}{TMP_MARK}*"):
        if _dead(p):
            shutil.rmtree(p, ignore_errors=True)


def new_work_dir(out: Path) -> Path:
    """A fresh working folder for a build of `out`, with an empty job record folder."""
    work = _tmp_dir_for(out)
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir()
        (work / JOB_DIR).mkdir()
    except OSError as e:
        raise LsaqError(f"{out.parent}: cannot write there ({e.strerror}); choose another -o") from None
    return work


def adopt_work_dir(out: Path) -> Path:
    """The working folder of the newest interrupted build of `out`, renamed as this build's
    own (so a concurrent build sees it in use). Raises, in one line, when there is none."""
    found = [p for p in out.parent.glob(f".{out.name}{TMP_MARK}*")
             if p.is_dir() and (p / JOB_DIR / JOB_FILE).is_file()]
    live = [p for p in found if not _dead(p) and _owner_pid(p) != os.getpid()]
    if live:
        raise LsaqError(f"{out}: another build (pid {_owner_pid(live[0])}) of it is running; "
                        "wait for it to finish")
    if not found:
        raise LsaqError(f"{out}: nothing to resume (no interrupted build of it was found "
                        "beside it); build without --resume")
    newest = max(found, key=lambda p: (p / JOB_DIR / JOB_FILE).stat().st_mtime)
    work = _tmp_dir_for(out)
    if newest != work:
        shutil.rmtree(work, ignore_errors=True)
        newest.rename(work)
    return work


def swap_in_work(work: Path, out: Path, force: bool) -> None:
    """Drop the job record of the finished bundle in `work` and put the bundle at `out`."""
    shutil.rmtree(work / JOB_DIR)
    _swap_in(work, out, force)


OLD_MARK = ".lsaq-old-"


def _journal(out: Path) -> Path:
    return swap_journal(out)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _swap_in(tmp: Path, out: Path, force: bool) -> None:
    """Put the finished bundle `tmp` at `out`, replacing the bundle there (checked again: it may
    have changed during the build). Two renames cannot be one atomic step, so a journal beside
    `out` names both folders first; a build that dies between the renames leaves the journal,
    and the next build of `out` (_recover_swap) finishes the swap or puts the old bundle back.
    The old bundle is deleted only once the new one is in place, then the journal."""
    if not (out.exists() or out.is_symlink()):
        tmp.rename(out)
        return
    check_replaceable(out, force)
    trash = out.parent / f".{out.name}{OLD_MARK}{os.getpid()}"
    journal = _journal(out)
    part = journal.with_name(journal.name + ".part")
    part.write_text(json.dumps({"target": out.name, "old": trash.name, "new": tmp.name,
                                "pid": os.getpid()}))
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    part.rename(journal)
    _fsync_dir(out.parent)
    out.rename(trash)
    try:
        tmp.rename(out)
    except BaseException:  # an error (not a crash) between the renames: put the old one back
        trash.rename(out)
        journal.unlink()
        raise
    _fsync_dir(out.parent)
    shutil.rmtree(trash, ignore_errors=True)
    journal.unlink()


def _recover_swap(out: Path, progress=None) -> None:
    """Finish or undo the swap of an earlier build of `out` that died midway (its journal says
    which folders): when `out` is missing and the new bundle it names passes the full check, it
    is put in place (the build had finished); otherwise the old bundle goes back. Nothing is
    deleted until a bundle stands at `out` again."""
    journal = _journal(out)
    if not journal.is_file():
        return
    try:
        j = json.loads(journal.read_text(encoding="utf-8"))
        old, new, pid = j["old"], j["new"], int(j["pid"])
        for name, mark in ((old, OLD_MARK), (new, TMP_MARK)):
            if not (isinstance(name, str) and "/" not in name and "\\" not in name
                    and name.startswith(f".{out.name}{mark}")):
                raise ValueError(name)
    except (OSError, ValueError, KeyError, TypeError):
        raise LsaqError(f"{journal}: an interrupted build left this swap journal, but it cannot "
                        "be read; look at the hidden folders beside it, put the bundle you want "
                        "back by hand, then delete the journal") from None
    if pid != os.getpid() and _pid_alive(pid):
        raise LsaqError(f"{out}: another build (pid {pid}) is replacing it right now; wait for "
                        "it to finish")
    old, new = out.parent / old, out.parent / new
    say = progress or (lambda msg: None)
    if not (out.exists() or out.is_symlink()):
        if new.is_dir() and _finished(new):
            new.rename(out)
            say(f"recovered {out}: an interrupted build had finished it; the swap is complete")
        elif old.is_dir():
            old.rename(out)
            say(f"recovered {out}: put back the bundle an interrupted build had moved aside")
        _fsync_dir(out.parent)
    if out.exists() and old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        journal.unlink()


def _finished(folder: Path) -> bool:
    """A complete bundle: it passes the runtime's full check."""
    try:
        return not verify_bundle(folder)
    except LsaqRuntimeError:
        return False


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_target(out: Path, force: bool, refusal, what: str, it: str = "it") -> None:
    """Refuse an existing target unless --force and `refusal(out)` finds nothing against
    replacing it (it is `what`: our own bundle or export), so no user's file is ever deleted."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise LsaqError(f"{out} already exists; pass --force to replace it")
    why = refusal(out)
    if why:
        raise LsaqError(f"{why}; --force only replaces {what}, so nothing was deleted: "
                        f"choose another -o or remove {it} yourself")


def check_replaceable(out: Path, force: bool) -> None:
    """A build may only replace an existing folder that is an LSAQ bundle, and only with force."""
    check_target(out, force, replace_refusal, "an LSAQ bundle", "the folder")
