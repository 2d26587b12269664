"""#19: an instance's step-time fit is read by GET /pd/info (the event loop) while the
engine thread adds observations; reading it iterated the deque being appended to and
raised "deque mutated during iteration", a 500 that made the front end take a P/D decode
instance out (CPU trace run, session 14). Thread switches forced every microsecond make
the old code fail within a fraction of a second."""

from __future__ import annotations

import sys
import threading
import time

from moska.server.step_model import StepFeatures, StepModel


def test_the_fit_is_read_while_the_engine_thread_observes():
    model = StepModel(window=64)
    for i in range(64):
        model.observe(StepFeatures(prefill_tokens=i % 7, num_decode=i % 5), 0.01 + i * 1e-4)
    stop, errors = threading.Event(), []

    def engine_thread() -> None:
        i = 0
        while not stop.is_set():
            model.observe(StepFeatures(prefill_tokens=i % 9, num_decode=i % 4), 0.01)
            i += 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    feeder = threading.Thread(target=engine_thread, daemon=True)
    feeder.start()
    try:
        end = time.monotonic() + 0.5
        while time.monotonic() < end and not errors:
            model._dirty = True  # a new fit on every read, as after each observation
            try:
                coef = model.coef
            except RuntimeError as exc:
                errors.append(exc)
    finally:
        sys.setswitchinterval(old)
        stop.set()
        feeder.join(5)
    assert not errors, errors
    assert len(coef) == 5 and (coef >= 0).all()
