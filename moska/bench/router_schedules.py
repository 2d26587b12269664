"""Stream schedules of the routed decode-attention step (`router_overlap.py`): the same
launches on the same inputs, in orders and on streams that let the router overlap the
unique-KV attention (the one part that does not wait for the router's choices)."""

from __future__ import annotations

import torch

SCHEDULES = ("serial", "unique_side", "route_side", "prio", "route_side_split2", "route_first")
# also: route_side_split{n}, green{n} (a green context of n SMs for the router; eager)


def make_step(schedule: str, route, shared, unique, merge, streams: dict):
    """One step: the router's selections -> shared attention; unique attention; merge.
    serial: one stream. unique_side: unique on a side stream forked first. route_side:
    route + shared on a side stream forked first, unique after it on the main stream.
    prio: route + shared on a high-priority side stream. route_first: the router alone,
    then shared (high priority) beside unique. route_side_split{n}: as
    route_side with the unique attention in n launches (slices of the batch), so the
    scheduler has points to give SMs to the routed branch. green{n}: the router on a green
    context of n SMs, the unique attention on one of the other SMs (both forked first), the
    shared attention on the main stream once the router is done."""

    def branch():
        sel = route()
        return (*shared(sel), sel)

    split = schedule.removeprefix("route_side_split")
    parts = int(split or 2) if split != schedule else None

    def run():
        if schedule == "serial" or not streams:  # no streams (CPU): the launches in order
            o_s, l_s, sel = branch()
            o_u, l_u = unique(parts)
            return merge(o_u, l_u, o_s, l_s, sel)
        cur = torch.cuda.current_stream()
        if schedule == "unique_side":
            side = streams["side"]
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                o_u, l_u = unique(None)
            o_s, l_s, sel = branch()
            cur.wait_stream(side)
        elif schedule == "route_first":
            sel = route()  # alone, on the whole GPU; then shared and unique side by side
            s = streams["high"]
            s.wait_stream(cur)
            with torch.cuda.stream(s):
                o_s, l_s = shared(sel)
            o_u, l_u = unique(parts)
            cur.wait_stream(s)
        elif schedule.startswith("green"):
            g_route, g_unique = streams[schedule]
            g_route.wait_stream(cur)
            g_unique.wait_stream(cur)
            with torch.cuda.stream(g_route):
                sel = route()
            with torch.cuda.stream(g_unique):
                o_u, l_u = unique(None)
            cur.wait_stream(g_route)
            o_s, l_s = shared(sel)
            cur.wait_stream(g_unique)
        else:
            s = streams["high" if schedule == "prio" else "side"]
            s.wait_stream(cur)
            with torch.cuda.stream(s):
                o_s, l_s, sel = branch()
            o_u, l_u = unique(parts)
            cur.wait_stream(s)
        return merge(o_u, l_u, o_s, l_s, sel)

    return run


def make_streams(dev: str, schedules) -> tuple[dict, dict]:
    """The side, high-priority and green-context streams the schedules use ({} on CPU), and
    the errors of any green context that could not be made (its schedule is then skipped)."""
    if dev != "cuda":
        return {}, {}
    hi = torch.cuda.Stream.priority_range()[1]  # type: ignore[call-arg]
    out: dict = {"side": torch.cuda.Stream(), "high": torch.cuda.Stream(priority=hi)}
    errors: dict = {}
    total = torch.cuda.get_device_properties(dev).multi_processor_count
    for s in schedules:
        if s.startswith("green"):
            try:
                from torch.cuda.green_contexts import GreenContext

                n = int(s.removeprefix("green"))
                idx = torch.cuda.current_device()
                gr = GreenContext.create(num_sms=n, device_id=idx)
                gu = GreenContext.create(num_sms=total - n, device_id=idx)
                out[s] = (gr.Stream(), gu.Stream())  # type: ignore[attr-defined]
                out[f"{s}_contexts"] = (gr, gu)  # kept alive with their streams
            except Exception as e:  # noqa: BLE001 - recorded; the schedule is skipped
                errors[s] = repr(e)[-300:]
    return out, errors
