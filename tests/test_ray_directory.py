"""The state Ray Serve replicas share (``lora_kit.server.ray_directory``) and the metrics they sum,
as plain objects: no Ray needed (``tests/test_ray_serve.py`` runs them on a real cluster)."""

from __future__ import annotations

from lora_kit.server.metrics import Metrics
from lora_kit.server.ray_directory import AdapterDirectory, sum_stats


def test_the_directory_logs_drops_and_unloads_with_epochs():
    directory = AdapterDirectory()
    assert directory.drop("alpha@1") == 1
    assert directory.unload("beta") == 2
    assert directory.drop("gamma@2") == 3
    assert directory.since(0) == (3, ["alpha@1", "gamma@2"], ["beta"])
    assert directory.since(1) == (3, ["gamma@2"], ["beta"])  # a replica at epoch 1 has applied the first drop
    assert directory.serve("beta") == 4
    assert directory.since(3) == (4, [], [])  # names are a state, not a log: a late replica gets the set
    directory.report("r1", 4, {"running": 1}, "node-a")
    assert directory.replicas()["r1"]["epoch"] == 4 and directory.replicas()["r1"]["node"] == "node-a"


def test_stats_of_replicas_sum_and_resident_adapters_unite():
    one = {"queue_depth": 1, "running": 2, "finished": {"stop": 3}, "resident_adapters": ["a@1"], "slots": 4}
    two = {"queue_depth": 0, "running": 5, "finished": {"stop": 1, "length": 2}, "resident_adapters": ["a@1", "b@1"]}
    two |= {"slots": 4, "prefix_cache": {"hits": 7}}
    assert sum_stats(one, [two]) == {
        "queue_depth": 1,
        "running": 7,
        "finished": {"stop": 4, "length": 2},
        "resident_adapters": ["a@1", "b@1"],
        "slots": 8,
        "prefix_cache": {"hits": 7},
    }


def test_metrics_sum_their_peers_snapshots_into_one_scrape():
    mine, peer = Metrics(), Metrics()
    mine.record_request("openai.chat_completions", "a@1", 200, 0.2)
    peer.record_request("openai.chat_completions", "a@1", 200, 3.0)
    peer.record_request("openai.chat_completions", "b@1", 404, 0.01)
    peer.record_tokens("a@1", prompt_tokens=10, completion_tokens=6)
    summed = Metrics(peers=lambda: [peer.snapshot()])
    summed.record_request("openai.chat_completions", "a@1", 200, 0.2)
    text = summed.render()
    assert 'lora_kit_requests_total{adapter="a@1",route="openai.chat_completions",status="200"} 2' in text
    assert 'lora_kit_requests_total{adapter="b@1",route="openai.chat_completions",status="404"} 1' in text
    assert 'lora_kit_generated_tokens_total{adapter="a@1"} 6' in text
    latency = 'lora_kit_request_duration_seconds_bucket{adapter="a@1",route="openai.chat_completions",le="%s"} %d'
    assert latency % ("0.25", 1) in text and latency % ("5", 2) in text and latency % ("+Inf", 2) in text
    assert 'lora_kit_request_duration_seconds_sum{adapter="a@1",route="openai.chat_completions"} 3.2' in text
    alone = mine.render()  # a process without peers renders its own counts only
    assert 'lora_kit_requests_total{adapter="a@1",route="openai.chat_completions",status="200"} 1' in alone
    assert "b@1" not in alone
