"""The event feed from the coordinator to the submitting process (``actors/feed.py``), in one
process over a real ipc socket: every event arrives in order, sync and async, a failed guard ends
the stream with its error, and a feed whose reader left drops its events."""

import asyncio
import threading

import pytest

from dovetail.actors.feed import Publisher, Subscriber
from dovetail.request import Failed, Finished, GenerationStats, Tokens


@pytest.fixture
def pair(tmp_path):
    subscriber, publisher = Subscriber(tmp_path), Publisher()
    yield subscriber, publisher
    publisher.close()
    subscriber.close()


def _events(n: int):
    stats = GenerationStats(new_tokens=2 * n, steps=n, accepted_per_step=[1] * n, choices={"model@2": n})
    return [Tokens([i, i + 1]) for i in range(n)] + [Finished(stats, cancelled=False, generation=3)]


def test_every_event_arrives_in_order_to_a_blocking_reader(pair):
    subscriber, publisher = pair
    feed = subscriber.open("a")
    other = subscriber.open("b")
    emit, emit_other = publisher.emitter(subscriber.address, "a"), publisher.emitter(subscriber.address, "b")
    sent = _events(50)
    for event in sent:
        emit(event)
        emit_other(Tokens([7]))
    emit_other(Failed("its own error", 3))
    assert list(feed) == sent
    assert list(other) == [Tokens([7])] * len(sent) + [Failed("its own error", 3)]


def test_an_async_reader_gets_events_pushed_from_another_thread(pair):
    subscriber, publisher = pair
    sent = _events(20)

    async def read():
        feed = subscriber.open("a")
        emit = publisher.emitter(subscriber.address, "a")
        threading.Thread(target=lambda: [emit(e) for e in sent]).start()
        return [event async for event in feed]

    assert asyncio.run(read()) == sent


def test_a_failed_guard_ends_the_stream_with_its_error(pair):
    subscriber, publisher = pair
    feed = subscriber.open("a")
    publisher.emitter(subscriber.address, "a")(Tokens([1]))
    iterator = iter(feed)
    assert next(iterator) == Tokens([1])
    feed.fail(RuntimeError("the coordinator died"))
    with pytest.raises(RuntimeError, match="the coordinator died"):
        next(iterator)


def test_events_of_a_closed_feed_are_dropped(pair):
    subscriber, publisher = pair
    feed = subscriber.open("a")
    emit = publisher.emitter(subscriber.address, "a")
    emit(Tokens([1]))
    iterator = iter(feed)
    assert next(iterator) == Tokens([1])
    iterator.close()  # the reader went away
    emit(Tokens([2]))
    later = subscriber.open("b")
    publisher.emitter(subscriber.address, "b")(Failed("x"))
    assert list(later) == [Failed("x")]
    assert "a" not in subscriber._feeds
