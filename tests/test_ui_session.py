"""ui/session.py: a session's plan changes compose in the order they were made, and only the latest
computation writes (a slow first recompute finishing after an example pick must not put the default
scenario back: what two browser tests saw on a loaded machine)."""
from ui.session import SessionForms

DEFAULT = {"model": "llama-3.1-8b", "examples": 1000, "name": ""}


def test_a_late_page_load_loses_to_the_example_picked_meanwhile():
    forms = SessionForms(DEFAULT)
    f_load, _, n_load = forms.begin("s1", DEFAULT, lambda b: (dict(DEFAULT), []), reset=True)
    example = {"model": "qwen2.5-7b", "examples": 20000, "name": "Ticket routing"}
    f_ex, extra, n_ex = forms.begin("s1", None, lambda b: (dict(example), ["note"]))
    assert extra == ["note"] and f_ex == example
    # the example's computation finishes first, then the page load's
    assert forms.latest("s1", n_ex)
    assert not forms.latest("s1", n_load)            # the load's outputs are skipped


def test_changes_compose_on_the_latest_form_not_the_state_the_event_started_with():
    forms = SessionForms(DEFAULT)
    forms.begin("s1", DEFAULT, lambda b: (dict(DEFAULT), []), reset=True)
    stale_state = dict(DEFAULT)                      # both edits started before either returned
    forms.begin("s1", stale_state, lambda b: ({**b, "model": "qwen2.5-7b"}, []))
    f2, _, n2 = forms.begin("s1", stale_state, lambda b: ({**b, "examples": 5}, []))
    assert f2 == {"model": "qwen2.5-7b", "examples": 5, "name": ""}   # the first edit is not lost
    assert forms.latest("s1", n2)


def test_sessions_are_separate_bounded_and_no_session_means_the_state_as_before():
    forms = SessionForms(DEFAULT, cap=2)
    forms.begin("a", DEFAULT, lambda b: ({**b, "examples": 1}, []))
    forms.begin("b", DEFAULT, lambda b: ({**b, "examples": 2}, []))
    fa, _, _ = forms.begin("a", DEFAULT, lambda b: ({**b, "name": "x"}, []))
    assert fa["examples"] == 1
    forms.begin("c", DEFAULT, lambda b: (dict(b), []))          # evicts b, the least recently used
    fb, _, nb = forms.begin("b", {"model": "m", "examples": 9, "name": ""}, lambda b: (dict(b), []))
    assert fb["examples"] == 9 and nb == 1                       # forgotten: starts from its page's form
    f, _, n = forms.begin(None, {"model": "m"}, lambda b: ({**b, "examples": 3}, []))
    assert f == {"model": "m", "examples": 3} and forms.latest(None, n)
