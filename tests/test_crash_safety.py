"""Crash safety: SIGKILL qmail-queue and qmail-send at many points, then count what arrives.

Every message carries an id and a checksum of its body, so a delivered copy can be
told intact or truncated.  The rules checked are qmail's: an injection that
reported success is delivered (exactly once when only qmail-queue crashes, at most
duplicated when qmail-send crashes mid-delivery); an injection that failed is
either never delivered or delivered whole; and once the 36-hour cleanup has run
nothing is left in the queue.

The kill moments are random; the seed is printed in every failure message and
can be fixed with CRASH_SEED=... to replay a run's choices.
"""

from __future__ import annotations

import hashlib
import mailbox
import os
import random
import signal
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _mta import (
    MTA,
    assert_spares_sane,
    bin_path,
    maildir_count,
    queue_empty,
    queue_files,
    wait_for,
)
from pyqmail.constants import OSSIFIED
from pyqmail.fmt import tai64n_label
from pyqmail.qq import QueueClient, queue_message

SENDER = "joe@example.test"
CRASHED = "Zqq crashed (#4.3.0)"
# older than qmail-send's and qmail-clean's 36-hour limit, with a margin
AGED = OSSIFIED + 3600


# -- messages that can be checked for truncation -------------------------------------


def make_message(ident: str, size: int, rcpts: list[str]) -> bytes:
    rng = random.Random(ident)
    lines = []
    total = 0
    while total < size:
        line = rng.randbytes(38).hex() + "\n"
        lines.append(line)
        total += len(line)
    body = "".join(lines).encode()
    head = (
        f"From: {SENDER}\n"
        f"To: {', '.join(rcpts)}\n"
        f"Subject: crash test {ident}\n"
        f"X-Crash-Id: {ident}\n"
        f"X-Crash-Sum: {hashlib.sha256(body).hexdigest()} {len(body)}\n"
        "\n"
    )
    return head.encode() + body


@dataclass
class Copy:
    ident: str
    intact: bool


def check_copy(raw: bytes) -> Copy:
    """Identify one delivered copy and decide whether its body arrived whole."""
    head, sep, body = raw.partition(b"\n\n")
    fields: dict[bytes, bytes] = {}
    for line in head.split(b"\n"):
        name, _, value = line.partition(b":")
        fields.setdefault(name.lower(), value.strip())
    ident = fields.get(b"x-crash-id", b"").decode()
    summary = fields.get(b"x-crash-sum", b"").split()
    intact = (
        bool(sep)
        and len(summary) == 2
        and hashlib.sha256(body).hexdigest().encode() == summary[0]
        and str(len(body)).encode() == summary[1]
    )
    return Copy(ident or "<no id: truncated in the header>", intact)


def delivered(maildir: Path) -> list[Copy]:
    box = mailbox.Maildir(maildir, create=False)
    return [check_copy(box.get_bytes(key)) for key in box.keys()]


def bounced_copies(maildir: Path) -> list[Copy]:
    """The returned message inside each bounce qmail-send sent to the sender."""
    box = mailbox.Maildir(maildir, create=False)
    out = []
    marker = b"--- Below this line is a copy of the message.\n\n" + f"Return-Path: <{SENDER}>\n".encode()
    for key in box.keys():
        raw = box.get_bytes(key)
        at = raw.find(marker)
        if at < 0:
            out.append(Copy("<not a bounce with a copy>", False))
            continue
        original = raw[at + len(marker) :]
        # the copy starts with qmail-queue's own Received line, then the message we queued
        out.append(check_copy(original))
    return out


# -- processes ---------------------------------------------------------------------


def add_user(home: Path, address: str) -> Path:
    out = subprocess.run(
        [bin_path("pyqmail"), "user", "add", "--home", str(home), address],
        capture_output=True, text=True, timeout=30, check=True,
    )
    return Path(out.stdout.strip()) / "Maildir"


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def open_files(pid: int) -> Iterator[tuple[str, str]]:
    """(fd path under /proc, file name) for every file `pid` has open."""
    base = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(base)
    except OSError:
        return
    for fd in fds:
        try:
            yield f"{base}/{fd}", os.readlink(f"{base}/{fd}")
        except OSError:
            continue


