"""A library 429's drain counts as admitted ahead only the plain requests inside the door:
those inside are the burst's mix, and its library requests are rejected under the queue.
The real scheduler on a virtual clock (test_admission.VirtualServer): milliseconds."""

from __future__ import annotations

from test_admission import BUDGET, MAX_SEQS, VirtualServer, warm_up

from moska.server.admission import AdmissionController, EngineLimits, RequestCost, Verdict

PLAIN = RequestCost(100, 12)
LIBRARY = RequestCost(400, 8, library_attend=16384)  # its prefill alone misses the SLO
MIX = [LIBRARY, LIBRARY, LIBRARY, PLAIN] * 20  # the burst inside the door, in arrival order


def test_a_library_drain_counts_only_the_plain_requests_inside_as_admitted():
    """Waves of the burst's mix are decided first (the controller learns the share of
    library requests, 3 in 4), then 80 of that mix are inside the door of an idle engine
    and a library request is decided: its prefill alone misses the SLO, so it is admitted
    only on the idle engine, after the plain requests inside that admission takes. Its
    drain is within 2x of when a retry (after each step) is really admitted. The old door
    counted the 80 inside as plain requests, 47 of them admitted ahead: 3.1 s promised for
    an admission after 1.1 s (at 300 clients on CPU, 10 s for 3 s)."""
    adm = AdmissionController(None, None, limits=EngineLimits(BUDGET, MAX_SEQS))
    server = VirtualServer(adm)
    warm_up(server)
    adm.ttft_slo = 3.0
    for _ in range(2):  # the last 128 decided are the mix's
        for cost in MIX:
            server.submit(cost)
        server.run_until_idle()
    learned = vars(adm.library_requests).get("share")  # what it learned of the mix
    tickets = [adm.door.enter() for _ in MIX]
    d = server.submit(LIBRARY)[1]
    assert d.verdict is Verdict.SLO
    assert adm.predict(LIBRARY, server.load()).alone_s > adm.headroom * adm.ttft_slo
    t0, admitted = server.t, {True: 0, False: 0}
    for ticket, cost in zip(tickets, MIX, strict=True):  # decided at once, in order
        adm.door.leave(ticket)
        admitted[bool(cost.library_attend)] += server.submit(cost)[1].accepted
    assert admitted[True] == 0 and 5 < admitted[False] <= 20
    before, after = server.retry_until_admitted(LIBRARY, t0)  # a retry after each step
    assert not server.load().running  # admitted on the idle engine
    assert 0.5 * before <= d.drain_s <= 2 * after, (d.drain_s, before, after)
    assert learned is not None and 0.6 < learned < 0.9
    server.run_until_idle()
