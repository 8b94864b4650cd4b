"""The access-log listeners of a real `tally serve` fed by hand: syslog datagrams over UDP
and line streams over TCP, with malformed, oversized and non-UTF-8 input mixed in. Every
bad line is counted and skipped alone; the good lines around it are applied; the
listeners keep serving."""

import json
import socket

from conftest import wait_for


def line(id, cost="0.5", team="eng"):
    return json.dumps({"id": id, "attributes": {"team": team}, "cost": cost}).encode()


def test_udp_and_tcp_skip_bad_lines_alone(tally):
    tally.put_limit("team", {"scope": {"team": "eng"}, "metric": "cost", "max": 100.0, "period": "1d"})
    host, port = tally.udp.rsplit(":", 1)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # One datagram, three lines: good, garbage, good with a syslog header.
    udp.sendto(line("u-1") + b"\nGET / 200\n<14>Dec  3 10:00:00 nginx: " + line("u-2") + b"\n", (host, int(port)))
    udp.sendto(b"\xff\xfe not utf-8", (host, int(port)))
    wait_for(lambda: tally.used("team") == 1.0, what="u-1 and u-2")
    wait_for(lambda: tally.metric("tally_log_lines_malformed_total") == 2, what="two malformed")

    host, port = tally.tcp.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b'{"id":"' + b"x" * 70_000 + b'"}\n')  # longer than 64 KiB: skipped
        s.sendall(line("t-1") + b"\n")
        s.sendall(b"87 <14>1 2026-12-03T10:00:00Z host caddy - - - " + line("t-2") + b"\n")  # octet-counted
        s.sendall(b'{"id":"t-3","cost":"-1"}\n')  # negative cost: refused
        s.sendall(line("t-1") + b"\n")  # a repeat: counted once
    wait_for(lambda: tally.used("team") == 2.0, what="t-1 and t-2")
    wait_for(lambda: tally.metric("tally_log_lines_malformed_total") == 4, what="two more malformed")
    wait_for(lambda: tally.metric("tally_log_records_duplicate_total") == 1, what="one duplicate")
    assert tally.metric("tally_log_records_applied_total") == 4
    assert tally.metric("tally_log_lines_dropped_total") == 0
    # Still serving.
    udp.sendto(line("u-3"), (tally.udp.rsplit(":", 1)[0], int(tally.udp.rsplit(":", 1)[1])))
    wait_for(lambda: tally.used("team") == 2.5, what="u-3")