def queue_file_size(pid: int, queue: Path, kind: str) -> int | None:
    """Size of the `kind` queue file (pid, mess, intd) process `pid` has open, if any."""
    prefix = f"{os.path.realpath(queue)}/{kind}/"
    for proc_path, name in open_files(pid):
        if name.startswith(prefix):
            try:
                return os.stat(proc_path).st_size
            except OSError:
                return None
    return None


def qmail_send_pid(mta: MTA) -> int:
    """The supervisor's child holding lock/sendmutex is qmail-send."""
    assert mta.proc is not None
    mutex = os.path.realpath(mta.home / "queue" / "lock" / "sendmutex")
    found: list[int] = []

    def look() -> bool:
        assert mta.proc is not None
        found[:] = [
            pid for pid in children(mta.proc.pid)
            if any(name == mutex for _, name in open_files(pid))
        ]
        return bool(found)

    wait_for(look, 20, "qmail-send to open lock/sendmutex")
    return found[0]


def crash_send_only(mta: MTA) -> None:
    """SIGKILL qmail-send alone; `pyqmail run` must notice and shut the rest down by itself."""
    assert mta.proc is not None
    proc = mta.proc
    os.kill(qmail_send_pid(mta), signal.SIGKILL)
    try:
        code = proc.wait(20)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        mta.proc = None
        if proc.stdout:
            proc.stdout.close()
        try:  # deliveries still running must not outlive this round
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.returncode is None:
            proc.wait(10)
    assert code == 111, f"pyqmail run after qmail-send died: exit {code}, expected 111"


def logged_since(home: Path, label: str, text: str) -> bool:
    """Whether qmail-send logged `text` at or after TAI64N `label`; a crashed
    multilog's file was renamed aside (`.u`), so every file is searched."""
    logdir = home / "log" / "send"
    try:
        names = os.listdir(logdir)
    except OSError:
        return False
    for name in names:
        if name == "lock":
            continue
        try:
            data = (logdir / name).read_text(errors="replace")
        except OSError:
            continue
        for line in data.splitlines():
            stamp, _, rest = line.partition(" ")
            if stamp >= label and rest.startswith(text):
                return True
    return False


def restart(mta: MTA) -> None:
    """Start and wait for this qmail-send's first status line (its trigger is open then)."""
    label = tai64n_label(time.time() - 0.001)
    mta.start()
    wait_for(lambda: logged_since(mta.home, label, "status: local"), 20, "qmail-send to start")


def diagnose(mta: MTA) -> str:
    """What a failure message needs: is `pyqmail run` alive, what it said, the log's end."""
    parts = []
    if mta.proc is not None:
        code = mta.proc.poll()
        parts.append(f"pyqmail run {'running' if code is None else f'exited {code}'}")
        if code is not None and mta.proc.stdout:
            parts.append("its output: " + mta.proc.stdout.read().decode(errors="replace"))
    lines = mta.log().splitlines()
    alerts = [line for line in lines if " alert:" in line or " warning:" in line]
    parts.append("alerts: " + " | ".join(alerts[-10:]))
    parts.append("log tail: " + " | ".join(lines[-12:]))
    return "\n".join(parts)


def wait_drained(mta: MTA, timeout: float) -> None:
    """Until the queue is empty. The trigger is pulled each time round: a qmail-queue
    killed between its todo link and its trigger write leaves a message qmail-send
    would otherwise only find at its 25-minute rescan; ALRM retries anything a crash
    made defer (as an administrator would after an outage)."""
    assert mta.proc is not None
    deadline = time.monotonic() + timeout
    last_kick = 0.0
    while not queue_empty(mta.home):
        if time.monotonic() > deadline or mta.proc.poll() is not None:
            raise AssertionError(
                f"queue not empty after {timeout}s: {queue_files(mta.home)[:20]}\n"
                + diagnose(mta)
            )
        if time.monotonic() - last_kick > 1.0:
            try:
                mta.trigger()
            except OSError:  # nobody reading the FIFO: the poll above reports why next time
                pass
            mta.proc.send_signal(signal.SIGALRM)
            last_kick = time.monotonic()
        time.sleep(0.05)


def age_and_collect(home: Path) -> list[str]:
    """Make every leftover queue file look 37 hours old; return the leftovers."""
    leftovers = queue_files(home)
    old = time.time() - AGED
    for name in leftovers:
        os.utime(name, (old, old))
    return leftovers


