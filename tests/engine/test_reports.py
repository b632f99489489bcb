"""How reports travel (adaras.engine.reports), each part on its own: the
worker's outbox, the engine core's carry onto outputs, the frontend's mailbox
and its admission check. The engine tests run the whole path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from adaras.engine import reports
from adaras.engine.reports import ADMISSION_KEY, REPORT_KEY, Mailbox, Outbox, carry, take_report


def output(rid: str, params=None):
    return SimpleNamespace(request_id=rid, kv_transfer_params=params)


def test_the_outbox_is_empty_after_every_drain():
    box = Outbox()
    box.post("a", {"p": 1})
    box.post("a", {"p": 2})  # the last report of a step wins
    assert box.drain() == {"a": {"p": 2}} and len(box) == 0 and box.drain() == {}


def test_a_report_rides_the_next_output_of_its_request():
    pending: dict = {}
    carry(pending, {"r1": {"p": 0.7}}, [], live={"r1"})  # partial prefill: no output yet
    assert pending == {"r1": {"p": 0.7}}
    outs = [output("r0"), output("r1", {"do_remote_prefill": False})]
    carry(pending, None, outs, live={"r0", "r1"})
    assert outs[0].kv_transfer_params is None
    assert outs[1].kv_transfer_params == {"do_remote_prefill": False, REPORT_KEY: {"p": 0.7}}
    assert pending == {}


def test_a_report_of_a_request_that_ended_without_output_is_dropped():
    pending: dict = {}
    carry(pending, {"gone": {"p": 0.1}, "alive": {"p": 0.2}}, [], live={"alive"})
    assert pending == {"alive": {"p": 0.2}}


def test_the_frontend_takes_the_report_and_leaves_vllms_params_as_they_were():
    out = output("r", {REPORT_KEY: {"p": 0.3}})
    assert take_report(out) == {"p": 0.3} and out.kv_transfer_params is None
    out = output("r", {"x": 1, REPORT_KEY: {"p": 0.3}})
    assert take_report(out) == {"p": 0.3} and out.kv_transfer_params == {"x": 1}
    assert take_report(output("r", {"x": 1})) is None


def test_reports_are_filed_under_the_exact_server_key_only():
    box = Mailbox()
    mine, other = box.open({}), box.open({})
    assert box.deliver(f"chatcmpl-{mine.key}", 0, {"p": 1})
    assert box.deliver(f"cmpl-{mine.key}-3", 1, {"p": 2})
    assert mine.reports == {(0, 0): {"p": 1}, (3, 1): {"p": 2}} and other.reports == {}
    # a prefix, a suffix, or a client's own id reaches nobody
    for rid in (f"chatcmpl-{mine.key[:8]}", f"chatcmpl-{mine.key}x", "chatcmpl-adaras",
                f"chatcmpl-{mine.key}-1-2"):
        assert not box.deliver(rid, 0, {"p": 9})
    box.close(mine)
    assert not box.deliver(f"chatcmpl-{mine.key}", 0, {"p": 1})  # closed: dropped, not stored
    assert list(box.open_requests) == [other.key]


STEERED = {"steering": {"mode": "always", "profile": "a", "alpha": 0.3},
           "steering_fingerprint": "abc", "steering_prompt_positions": 0}


@pytest.mark.parametrize("extra, field", [
    ({"steering": {"mode": "always"}}, "steering"),
    ({"adaras_salt": "x"}, "adaras_salt"),
    ({"steering_fingerprint": "abc"}, "steering_fingerprint"),
    ({"adaras_capture": {"mean_from": 0}}, "adaras_capture"),
    ({**STEERED, ADMISSION_KEY: "0" * 32}, "steering"),  # a key nobody admitted
])
def test_enforced_admission_refuses_fields_the_server_did_not_set(extra, field):
    box = Mailbox()
    box.enforced = True
    with pytest.raises(ValueError, match=f"^{field}: set by the server only"):
        box.check_admitted(extra)


def test_enforced_admission_accepts_exactly_what_was_admitted():
    box = Mailbox()
    box.enforced = True
    entry = box.open(STEERED)
    box.check_admitted({**STEERED, ADMISSION_KEY: entry.key, "other": 1})
    box.check_admitted({"unrelated": 1})
    with pytest.raises(ValueError, match="^steering_fingerprint"):  # another profile version
        box.check_admitted({**STEERED, "steering_fingerprint": "old", ADMISSION_KEY: entry.key})
    with pytest.raises(ValueError, match="^adaras_salt"):  # a salt on top of an admission
        box.check_admitted({**STEERED, "adaras_salt": "s", ADMISSION_KEY: entry.key})
    box.close(entry)
    with pytest.raises(ValueError):  # an admission ends with its response
        box.check_admitted({**STEERED, ADMISSION_KEY: entry.key})


def test_offline_engines_are_not_enforced():
    Mailbox().check_admitted({"steering": {"mode": "always"}, "adaras_capture": {}})
    assert reports.MAILBOX.enforced is False
