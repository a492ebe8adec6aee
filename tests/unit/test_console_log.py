from vmm.console import ConsoleLog


def test_keeps_everything_under_limit_and_replays():
    log = ConsoleLog(limit=100)
    log.write(b"hello ")
    got = []
    log.add_listener(got.append)
    log.write(b"world")
    assert b"".join(got) == b"hello world"
    assert log.getvalue() == b"hello world"


def test_bounded_drops_oldest_and_counts():
    log = ConsoleLog(limit=10)
    log.write(b"0123456789")
    log.write(b"abc")
    assert log.getvalue() == b"3456789abc"
    assert log.total == 13
    assert log.dropped == 3


def test_remove_listener():
    log = ConsoleLog()
    got = []
    log.add_listener(got.append, replay=False)
    log.write(b"a")
    log.remove_listener(got.append)
    log.write(b"b")
    assert got == [b"a"]