def leftover_kinds(home: Path, leftovers: list[str]) -> Counter[str]:
    q = str(home / "queue") + "/"
    return Counter(name[len(q) :].split("/", 1)[0] for name in leftovers)


def assert_clean_after_restart(mta: MTA, maildir: Path, seed: int) -> None:
    """Age the crash leftovers past 36 h and restart: qmail-send's startup cleanup
    pass and qmail-clean's pid sweep must remove every one of them."""
    home = mta.home
    leftovers = age_and_collect(home)
    restart(mta)
    # a fresh message keeps qmail-clean busy, which is when it sweeps pid/
    before = maildir_count(maildir)
    canary = make_message("canary", 500, ["bob@example.test"])
    assert queue_message(home, canary, SENDER, ["bob@example.test"]).ok
    try:
        wait_for(lambda: maildir_count(maildir) == before + 1, 30, "the canary message")
        wait_for(lambda: queue_files(home) == [], 30, "orphaned queue files to be removed")
    except AssertionError:
        raise AssertionError(
            f"seed {seed}: left in the queue after the cleanup pass: {queue_files(home)}; "
            f"aged leftovers were {leftovers}\n" + diagnose(mta)
        ) from None


# -- injection: kill qmail-queue ----------------------------------------------------


@dataclass
class Injections:
    accepted: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    # failures whose kill landed while qmail-queue was certainly before its commit
    precommit: set[str] = field(default_factory=set)
    outcomes: Counter[str] = field(default_factory=Counter)


def inject_program_killed(
    queue: Path, ident: str, rng: random.Random, mid_envelope: bool, log: Injections
) -> None:
    """Run the qmail-queue program itself and SIGKILL it at a moment it is known to be
    at: blocked reading the rest of the message (mess partly written, state S2) or
    blocked reading the rest of the envelope (intd made, state S3)."""
    message = make_message(ident, rng.choice([3000, 40000, 150000]), ["bob@example.test"])
    msg_r, msg_w = os.pipe()
    env_r, env_w = os.pipe()
    proc = subprocess.Popen([bin_path("qmail-queue")], stdin=msg_r, stdout=env_r)
    os.close(msg_r)
    os.close(env_r)
    try:
        part = message if mid_envelope else message[: rng.randrange(100, len(message) - 1)]
        _write_all(msg_w, part)
        if mid_envelope:
            os.close(msg_w)
            msg_w = -1
            os.write(env_w, f"F{SENDER}\0Tbob@exa".encode())
            wait_for(
                lambda: queue_file_size(proc.pid, queue, "intd") is not None,
                10, "qmail-queue to create intd",
            )
        else:
            # killed while it waits for the rest of the message: not committed, for sure
            # (its file is pid/..., or mess/... when it was a recycled spare)
            wait_for(
                lambda: max(
                    queue_file_size(proc.pid, queue, "pid") or 0,
                    queue_file_size(proc.pid, queue, "mess") or 0,
                ) > len(part),
                10, "qmail-queue to write the part it was given",
            )
        proc.kill()
        code = proc.wait(10)
    finally:
        for fd in (msg_w, env_w):
            if fd >= 0:
                os.close(fd)
        if proc.returncode is None:
            proc.kill()
            proc.wait(10)
    assert code == -signal.SIGKILL
    log.failed.add(ident)
    log.precommit.add(ident)
    log.outcomes["program killed " + ("mid-envelope" if mid_envelope else "mid-message")] += 1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def inject_race(
    home: Path, ident: str, delay: float, log: Injections
) -> None:
    """Queue through the warm caller (qmail-queue forked from this process) and SIGKILL
    that child after `delay` seconds, wherever it is by then."""
    message = make_message(ident, 1500, ["bob@example.test"])
    client = QueueClient(home)
    pidfd = os.pidfd_open(client.pid)  # the pid stays safe to signal even after it is reaped

    def kill() -> None:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(delay, kill)
    timer.start()
    try:
        client.write(message)
        result = client.finish(SENDER, ["bob@example.test"])
    finally:
        timer.join()
        os.close(pidfd)
    if result.ok:
        log.accepted.add(ident)
        log.outcomes["race: finished first"] += 1
    else:
        assert result.text == CRASHED, result
        log.failed.add(ident)
        log.outcomes["race: killed"] += 1


