"""The dispatcher against a Publisher double, a real SQLite buffer and the batching stage, on
an injected clock: live first, the backlog oldest first, per-batch backoff, the connection-wide
pause, the flush at stop, each batch's take ended once. No broker, no sleeps (a flush waiting on
answers waits 50 ms a turn at most)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway import wire
from gateway.batching import Batcher, Ids, to_record
from gateway.buffer import Buffer, now_ms
from gateway.cloud import Done, PublishResult
from gateway.dispatch import Dispatcher, Stage
from gateway.model import Batch, DecodedUplink, DeviceKey, Reading
from gateway.status import read_status

DEV = DeviceKey("dev_eui", "70b3d57ed0001234")
ACCEPTED = PublishResult(True, 0)


def refused(code: int | None) -> PublishResult:
    return PublishResult(False, code, "refused by the test")


class FakePublisher:
    """A Publisher (gateway.cloud's protocol): answers each publish at once with `answer(batch)`,
    or holds it (`answer` returns None) until the test calls `held[seq]`."""

    def __init__(self) -> None:
        self.epoch = 1
        self.connected = True
        self.sent: list[Batch] = []
        self.held: dict[int, Done] = {}
        self.answer: Callable[[Batch], PublishResult | None] = lambda batch: ACCEPTED

    def start(self) -> None:
        pass

    def stop(self, timeout_s: float, send_will: bool = False) -> None:
        pass

    def publish(self, batch: Batch, done: Done) -> None:
        self.sent.append(batch)
        result = self.answer(batch)
        if result is None:
            self.held[batch.seq] = done
        else:
            done(batch.seq, result)

    def seqs(self) -> list[int]:
        return [b.seq for b in self.sent]


class Clock:
    """Monotonic seconds that move only when told (`at`), or by `tick` on every reading."""

    def __init__(self, tick: float = 0.0) -> None:
        self.at = 1000.0
        self.tick = tick

    def __call__(self) -> float:
        self.at += self.tick
        return self.at


def uplink(n: int, readings: int = 2) -> DecodedUplink:
    t = now_ms()
    return DecodedUplink(
        source=f"chirpstack/{n}",
        sensor_id=f"s{n}",
        device=DEV,
        received_ms=t,
        meta={"dev_eui": DEV.id, "f_cnt": n, "f_port": 1},
        readings=tuple(Reading("CC1", n * 100 + i, "mA", t + i) for i in range(readings)),
    )


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[Buffer]:
    """A real buffer in tmp_path."""
    b = Buffer(tmp_path / "b.db")
    yield b
    b.close()


@pytest.fixture
def batcher(buffer: Buffer) -> Batcher:
    """Uncompressed messages so small that each holds one uplink (two readings)."""
    return Batcher(buffer, Ids("gw-t-01", "acme", "leeds"), max_bytes=300, compress=False)


def backlog(buffer: Buffer, count: int, first: int = 0) -> list[str]:
    """`count` uplinks stored before the cloud connected (each its own commit): their sources."""
    for n in range(first, first + count):
        buffer.store([to_record(uplink(n))])
    return [f"chirpstack/{n}" for n in range(first, first + count)]


def source_of(batch: Batch) -> str:
    return str(wire.decode_message(batch.payload)["series"][0]["source"])


def dispatcher(batcher: Batcher, publisher: FakePublisher, clock: Clock, max_in_flight: int = 4) -> Dispatcher:
    return Dispatcher(batcher, publisher, max_in_flight=max_in_flight, max_delay_s=0.0, clock=clock)


def turn(d: Dispatcher) -> None:
    """One turn of the main loop's publishing part, with the commit that records the batches
    it formed (in the daemon: intake's next group, or `settle` a second later)."""
    d.collect_results()
    d.publish_due()
    d.buffer.settle(force=True)
    d.publish_due()


def test_a_batch_is_published_only_once_its_take_is_recorded(buffer: Buffer, batcher: Batcher) -> None:
    """A live batch formed between two commits waits for the next one, so that a crash after
    the publish sends it again with the same id and bytes; it goes right after that commit."""
    publisher, clock = FakePublisher(), Clock()
    d = dispatcher(batcher, publisher, clock)
    d.publish_due()  # the connection starts
    buffer.store([to_record(uplink(1))])
    d.publish_due()
    assert publisher.sent == [] and buffer.depth().batch_readings == 2  # formed, held, not sent
    buffer.store([to_record(uplink(2))])  # intake's next commit records it
    d.publish_due()
    assert [source_of(b) for b in publisher.sent][:1] == ["chirpstack/1"]


def test_live_readings_get_the_slot_the_backlog_never_takes(buffer: Buffer, batcher: Batcher) -> None:
    """However long the backlog, it fills all in-flight slots but one, and a live reading is
    published in that last slot while the backlog's batches are still unanswered."""
    old = backlog(buffer, 5)
    publisher, clock = FakePublisher(), Clock()
    publisher.answer = lambda batch: None
    d = dispatcher(batcher, publisher, clock, max_in_flight=3)

    turn(d)
    turn(d)
    assert [source_of(b) for b in publisher.sent] == old[:2]  # the third slot stays free
    buffer.store([to_record(uplink(100))])
    turn(d)
    live = publisher.sent[-1]
    assert len(publisher.sent) == 3 and source_of(live) == "chirpstack/100" and live.readings == 2
    assert d.in_flight_seqs() == sorted(b.seq for b in publisher.sent)
    buffer.store([to_record(uplink(101))])
    turn(d)
    assert len(publisher.sent) == 3  # every slot taken: the new live reading waits its turn


def test_the_backlog_drains_oldest_first_and_each_confirmed_batch_leaves(buffer: Buffer, batcher: Batcher) -> None:
    """The backlog goes out oldest first, and each confirmed batch's readings leave the buffer."""
    old = backlog(buffer, 6)
    publisher, clock = FakePublisher(), Clock()
    d = dispatcher(batcher, publisher, clock, max_in_flight=2)

    for _ in range(10):
        turn(d)
    assert [source_of(b) for b in publisher.sent] == old
    assert buffer.depth().total_readings == 0 and d.published_batches == 6


def test_a_refused_batch_is_sent_again_with_the_same_bytes_and_id(buffer: Buffer, batcher: Batcher) -> None:
    """A batch refused (0x99) is held and, once its backoff is over, published again as the same
    message: same seq, batch_id and payload; its readings stay until then."""
    backlog(buffer, 1)
    publisher, clock = FakePublisher(), Clock()
    publisher.answer = lambda batch: refused(0x99) if len(publisher.sent) == 1 else ACCEPTED
    d = dispatcher(batcher, publisher, clock)

    turn(d)
    d.collect_results()
    seq = publisher.sent[0].seq
    assert d.stage_of(seq) is Stage.BACKING_OFF and buffer.depth().total_readings == 2
    clock.at += 2.0
    turn(d)
    d.collect_results()
    first, again = publisher.sent
    assert again == first  # seq, batch_id, payload, readings
    assert d.stage_of(seq) is None and buffer.depth().total_readings == 0


def test_a_failing_batch_backs_off_on_its_own_while_others_succeed(buffer: Buffer, batcher: Batcher) -> None:
    """A batch refused again and again (0x99) is retried after 2 s, then 4 s, then 8 s on the
    dispatcher's clock, although other batches succeed in between; its refusals pause nobody."""
    backlog(buffer, 1)
    publisher, clock = FakePublisher(), Clock()
    poisoned: list[int] = []

    def answer(batch: Batch) -> PublishResult:
        if not poisoned:
            poisoned.append(batch.seq)
        return refused(0x99) if batch.seq == poisoned[0] else ACCEPTED

    publisher.answer = answer
    d = dispatcher(batcher, publisher, clock)
    attempts: list[float] = []
    others_between: list[int] = []

    for n in range(160):  # 16 s in steps of 0.1 s, a live uplink each step
        buffer.store([to_record(uplink(1000 + n, 1))])
        before = len(publisher.sent)
        turn(d)
        d.collect_results()
        new = publisher.sent[before:]
        attempts += [clock.at for b in new if b.seq == poisoned[0]]
        others_between.append(sum(1 for b in new if b.seq != poisoned[0]))
        clock.at = round(clock.at + 0.1, 1)
    assert [round(t - attempts[0], 1) for t in attempts] == [0.0, 2.0, 6.0, 14.0]
    assert all(others_between), "another batch's refusal held back a live batch"
    buffer.heartbeat()
    assert read_status(buffer.path)["counters"]["puback_refused_0x99"] == 4


@pytest.mark.parametrize("code", [0x87, 0x97])
def test_a_refusal_concerning_the_connection_pauses_all_publishing(buffer: Buffer, batcher: Batcher, code: int) -> None:
    """A refusal of the connection (0x87 not authorized, 0x97 quota exceeded) pauses every
    batch, live ones too: 2 s for the first refusal, doubling with each refusal in a row (here
    the third, as two batches were refused together, pauses 8 s)."""
    publisher, clock = FakePublisher(), Clock()
    publisher.answer = lambda batch: refused(code)
    d = dispatcher(batcher, publisher, clock)
    buffer.store([to_record(uplink(1))])
    turn(d)
    turn(d)  # the refusal is read: the pause begins
    buffer.store([to_record(uplink(2))])
    clock.at += 1.9
    turn(d)
    assert len(publisher.sent) == 1, "published during the pause"
    clock.at += 0.1
    turn(d)
    assert len(publisher.sent) == 3  # the live batch, and the refused one (its own backoff was 2 s)
    turn(d)  # both refused again
    clock.at += 7.9
    turn(d)
    assert len(publisher.sent) == 3, "the third refusal in a row pauses for 8 s"
    publisher.answer = lambda batch: ACCEPTED
    clock.at += 0.1
    turn(d)
    d.collect_results()
    assert len(publisher.sent) == 5 and buffer.depth().total_readings == 0 and d.published_batches == 2
    buffer.heartbeat()
    assert read_status(buffer.path)["counters"][f"puback_refused_{code:#04x}"] == 3


def test_a_batch_that_keeps_failing_is_logged_as_a_warning_only_at_attempts_1_2_4_8_16(
    buffer: Buffer, batcher: Batcher
) -> None:
    """A batch refused 17 times is logged as a warning at attempts 1, 2, 4, 8 and 16 only
    (debug otherwise), so a stuck batch cannot flood the journal."""
    backlog(buffer, 1)
    publisher, clock = FakePublisher(), Clock()
    publisher.answer = lambda batch: refused(0x99)
    d = dispatcher(batcher, publisher, clock)
    with capture_logs() as logs:
        for _ in range(17):
            turn(d)
            d.collect_results()
            clock.at += 60.0
    attempts = [e for e in logs if e["event"] == "batch not accepted; kept for retry"]
    assert [e["attempt"] for e in attempts] == list(range(1, 18))
    assert [e["attempt"] for e in attempts if e["log_level"] == "warning"] == [1, 2, 4, 8, 16]
    assert len({e["batch_id"] for e in attempts}) == 1
    assert attempts[-1]["retry_in_s"] == 60.0  # the backoff stops growing at MAX_BACKOFF_S


def test_a_batch_lost_with_the_connection_is_sent_again_without_backoff(buffer: Buffer, batcher: Batcher) -> None:
    """A publish that failed because the connection went (no reason code, publisher no longer
    connected) is not a refusal: the batch is queued again and goes as soon as the link is back."""
    backlog(buffer, 1)
    publisher, clock = FakePublisher(), Clock()
    publisher.answer = lambda batch: None
    d = dispatcher(batcher, publisher, clock)
    turn(d)
    seq = publisher.sent[0].seq
    publisher.connected = False
    publisher.held.pop(seq)(seq, PublishResult(False, None, "connection lost"))
    turn(d)
    assert d.stage_of(seq) is Stage.QUEUED
    publisher.connected, publisher.epoch = True, 2
    publisher.answer = lambda batch: ACCEPTED
    turn(d)
    d.collect_results()
    assert publisher.seqs() == [seq, seq] and buffer.depth().total_readings == 0


def test_a_batch_too_large_for_the_link_is_split_and_its_parts_sent(buffer: Buffer) -> None:
    """A batch refused as too large, with the link's limit announced, is replaced by parts within
    the limit (logged), batches form smaller from then on, and every part is published."""
    batcher = Batcher(buffer, Ids("gw-t-01", "acme", "leeds"), max_bytes=120 * 1024, compress=False)
    buffer.store([to_record(uplink(n, 40)) for n in range(20)])
    publisher, clock = FakePublisher(), Clock()
    limit = 4096
    publisher.answer = lambda batch: (
        PublishResult(False, None, "too large", too_large=True, limit=limit) if len(batch.payload) > limit else ACCEPTED
    )
    d = dispatcher(batcher, publisher, clock)
    with capture_logs() as logs:
        for _ in range(20):
            turn(d)
    assert "batch refused as too large; split into smaller batches" in [e["event"] for e in logs]
    big = publisher.sent[0]
    assert len(big.payload) > limit and d.stage_of(big.seq) is None
    assert batcher.max_bytes == limit
    assert buffer.depth().total_readings == 0
    accepted = [b for b in publisher.sent if len(b.payload) <= limit]
    assert sum(b.readings for b in accepted) == 20 * 40


def test_the_flush_at_stop_sends_everything_committed(buffer: Buffer, batcher: Batcher) -> None:
    """Stopping, the flush sends every stored uplink, live or backlog, in all in-flight slots,
    and returns once all are confirmed."""
    backlog(buffer, 4)
    publisher, clock = FakePublisher(), Clock()
    d = dispatcher(batcher, publisher, clock, max_in_flight=2)
    d.publish_due()  # the connection starts: what is stored is backlog
    buffer.store([to_record(uplink(11))])  # live
    d.flush(deadline=clock() + 4.5)
    assert buffer.depth().total_readings == 0
    assert d.published_batches == 5 and d.in_flight_seqs() == []


def test_the_flush_at_stop_ends_by_its_deadline_when_nothing_answers(buffer: Buffer, batcher: Batcher) -> None:
    """A cloud that never answers cannot hold the stop: the flush returns within its deadline
    (less the second kept for the publisher to stop), the readings still stored."""
    backlog(buffer, 3)
    publisher, clock = FakePublisher(), Clock(tick=0.1)
    publisher.answer = lambda batch: None
    d = dispatcher(batcher, publisher, clock)
    deadline = clock() + 4.5
    d.flush(deadline)
    assert deadline - 1.0 <= clock() <= deadline
    assert len(publisher.sent) == 3 and buffer.depth().total_readings == 6


def test_the_flush_at_stop_respects_backoff_and_the_pause(buffer: Buffer, batcher: Batcher) -> None:
    """The flush does not send a batch before its backoff is over, nor anything while the
    connection is paused; what it does not send stays stored for the next start."""
    backlog(buffer, 1)
    publisher, clock = FakePublisher(), Clock()
    publisher.answer = lambda batch: refused(0x99) if source_of(batch) == "chirpstack/0" else ACCEPTED
    d = dispatcher(batcher, publisher, clock)
    turn(d)
    d.collect_results()
    poisoned = publisher.sent[0].seq
    buffer.store([to_record(uplink(5))])
    d.flush(deadline=clock() + 1.5)
    assert publisher.seqs().count(poisoned) == 1  # not again: it backs off 2 s
    assert buffer.depth().total_readings == 2 and buffer.depth().uplinks == 0

    buffer.store([to_record(uplink(6))])
    d.pause(10.0)
    clock.tick = 0.1  # the flush waits out its deadline for the pause to end
    d.flush(deadline=clock() + 4.5)
    assert len(publisher.sent) == 2 and buffer.depth().uplinks == 1


def test_an_answer_for_a_batch_not_in_flight_is_ignored(buffer: Buffer, batcher: Batcher) -> None:
    """An answer for a seq the dispatcher never sent, or a second answer for one already
    confirmed, changes nothing: no confirm, no count, no retry."""
    backlog(buffer, 1)
    publisher, clock = FakePublisher(), Clock()
    publisher.answer = lambda batch: None
    d = dispatcher(batcher, publisher, clock, max_in_flight=2)
    turn(d)  # one backlog slot of two
    (seq,) = publisher.held
    done = publisher.held[seq]
    done(seq + 1, ACCEPTED)  # never sent
    done(seq + 10**6, refused(0x99))  # unknown
    d.collect_results()
    assert buffer.depth().total_readings == 2 and d.published_batches == 0
    assert d.stage_of(seq) is Stage.IN_FLIGHT
    done(seq, ACCEPTED)
    done(seq, refused(0x99))  # a second answer for the same publish
    d.collect_results()
    assert d.published_batches == 1 and d.stage_of(seq) is None and buffer.depth().total_readings == 0


def test_a_cloud_that_refuses_everything_leaves_the_readings_on_disk(buffer: Buffer, batcher: Batcher) -> None:
    """Batches held for a retry are bounded (held_max): a cloud refusing every message does not
    pull the whole backlog into memory; what is not held stays untaken in the buffer."""
    backlog(buffer, 40)
    publisher, clock = FakePublisher(), Clock()
    publisher.answer = lambda batch: refused(0x99)
    d = dispatcher(batcher, publisher, clock, max_in_flight=2)
    for _ in range(50):
        turn(d)
        clock.at += 1.0
    assert len({b.seq for b in publisher.sent}) == d.held_max == 8
    assert buffer.depth(live=False).uplinks == 40 - 8


def test_successful_publishes_are_summarised_once_a_minute_at_info(buffer: Buffer, batcher: Batcher) -> None:
    """Each accepted batch is logged at debug only; one info line a minute (and one at the stop's
    flush) sums the batches, readings and bytes accepted since the last, and a quiet minute says
    nothing."""
    backlog(buffer, 3)
    publisher, clock = FakePublisher(), Clock()
    d = dispatcher(batcher, publisher, clock)
    with capture_logs() as logs:
        turn(d)
        d.collect_results()
        assert [e for e in logs if e["log_level"] == "info"] == []
        clock.at += 60.0
        d.collect_results()
        clock.at += 60.0
        d.collect_results()  # nothing published in this minute: no line
        buffer.store([to_record(uplink(9))])
        d.flush(clock.at + 5.0)
    summaries = [e for e in logs if e["event"] == "published"]
    assert [(e["log_level"], e["batches"], e["readings"]) for e in summaries] == [("info", 3, 6), ("info", 1, 2)]
    assert summaries[0]["bytes"] == sum(len(b.payload) for b in publisher.sent[:3]) and summaries[0]["seconds"] == 60
    assert len([e for e in logs if e["event"] == "batch published"]) == 4


def test_the_flush_at_stop_records_and_sends_a_batch_formed_just_before(buffer: Buffer, batcher: Batcher) -> None:
    """A live batch formed just before the stop and not yet recorded (intake has stopped: no
    commit of its will record it) is recorded by the flush itself and sent (the demo's 6 s run
    once ended with nothing sent)."""
    publisher, clock = FakePublisher(), Clock()
    d = dispatcher(batcher, publisher, clock)
    d.publish_due()  # the connection starts
    buffer.store([to_record(uplink(1))])
    d.publish_due()
    assert publisher.sent == []  # formed, waiting for a commit
    d.flush(deadline=clock() + 4.5)
    assert [source_of(b) for b in publisher.sent] == ["chirpstack/1"] and buffer.depth().total_readings == 0


def test_due_in_says_when_live_readings_reach_max_delay_or_a_backoff_ends(tmp_path: Path) -> None:
    """The main loop sleeps until the dispatcher's next deadline instead of polling: `due_in`
    is the time until the oldest live reading reaches max_delay (both clocks injected), then
    until a refused batch's backoff ends; None with nothing waiting, while the link is down,
    or while every in-flight slot is taken (a result wakes the loop then)."""
    mono = Clock()
    buffer = Buffer(tmp_path / "b.db", monotonic=mono)
    try:
        batcher = Batcher(buffer, Ids("gw-t-01", "acme", "leeds"), max_bytes=300, compress=False)
        publisher, clock = FakePublisher(), Clock()
        d = Dispatcher(batcher, publisher, max_in_flight=2, max_delay_s=5.0, clock=clock)
        d.publish_due()  # the link is up: what comes from now is live
        assert d.due_in() is None
        buffer.store([to_record(uplink(1))])
        mono.at += 2.0
        assert d.due_in() == pytest.approx(3.0)
        publisher.connected = False
        assert d.due_in() is None
        publisher.connected = True
        mono.at += 3.0
        assert d.due_in() == 0.0
        publisher.answer = lambda batch: refused(0x99)
        turn(d)
        d.collect_results()
        assert d.stage_of(publisher.sent[0].seq) is Stage.BACKING_OFF
        assert d.due_in() == pytest.approx(2.0)  # the first backoff
        publisher.answer = lambda batch: None  # held: in flight until the test answers
        clock.at += 2.0
        buffer.store([to_record(uplink(2))])
        mono.at += 5.0
        turn(d)
        assert d.in_flight == 2
        assert d.due_in() is None
    finally:
        buffer.close()


def test_settle_due_in_is_the_time_until_a_waiting_take_is_recorded_without_a_commit(tmp_path: Path) -> None:
    """A formed take waits for the next commit to record it; without one, `settle` writes it
    SETTLE_AFTER_S later: `settle_due_in` is the time until then (the main loop sleeps until
    it), None when nothing waits."""
    from gateway.buffer.core import SETTLE_AFTER_S

    mono = Clock()
    buffer = Buffer(tmp_path / "b.db", monotonic=mono)
    try:
        batcher = Batcher(buffer, Ids("gw-t-01", "acme", "leeds"), max_bytes=300, compress=False)
        assert buffer.settle_due_in() is None
        buffer.store([to_record(uplink(1))])
        batch = batcher.form(live=True)
        assert batch is not None and not batch.take.recorded
        assert buffer.settle_due_in() == pytest.approx(SETTLE_AFTER_S)
        mono.at += SETTLE_AFTER_S
        assert buffer.settle_due_in() == 0.0
        assert buffer.settle()
        assert batch.take.recorded
        assert buffer.settle_due_in() is None
    finally:
        buffer.close()


def test_a_bursts_last_full_message_and_remainder_go_in_the_turn_intake_goes_idle(buffer: Buffer) -> None:
    """When the burst's last commit brings a full message and more, and intake is idle after
    it, the turn forms both and sends both: no commit of intake's is coming to record their
    takes, so waiting for one left the burst's end a second (`settle`) behind its last commit."""
    batcher = Batcher(buffer, Ids("gw-t-01", "acme", "leeds"), max_bytes=2000, compress=False)
    publisher, clock = FakePublisher(), Clock()
    idle = [False]
    d = Dispatcher(batcher, publisher, max_in_flight=8, max_delay_s=60.0, clock=clock, intake_idle=lambda: idle[0])
    d.publish_due()  # the connection starts: what comes now is live
    for n in range(40):  # a burst: full messages go as they fill
        buffer.store([to_record(uplink(n))])
        turn(d)
    assert publisher.sent
    buffer.store([to_record(uplink(n)) for n in range(40, 80)])  # its last group: a full message and more
    idle[0] = True  # and intake has nothing after it
    d.collect_results()
    d.publish_due()  # one turn, and no commit after it
    assert sum(b.readings for b in publisher.sent) == 160
    assert buffer.depth(live=True).total_readings == 0


def test_a_bursts_remainder_goes_once_intake_is_idle_not_max_delay_later(buffer: Buffer) -> None:
    """Live readings that fill a message go at once; what a burst leaves after its last full
    message goes as soon as intake has nothing more, not max_delay later, and in the same turn
    (idle intake makes no commit that would record it). At a steady load,
    which never fills a message, a reading still waits up to max_delay, idle intake or not."""
    batcher = Batcher(buffer, Ids("gw-t-01", "acme", "leeds"), max_bytes=2000, compress=False)
    publisher, clock = FakePublisher(), Clock()
    idle = [True]
    d = Dispatcher(batcher, publisher, max_in_flight=8, max_delay_s=60.0, clock=clock, intake_idle=lambda: idle[0])
    d.publish_due()  # the connection starts: what comes now is live
    buffer.store([to_record(uplink(0))])
    turn(d)
    assert publisher.sent == []  # steady load: waits for max_delay (60 s here)
    idle[0] = False  # a burst: intake still has messages queued
    for n in range(1, 40):
        buffer.store([to_record(uplink(n))])
        turn(d)
    full = list(publisher.sent)
    assert full and buffer.depth(live=True).total_readings > 0  # full messages out, a remainder waits
    turn(d)
    assert publisher.sent == full  # intake busy: the remainder may still grow
    idle[0] = True
    d.collect_results()
    d.publish_due()  # one turn, no commit after it: no commit of intake's is coming to record the take
    assert sum(b.readings for b in publisher.sent) == 80
    buffer.store([to_record(uplink(99))])  # steady again: the burst ended with its remainder
    turn(d)
    assert sum(b.readings for b in publisher.sent) == 80
