"""``lora-kit serve --replicas 2``: two engine replicas, each serving the HTTP app behind Ray's proxy,
on a real two-node Ray cluster.

The cluster is simulated on this machine with Ray's own ``ray.cluster_utils.Cluster``: a head
node and a second node, each with one CPU (separate raylets and object stores), so the two
1-CPU replicas must land on different nodes; the registry is shared by path (one LORA_KIT_HOME),
as on a real cluster's shared volume. The CLI runs in its own process and joins the cluster
(``--ray-address``, HTTP proxy on the head only: both nodes share this host's ports), with the
embedded model, two random PEFT adapters and a bearer token; this test joins the cluster only to
read the adapter directory and to kill a replica. References come from a single-process engine
over the same registry.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[dev]')")

from helpers import ACCOUNT, MODEL, QUESTION, RUN, make_embedded_adapter, sse_payloads  # noqa: E402

TOKEN = "ray-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MIX = [{"name": "alpha", "scale": 0.5}, {"name": "beta", "scale": 0.5}]
SPREAD = "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reference_answers(registry_root) -> dict:
    """Greedy answers (6 tokens) of a single-process engine over the same registry."""
    from lora_kit import chat
    from lora_kit.engine import AdapterWeight, Engine, EngineConfig, GenerationRequest, SamplingParams

    engine = Engine(EngineConfig(MODEL, max_slots=4, weight_dtype="float32"), registry_root=registry_root)
    ids = chat.render(engine.tokenizer, QUESTION, add_generation_prompt=True).input_ids
    mix = [AdapterWeight("alpha@1", 0.5), AdapterWeight("beta@1", 0.5)]
    try:
        return {
            lora if isinstance(lora, str) or lora is None else "mix": engine.generate_sync(
                GenerationRequest(ids, SamplingParams(max_tokens=6), adapter=lora)
            ).text
            for lora in (None, "alpha", "beta", mix)
        }
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from lora_kit import paths
    from lora_kit.registry import Registry

    root = tmp_path_factory.mktemp("ray")
    home = root / "home"
    home.mkdir()
    (home / "models").symlink_to(paths.models_dir())
    (home / "kernels").symlink_to(paths.kernels_dir())
    registry = Registry(home / "registry")
    for name, seed in (("alpha", 1), ("beta", 2)):
        registry.register(make_embedded_adapter(root / name, seed), name, base_model=MODEL)
    want = reference_answers(registry.root)
    port = free_port()
    env = {**os.environ, "LORA_KIT_HOME": str(home), "LORA_KIT_API_TOKEN": TOKEN, "RAY_USAGE_STATS_ENABLED": "0"}
    nodes = two_nodes()
    command = ["serve", "--replicas", "2", "--replica-cpus", "1", "--slots", "4", "--port", str(port)]
    command += ["--ray-address", nodes.address, "--proxy-location", "HeadOnly"]
    command += ["--adapter-root", str(root)]  # the runtime load's lora_path lies under it
    # Exact fp32 on every CPU, as the reference: answers are compared token for token, which the
    # 16-bit weights `auto` picks on an AMX CPU do not promise across batches or cached prefixes.
    command += ["--weight-dtype", "float32"]
    log = (root / "serve.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_kit", *command],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: "serving" in (root / "serve.log").read_text() or proc.poll() is not None, 300)
        assert proc.poll() is None, (root / "serve.log").read_text()[-3000:]
        import ray

        ray.init(address=nodes.address, namespace="lora-kit", log_to_driver=False)
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as http:
            yield {"url": url, "http": http, "want": want, "root": root, "registry": registry, "proc": proc}
        ray.shutdown()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (root / "serve.log").read_text()[-3000:]
        assert "server stopped" in (root / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        nodes.shutdown()


def two_nodes():
    """A Ray cluster of two nodes on this host, one CPU each (Ray's own test cluster).

    Its one HTTP proxy (on the head) is told not to prefer its own node's replicas: on a real
    cluster a load balancer spreads clients over every node's proxy; with one proxy, Ray's
    default would keep every request without a routing header on the head node's replica until
    it is full (README: Scaling out)."""
    from ray.cluster_utils import Cluster

    settings = {"num_cpus": 1, "object_store_memory": 100 << 20, "include_dashboard": False}
    saved = os.environ.get(SPREAD)
    os.environ[SPREAD] = "0"  # read by the proxy, which inherits the raylets' environment
    try:
        nodes = Cluster(initialize_head=True, head_node_args=settings)
        nodes.add_node(**{k: v for k, v in settings.items() if k != "include_dashboard"})
    finally:
        if saved is None:
            os.environ.pop(SPREAD)
        else:
            os.environ[SPREAD] = saved
    nodes.wait_for_nodes()
    return nodes


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def ask(http, lora, **extra):
    return http.post(RUN + MODEL, json={**body_for(lora), **extra})


def replica_reports() -> dict:
    import ray

    from lora_kit.server.ray_app import directory_actor

    return ray.get(directory_actor().replicas.remote())


def test_answers_equal_the_single_process_and_adapters_stick_to_a_replica(cluster):
    http, want = cluster["http"], cluster["want"]
    for lora in ("alpha", "beta"):
        assert ask(http, lora).status_code == 200  # loads it on some replica
    wait_for(lambda: len(replica_reports()) == 2, 60)  # both replicas report to the directory
    seen: dict[str, set] = {"alpha": set(), "beta": set()}
    for _ in range(20):  # Ray's router learns where each adapter lives within seconds
        last = {lora: ask(http, lora).headers["x-lora-kit-replica"] for lora in seen}
        if all(seen[lora] == {last[lora]} for lora in seen):
            break
        seen = {lora: {last[lora]} for lora in seen}
        time.sleep(1)
    for _ in range(3):
        for lora in ("alpha", "beta"):
            resp = ask(http, lora)
            assert resp.json()["result"]["response"] == want[lora]
            assert {resp.headers["x-lora-kit-replica"]} == seen[lora]  # affinity holds
    base = ask(http, None)
    assert base.json()["result"]["response"] == want[None] and base.headers["x-lora-kit-replica"]
    assert ask(http, MIX).json()["result"]["response"] == want["mix"]
    resident = [set(r["stats"]["resident_adapters"]) for r in replica_reports().values()]
    assert any("alpha@1" in r for r in resident) and any("beta@1" in r for r in resident)
    # /metrics on whichever replica answers sums every replica's counts (each reports twice a second)
    line = 'lora_kit_requests_total{adapter="alpha@1",route="cloudflare.run",status="200"}'
    wait_for(lambda: any(m.startswith(line) and float(m.split()[-1]) >= 5 for m in metric_lines(http)), 60)


def metric_lines(http) -> list[str]:
    return http.get("/metrics").text.splitlines()


def test_the_routing_header_runs_a_request_where_its_adapter_is(cluster):
    """Ray's proxy routes on ``serve_multiplexed_model_id`` by itself: one hop to the replica
    holding the adapter. The header must name the request's adapter."""
    from openai import OpenAI

    http, want = cluster["http"], cluster["want"]
    header = {"serve_multiplexed_model_id": "alpha"}
    first = http.post(RUN + MODEL, json=body_for("alpha"), headers=header)
    assert first.status_code == 200 and first.json()["result"]["response"] == want["alpha"]
    seen = set()
    for _ in range(20):  # the replica that loaded "alpha" tells Ray's router within a second or two
        replicas = {http.post(RUN + MODEL, json=body_for("alpha"), headers=header).headers["x-lora-kit-replica"]}
        replicas |= {http.post(RUN + MODEL, json=body_for("alpha"), headers=header).headers["x-lora-kit-replica"]}
        if len(replicas) == 1 and replicas == seen:
            break
        seen = replicas
        time.sleep(1)
    assert len(seen) == 1
    oa = OpenAI(base_url=cluster["url"] + "/v1", api_key=TOKEN, max_retries=0, default_headers=header)
    chat = oa.chat.completions.with_raw_response.create(model="alpha", messages=QUESTION, max_tokens=6, temperature=0)
    assert chat.parse().choices[0].message.content == want["alpha"]
    assert {chat.headers["x-lora-kit-replica"]} == seen
    for lora in ("beta", None):  # the header names another adapter than the body: 400, never a guess
        wrong = http.post(RUN + MODEL, json=body_for(lora), headers=header)
        assert wrong.status_code == 400, wrong.text
        assert "serve_multiplexed_model_id" in wrong.json()["errors"][0]["message"]
    assert http.post(RUN + MODEL, json=body_for("nope"), headers=header).json()["errors"][0]["code"] == 3037
    unknown = http.post(RUN + MODEL, json=body_for("alpha"), headers={"serve_multiplexed_model_id": "nope"})
    assert unknown.status_code == 400 and "nope" not in unknown.text


def body_for(lora, max_tokens: int = 6) -> dict:
    return {"messages": QUESTION, "max_tokens": max_tokens, "temperature": 0, **({"lora": lora} if lora else {})}


def test_replicas_on_both_nodes_serve_requests(cluster):
    http = cluster["http"]
    wait_for(lambda: len(replica_reports()) == 2, 60)
    nodes = {replica: report["node"] for replica, report in replica_reports().items()}
    assert len(set(nodes.values())) == 2, nodes  # one replica per node: each node has one CPU
    body = {"messages": QUESTION, "max_tokens": 48, "ignore_eos": True, "temperature": 0}
    seen: set = set()
    for _ in range(3):  # base requests have no affinity: Ray spreads them by load (randomly on ties)
        with ThreadPoolExecutor(8) as pool:
            served = list(pool.map(lambda _: http.post(RUN + MODEL, json=body), range(8)))
        assert all(r.status_code == 200 for r in served)
        seen |= {nodes[r.headers["x-lora-kit-replica"]] for r in served}
        if seen == set(nodes.values()):
            break
    assert seen == set(nodes.values())


def test_sdks_stream_through_ray_and_unknown_adapters_are_404(cluster):
    import cloudflare
    from openai import OpenAI

    cf = cloudflare.Cloudflare(api_token=TOKEN, base_url=cluster["url"] + "/client/v4", max_retries=0)
    with pytest.raises(cloudflare.NotFoundError) as err:
        cf.ai.run(MODEL, account_id=ACCOUNT, messages=QUESTION, max_tokens=4, lora="nope")
    assert err.value.body["errors"][0]["code"] == 3037
    with cf.ai.with_streaming_response.run(
        MODEL, account_id=ACCOUNT, messages=QUESTION, max_tokens=6, temperature=0, lora="beta", stream=True
    ) as resp:
        events = sse_payloads(resp.read().decode())
    assert "".join(e["response"] for e in events if isinstance(e, dict)) == cluster["want"]["beta"]
    oa = OpenAI(base_url=cluster["url"] + "/v1", api_key=TOKEN, max_retries=0)
    chunks = oa.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=6, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == cluster["want"]["alpha"]


def test_runtime_load_and_unload_reach_every_replica(cluster):
    http = cluster["http"]
    gamma = make_embedded_adapter(cluster["root"] / "gamma", 3)
    body = {"lora_name": "gamma", "lora_path": str(gamma)}
    with httpx.Client(base_url=cluster["url"], timeout=60) as anonymous:
        assert anonymous.post("/v1/load_lora_adapter", json=body).status_code == 401
        assert anonymous.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 401
    assert http.post("/v1/load_lora_adapter", json=body).status_code == 200
    answers = {ask(http, "gamma").json()["result"]["response"] for _ in range(2)}
    assert len(answers) == 1 and [v.ref for v in cluster["registry"].list() if v.name == "gamma"] == ["gamma@1"]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 200
    with ThreadPoolExecutor(8) as pool:  # Ray spreads them over both replicas: each refuses the name
        gone = list(pool.map(lambda _: ask(http, "gamma"), range(8)))
    assert all(r.status_code == 404 and r.json()["errors"][0]["code"] == 3037 for r in gone)
    assert "gamma" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    for report in replica_reports().values():  # every replica has freed the slot
        assert "gamma@1" not in report["stats"]["resident_adapters"]
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "gamma"}).status_code == 200
    assert ask(http, "gamma").json()["result"]["response"] in answers