def inject_sendmail(home: Path, ident: str, rng: random.Random, window: float,
                    log: Injections) -> None:
    """The real injection path: a sendmail process forks its qmail-queue; find that
    child in /proc and SIGKILL it a random moment after it appears."""
    message = make_message(ident, rng.choice([1500, 1500, 150000]), ["bob@example.test"])
    proc = subprocess.Popen(
        [bin_path("sendmail"), "-f", SENDER, "bob@example.test"],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, QMAILHOME=str(home)),
    )
    killed = False
    try:
        assert proc.stdin is not None
        proc.stdin.write(message)
        proc.stdin.close()
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            kids = children(proc.pid)
            if kids:
                # pidfd: signalling stays safe even if sendmail reaps the child meanwhile
                pidfd = os.pidfd_open(kids[0])
                try:
                    time.sleep(rng.uniform(0, window))
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    killed = True
                except ProcessLookupError:
                    pass
                finally:
                    os.close(pidfd)
                break
            time.sleep(0.0005)
        code = proc.wait(20)
        assert proc.stderr is not None
        err = proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
    if code == 0:
        log.accepted.add(ident)
        log.outcomes["sendmail: finished first"] += 1
    else:
        # qmail-inject's verdict for a crashed qmail-queue: temporary, with qmail.c's text
        assert killed and code == 111 and b"qq crashed" in err, (code, err)
        log.failed.add(ident)
        log.outcomes["sendmail: qmail-queue killed"] += 1


