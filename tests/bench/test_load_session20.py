"""The summary of the session-20 device load script (bench/load_session20.py): per server,
the SLO share of first attempts, obeying clients pooled by burst size (counts summed,
shares recomputed), or the dry own-retry score weighted by each burst's scored 429s."""

from __future__ import annotations

import json

from moska.bench.load_obey import KINDS, counts, shares
from moska.bench.load_session20 import main, summarize_dir


def _obey(clients_429: int, first: int) -> dict:
    c = counts([], None, 2)
    c.update(clients=clients_429 + 1, clients_429=clients_429, admitted_first_retry=first)
    out = shares(c)
    out["by_kind"] = {k: shares(dict(c)) for k in KINDS}
    return out


def _burst(clients: int, admitted: int, slo: float, **extra) -> dict:
    return {"clients": clients, "admitted": admitted, "slo_met_share": slo, **extra}


def test_servers_are_pooled_by_burst_size(tmp_path, capsys):
    obey = [
        _burst(64, 10, 1.0, obey=_obey(10, 10)),
        _burst(300, 30, 0.9, obey=_obey(30, 15)),
        _burst(64, 10, 0.8, obey=_obey(30, 0)),
    ]
    dry = [
        _burst(64, 4, 1.0, own_retry={"all": {"n": 10, "within": 1.0}}),
        _burst(300, 6, 1.0, own_retry={"all": {"n": 30, "within": 0.5}}),
    ]
    args = {"library": "demo", "bookings": "on", "device": "cpu"}
    (tmp_path / "load_a.json").write_text(
        json.dumps({"args": {**args, "obey_retries": 2}, "report": {"bursts": obey}})
    )
    (tmp_path / "load_b.json").write_text(
        json.dumps({"args": {**args, "obey_retries": 0}, "report": {"bursts": dry}})
    )
    (tmp_path / "load_c.json").write_text("{cut short")  # a server killed while writing
    servers = {s["file"]: s for s in summarize_dir(tmp_path)["servers"]}
    assert set(servers) == {"load_a.json", "load_b.json"}
    a, b = servers["load_a.json"], servers["load_b.json"]
    assert a["first_attempt_admitted"] == 50
    assert abs(a["first_attempt_slo"] - (10 + 27 + 8) / 50) < 1e-12
    assert (
        a["obey"]["clients_429"] == 70
        and abs(a["obey"]["admitted_first_retry_share"] - 25 / 70) < 1e-12
    )
    assert a["obey_by_size"]["64"]["admitted_first_retry_share"] == 10 / 40
    assert abs(b["dry"]["within"] - (10 * 1.0 + 30 * 0.5) / 40) < 1e-12
    assert b["dry_by_size"]["300"]["within"] == 0.5
    assert main([str(tmp_path)]) == 0
    assert (
        json.loads((tmp_path / "summary.json").read_text())["servers"][0]["file"] == "load_a.json"
    )
    assert "dry own-retry within 2x 0.62 (40)" in capsys.readouterr().out
