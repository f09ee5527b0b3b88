"""Each browser session's wizard form on the server, and which of its plan computations is the latest.

Gradio hands a handler the ``gr.State`` value of the moment its event started, and several plan
handlers of one session can run at once (the page load's first recompute, an example pick, an edit):
whichever finished last wrote the matrix and the form. On a busy machine the page load's recompute,
slow on a cold process, finished after an example picked meanwhile and put the default scenario
back, silently (two browser tests caught it under load). Here every plan handler applies its change
to the session's form under a lock, so changes compose in the order they were made, and gets a
number; when it finishes, only the latest number writes its outputs (the others return
``gr.skip()``), so the page always shows the last change, computed on every change before it.

Without a session (handlers called directly, as the tests do) the form passed in is used as before.
Bounded: the least recently used sessions are forgotten past ``cap`` (their next change starts from
the form their page holds).
"""
from __future__ import annotations

import threading
from collections import OrderedDict


class SessionForms:
    def __init__(self, default: dict, cap: int = 2000):
        self._default = dict(default)
        self._cap = cap
        self._lock = threading.Lock()
        self._forms: OrderedDict[str, tuple[dict, int]] = OrderedDict()

    def begin(self, session: str | None, state_form: dict | None, change, reset: bool = False):
        """Apply ``change(base form) -> (new form, extra outputs)`` to the session's form: the base is
        the session's latest form (``state_form`` when the session is new, has been forgotten, or
        ``reset``: a page load). Returns (new form, extra outputs, this computation's number)."""
        with self._lock:
            known = None if (reset or session is None) else self._forms.get(session)
            base = dict(known[0] if known else (state_form or self._default))
            form, extra = change(base)
            n = (self._forms[session][1] if session in self._forms else 0) + 1 if session else 0
            if session is not None:
                self._forms[session] = (form, n)
                self._forms.move_to_end(session)
                while len(self._forms) > self._cap:
                    self._forms.popitem(last=False)
            return form, extra, n

    def latest(self, session: str | None, n: int) -> bool:
        """Whether computation ``n`` is still the session's latest (no session: always)."""
        if session is None:
            return True
        with self._lock:
            cur = self._forms.get(session)
            return cur is None or cur[1] == n