def test_a_killed_replica_fails_only_its_requests_and_others_carry_on(cluster):
    """A stream on the killed replica breaks off (its HTTP response ends unfinished: Ray's proxy
    loses the replica that was writing it); a stream on the other replica finishes whole."""
    import ray

    http = cluster["http"]
    doomed_body = {**body_for("beta", max_tokens=4000), "ignore_eos": True, "stream": True}
    survivor_body = {**body_for(None, max_tokens=64), "ignore_eos": True, "stream": True}
    lines: list[str] = []
    broken: list[Exception] = []
    with contextlib.ExitStack() as streams:
        doomed = streams.enter_context(
            http.stream("POST", RUN + MODEL, json=doomed_body, headers={"serve_multiplexed_model_id": "beta"})
        )
        replica = doomed.headers["x-lora-kit-replica"]
        events = doomed.iter_lines()
        while len([line for line in lines if line]) < 3:
            lines.append(next(events))
        survivor = None
        for _ in range(12):  # base requests go to either replica: keep one running on the other
            opened = streams.enter_context(http.stream("POST", RUN + MODEL, json=survivor_body))
            if opened.headers["x-lora-kit-replica"] != replica:
                survivor = opened
                break
        assert survivor is not None, "no base request reached the other replica"
        named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("#" + replica)]
        assert len(named) == 1, named
        ray.kill(ray.get_actor(named[0]["name"], namespace=named[0]["namespace"]), no_restart=True)

        def drain() -> None:
            try:
                lines.extend(events)
            except httpx.TransportError as err:  # the response ended before its last chunk
                broken.append(err)

        reader = threading.Thread(target=drain)
        reader.start()
        reader.join(60)
        assert not reader.is_alive(), "the stream hung after its replica died"
        survived = sse_payloads("\n".join(survivor.iter_lines()) + "\n")
    doomed_events = sse_payloads("\n".join(lines) + "\n")
    assert "[DONE]" not in doomed_events
    if not broken:  # relayed through the other replica: it says so in the stream, naming only the request id
        assert (
            doomed_events[-1]["errors"][0]["code"] == 3001 and "request id" in doomed_events[-1]["errors"][0]["message"]
        )
    assert survived[-1] == "[DONE]" and sum(1 for e in survived if isinstance(e, dict) and "response" in e) >= 32
    for lora in ("beta", "alpha", None):  # the next requests go to a live replica
        resp = ask(http, lora)
        assert resp.status_code == 200 and resp.json()["result"]["response"] == cluster["want"][lora]