def calibrate(home: Path, n: int = 7) -> float:
    """Median wall time of one uncontended small injection through the warm caller."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        result = queue_message(
            home, make_message(f"cal{i}", 1500, ["bob@example.test"]), SENDER,
            ["bob@example.test"],
        )
        times.append(time.perf_counter() - t0)
        assert result.ok, result
    return statistics.median(times)


def test_kill_qmail_queue_during_injection(qmail_home: Path) -> None:
    seed = int(os.environ.get("CRASH_SEED", time.time_ns() % 1_000_000_007))
    rng = random.Random(seed)
    queue = qmail_home / "queue"
    bob = add_user(qmail_home, "bob@example.test")
    log = Injections()
    mta = MTA(qmail_home)
    try:
        restart(mta)
        typical = calibrate(qmail_home)
        log.accepted |= {f"cal{i}" for i in range(7)}
        deadline = time.monotonic() + 40
        plan = ["race"] * 120 + ["mid-message"] * 10 + ["mid-envelope"] * 8 + ["sendmail"] * 20
        rng.shuffle(plan)
        # the kill window runs from "before it has read anything" to a little past
        # its usual end; it widens after a kill and narrows after a success, so the
        # kills keep landing around the commit point however fast the machine is
        window = 1.5 * typical
        # sendmail's qmail-queue child is seen in /proc for about 1-4 ms here
        sm_window = 0.003
        for i, kind in enumerate(plan):
            if time.monotonic() > deadline:
                break
            ident = f"inj{i}"
            if kind == "race":
                killed_before = log.outcomes["race: killed"]
                inject_race(qmail_home, ident, rng.uniform(0, window), log)
                window *= 1.1 if log.outcomes["race: killed"] > killed_before else 0.93
            elif kind == "sendmail":
                killed_before = log.outcomes["sendmail: qmail-queue killed"]
                inject_sendmail(qmail_home, ident, rng, sm_window, log)
                sm_window *= 1.2 if log.outcomes["sendmail: qmail-queue killed"] > killed_before else 0.8
            else:
                inject_program_killed(queue, ident, rng, kind == "mid-envelope", log)
        wait_drained(mta, 60)
        copies = delivered(bob)
        by_id = Counter(c.ident for c in copies)
        why = f"seed {seed}, outcomes {dict(log.outcomes)}"
        assert [c for c in copies if not c.intact] == [], f"truncated copies; {why}"
        assert set(by_id) <= log.accepted | log.failed, f"unknown copies {by_id}; {why}"
        assert {i: n for i, n in by_id.items() if n != 1} == {}, f"duplicates; {why}"
        lost = log.accepted - set(by_id)
        assert lost == set(), f"accepted but never delivered: {sorted(lost)}; {why}"
        assert log.precommit & set(by_id) == set(), f"killed before commit yet delivered; {why}"
        # the kills must really have landed on both sides of the commit point
        assert log.outcomes["race: killed"] > 0 and log.outcomes["race: finished first"] > 0, why
        assert log.precommit, why

        # a finished message's mess file goes a moment after its info: stop qmail-send
        # (which waits for qmail-clean) before looking at what is left.  Killed
        # injections may leave only message bodies, envelopes being written and pid
        # names; never todo, info or channel files
        mta.stop()
        leftovers = queue_files(qmail_home)
        kinds = leftover_kinds(qmail_home, leftovers)
        # shown with -s or on failure: what this run's random kills actually hit
        print(f"{why}; accepted {len(log.accepted)}, failed {len(log.failed)}, "
              f"delivered {sum(by_id.values())}; leftovers {dict(kinds)}")
        assert set(kinds) <= {"mess", "intd", "pid"}, f"{leftovers}; {why}"
        assert kinds["mess"] >= len(log.precommit), f"{leftovers}; {why}"
        # finished files were recycled, and no spare is (or aliases) a live file
        assert assert_spares_sane(qmail_home) > 0, why
        # young leftovers may be injections still in progress: a restart must keep them
        restart(mta)
        time.sleep(0.5)
        assert queue_files(qmail_home) == leftovers, why
        mta.stop()
        assert_clean_after_restart(mta, bob, seed)
        assert maildir_count(bob) == len(by_id) + 1
    finally:
        mta.stop()


# -- delivery: kill the running MTA --------------------------------------------------


@dataclass
class Sent:
    ident: str
    rcpts: list[str]


def queue_batch(home: Path, prefix: str, count: int, rng: random.Random) -> list[Sent]:
    out = []
    for i in range(count):
        ident = f"{prefix}{i}"
        roll = rng.random()
        if roll < 0.6:
            rcpts = ["bob@example.test"]
        elif roll < 0.75:
            rcpts = ["bob@example.test", "carol@example.test"]
        elif roll < 0.9:
            # bob's .qmail-fwd forwards to carol: qmail-local queues a new message
            rcpts = ["bob@example.test", "bob-fwd@example.test"]
        else:
            rcpts = ["bob@example.test", "nosuchbox@example.test"]
        size = rng.choice([800, 800, 800, 6000, 60000])
        result = queue_message(home, make_message(ident, size, rcpts), SENDER, rcpts)
        assert result.ok, result
        out.append(Sent(ident, rcpts))
    return out


def test_kill_mta_during_delivery(qmail_home: Path) -> None:
    seed = int(os.environ.get("CRASH_SEED", time.time_ns() % 1_000_000_007))
    rng = random.Random(seed)
    boxes = {
        name: add_user(qmail_home, f"{name}@example.test") for name in ("bob", "carol", "joe")
    }
    fwd = boxes["bob"].parent / ".qmail-fwd"
    fwd.write_text("&carol@example.test\n")
    os.chmod(fwd, 0o644)
    sent = queue_batch(qmail_home, "pre", 150, rng)
    mta = MTA(qmail_home)
    kills = 0
    how: Counter[str] = Counter()
    mid_delivery = 0  # crashes that hit while mail was both arriving in bob's box and waiting
    try:
        deadline = time.monotonic() + 45
        for rnd in range(14):
            if time.monotonic() > deadline:
                break
            # enough mail, and short enough pauses, that a kill lands while deliveries run
            # (reused delivery workers drain a small batch in well under a second)
            sent += queue_batch(qmail_home, f"r{rnd}-", 100, rng)
            before = maildir_count(boxes["bob"])
            if rnd % 2:
                # some crashes land in startup: recovery, the todo scan, preprocessing
                mta.start()
                time.sleep(rng.uniform(0.02, 0.3))
            else:
                restart(mta)
                # new mail arriving while deliveries run
                sent += queue_batch(qmail_home, f"r{rnd}+", 10, rng)
                time.sleep(rng.uniform(0.0, 0.15))
            if not queue_empty(qmail_home) and maildir_count(boxes["bob"]) > before:
                mid_delivery += 1
            if rnd % 3 == 2:
                crash_send_only(mta)
                how["qmail-send alone"] += 1
            else:
                mta.kill9()
                how["whole process group"] += 1
            kills += 1
        why = f"seed {seed}, {kills} crashes {dict(how)}, {mid_delivery} mid-delivery"
        # the crashes must really have interrupted deliveries, not an idle MTA
        assert mid_delivery >= kills // 3, why

        restart(mta)
        wait_drained(mta, 90)
        bob = Counter(c.ident for c in delivered(boxes["bob"]))
        carol = Counter(c.ident for c in delivered(boxes["carol"]))
        bounces = bounced_copies(boxes["joe"])
        joe = Counter(c.ident for c in bounces)
        for box, copies in (("bob", delivered(boxes["bob"])), ("carol", delivered(boxes["carol"])),
                            ("joe", bounces)):
            bad = [c.ident for c in copies if not c.intact]
            assert bad == [], f"truncated copies in {box}'s Maildir: {bad}; {why}"
        for name, maildir in boxes.items():
            # a delivery is written as an unnamed file: a kill leaves nothing in tmp/
            assert os.listdir(maildir / "tmp") == [], f"{name}'s tmp/; {why}"
        expected = {
            "bob": {s.ident for s in sent},
            "carol": {
                s.ident for s in sent
                if {"carol@example.test", "bob-fwd@example.test"} & set(s.rcpts)
            },
            "joe": {s.ident for s in sent if "nosuchbox@example.test" in s.rcpts},
        }
        dups = 0
        for box, counts in (("bob", bob), ("carol", carol), ("joe", joe)):
            assert set(counts) == expected[box], (
                f"{box}: missing {sorted(expected[box] - set(counts))}, "
                f"unexpected {sorted(set(counts) - expected[box])}; {why}"
            )
            # each crash can repeat at most the deliveries in flight at that moment
            assert max(counts.values()) <= 1 + kills, f"{box}: {counts.most_common(3)}; {why}"
            dups += sum(counts.values()) - len(counts)
        assert dups <= kills * 11, f"{dups} duplicate deliveries; {why}"
        print(f"{why}; {len(sent)} messages, {dups} duplicate deliveries, "
              f"{sum(joe.values())} bounces")
        alias = qmail_home / "alias" / "Maildir"
        assert maildir_count(alias) == 0, f"double bounces reached the postmaster; {why}"
        mta.stop()

        leftovers = queue_files(qmail_home)
        kinds = leftover_kinds(qmail_home, leftovers)
        assert set(kinds) <= {"mess", "intd", "pid"}, f"{leftovers}; {why}"
        assert assert_spares_sane(qmail_home) > 0, why
        assert_clean_after_restart(mta, boxes["bob"], seed)
    finally:
        mta.stop()


def test_todo_without_trigger_found_on_restart(qmail_home: Path) -> None:
    """qmail-queue killed between its todo link and its trigger write: the message is
    queued although qmail-send never heard of it; a restart's todo scan delivers it."""
    bob = add_user(qmail_home, "bob@example.test")
    mta = MTA(qmail_home)
    trigger = qmail_home / "queue" / "lock" / "trigger"
    saved = trigger.with_name("trigger.saved")
    try:
        restart(mta)
        # a plain file in the FIFO's place swallows the trigger byte unheard
        trigger.rename(saved)
        trigger.write_bytes(b"")
        try:
            result = queue_message(
                qmail_home, make_message("late", 900, ["bob@example.test"]), SENDER,
                ["bob@example.test"],
            )
        finally:
            trigger.unlink()
            saved.rename(trigger)
        assert result.ok, result
        assert os.listdir(qmail_home / "queue" / "todo") != []
        time.sleep(0.5)
        # without a trigger qmail-send rescans todo/ only every 1500 s (spec §3.8)
        assert maildir_count(bob) == 0, "qmail-send saw a message nobody told it about"
        mta.stop()
        restart(mta)
        wait_for(lambda: maildir_count(bob) == 1, 20, "delivery after restart")
        wait_for(lambda: queue_files(qmail_home) == [], 20, "queue to empty")
        assert delivered(bob) == [Copy("late", True)]
    finally:
        mta.stop()
