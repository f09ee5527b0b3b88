"""Cost arithmetic, checked against figures computed by hand from the hardware presets."""
import pytest

from engine.errors import InputError
from engine.estimate import cost
from engine.hardware import get


def test_prices_come_from_the_presets():
    assert cost.price("h100-80gb")[0] == get("h100-80gb").price_per_hour == 2.99
    usd, why = cost.price("iphone-15-pro-8gb")
    assert usd is None and "no hourly price" in why


def test_train_cost_by_hand():
    # 1e9 tokens at 5000 tokens/s on 8 x H100 (2.99 USD/h): 200000 s -> 444.44 GPU-hours -> 1328.89 USD
    r = cost.train_cost(1e9, 5000, "h100-80gb", gpu_count=8)
    assert r["seconds"] == pytest.approx(200_000)
    assert r["gpu_hours"] == pytest.approx(200_000 / 3600 * 8)
    assert r["usd"] == pytest.approx(200_000 / 3600 * 8 * 2.99)
    assert "5000 tokens/s" in r["formula"] and "2.99 USD/h" in r["formula"]
    assert cost.train_cost(0, 100, "t4-16gb")["usd"] == 0


def test_calibration_and_eval_cost_by_hand():
    r = cost.calibration_cost(900, "rtx-4090-24gb")            # 15 min at 0.34 USD/h
    assert r["gpu_hours"] == pytest.approx(0.25) and r["usd"] == pytest.approx(0.085) and r["what"] == "calibration"
    e = cost.eval_cost(7200, "a100-80gb", gpu_count=2)         # 2 h on 2 x 1.79
    assert e["gpu_hours"] == pytest.approx(4) and e["usd"] == pytest.approx(7.16)


def test_device_without_price():
    r = cost.eval_cost(60, "jetson-orin-nano-8gb")
    assert r["usd"] is None and r["gpu_hours"] == pytest.approx(60 / 3600) and "no hourly price" in r["reason"]
    s = cost.serving_cost(20, 1, "pixel-8-pro-12gb")
    assert s["usd_per_million_tokens"] is None and s["tokens_per_s"] == 20 and s["reason"]


def test_serving_cost_by_hand_single_speed():
    # batch 16 at 50 tokens/s each on an L4 (0.80 USD/h): 800 tokens/s -> 0.80 / (800*3600) * 1e6
    r = cost.serving_cost(50, 16, "l4-24gb")
    assert r["tokens_per_s"] == 800 and r["latency_ms_per_token"] == pytest.approx(20)
    assert r["usd_per_million_tokens"] == pytest.approx(0.80 / (800 * 3600) * 1e6)
    assert r["feasible_at_latency"] is None
    assert cost.serving_cost(50, 16, "l4-24gb", max_latency_ms_per_token=25)["feasible_at_latency"] is True
    slow = cost.serving_cost(50, 16, "l4-24gb", max_latency_ms_per_token=10)
    assert slow["feasible_at_latency"] is False and "no batch" in slow["why_batch"]


def test_serving_cost_largest_batch_meeting_latency():
    # per-sequence speed falls with batch: 10 ms, 12.5 ms, 25 ms per token; goal 20 ms -> batch 8
    sweep = {1: 100.0, 8: 80.0, 32: 40.0}
    r = cost.serving_cost(sweep, 32, "rtx-4090-24gb", max_latency_ms_per_token=20)
    assert r["batch_size"] == 8 and r["tokens_per_s"] == 640 and r["feasible_at_latency"] is True
    assert r["usd_per_million_tokens"] == pytest.approx(0.34 / (640 * 3600) * 1e6)     # 0.1476
    assert round(r["usd_per_million_tokens"], 4) == 0.1476
    # no latency goal: the largest batch allowed
    assert cost.serving_cost(sweep, 32, "rtx-4090-24gb")["tokens_per_s"] == 32 * 40
    # batch_size caps the sweep; JSON-style string keys work
    assert cost.serving_cost({"1": 100, "8": 80}, 4, "rtx-4090-24gb")["batch_size"] == 1
    # a looser goal buys a cheaper token
    loose = cost.serving_cost(sweep, 32, "rtx-4090-24gb", max_latency_ms_per_token=30)
    assert loose["batch_size"] == 32 and loose["usd_per_million_tokens"] < r["usd_per_million_tokens"]


@pytest.mark.parametrize("call,field", [
    (lambda: cost.train_cost(-1, 10, "t4-16gb"), "tokens"),
    (lambda: cost.train_cost(10, 0, "t4-16gb"), "tokens_per_s"),
    (lambda: cost.train_cost(10, 10, "t4-16gb", gpu_count=0), "gpu_count"),
    (lambda: cost.train_cost(10, 10, "t4-16gb", gpu_count=1.5), "gpu_count"),
    (lambda: cost.train_cost(10, 10, "no-such-gpu"), "gpu"),
    (lambda: cost.eval_cost("long", "t4-16gb"), "seconds"),
    (lambda: cost.serving_cost(0, 1, "t4-16gb"), "decode_tokens_per_s_per_sequence"),
    (lambda: cost.serving_cost(10, 0, "t4-16gb"), "batch_size"),
    (lambda: cost.serving_cost({64: 10}, 8, "t4-16gb"), "batch_size"),
    (lambda: cost.serving_cost(10, 1, "t4-16gb", max_latency_ms_per_token=-5), "max_latency_ms_per_token"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(InputError) as e:
        call()
    assert e.value.field == field
