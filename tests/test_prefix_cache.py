"""Prefix caching: a shared system prompt or an earlier chat turn is computed once, per adapter identity.

The store (:class:`PrefixCache`) is tested on its own with small tensors; the engine on the
embedded model in exact fp32, with the cache on against the cache off: the same greedy tokens
and logits within 1e-4, in mixed batches of adapters, the base and a mix, for a 3-turn chat and a
prompt that is all cached prefix.
"""

from __future__ import annotations

import pytest
import torch
from helpers import MODEL, make_embedded_adapter

from lora_kit.engine import AdapterWeight, GenerationRequest, SamplingParams
from lora_kit.engine.prefix_cache import BLOCK_TOKENS, PrefixCache

SYSTEM = (
    "You are the support assistant of a hardware shop. Answer in one short sentence, politely, "
    "and never invent a price. Opening hours are nine to five on weekdays. "
) * 4


# -- the store ------------------------------------------------------------------------------------


def kv_for(ids: list[int], scale: float = 1.0):
    """Fake KV whose every position holds its token id (times ``scale``): (layers 2, 2, heads 1, n, dim 3)."""

    def kv_of(start: int, end: int) -> torch.Tensor:
        col = torch.tensor(ids[start:end], dtype=torch.float32) * scale
        return col.view(1, 1, 1, -1, 1).expand(2, 2, 1, -1, 3).clone()

    return kv_of


BLOCK_BYTES = 2 * 2 * 1 * BLOCK_TOKENS * 3 * 4


def test_blocks_chain_on_their_prefix_and_hold_their_positions():
    cache = PrefixCache(1 << 20)
    a = list(range(100, 140))  # 2 full blocks + 8 tokens
    assert cache.insert(cache.match((), a), a, kv_for(a)) == 2
    hit = cache.match((), a)
    assert hit.tokens == 2 * BLOCK_TOKENS
    got = torch.cat([b.kv for b in hit.blocks], dim=3)[0, 0, 0, :, 0]
    assert got.tolist() == [float(t) for t in a[: 2 * BLOCK_TOKENS]]
    # The same second block after another first block is another block (the key chains).
    b = [7] + a[1:]
    assert cache.match((), b).tokens == 0
    # A longer prompt reuses both; one differing in block 2 reuses block 1 only.
    assert cache.match((), a + [1] * 30).tokens == 2 * BLOCK_TOKENS
    c = a[:20] + [0] * 20
    assert cache.match((), c).tokens == BLOCK_TOKENS
    assert cache.insert(cache.match((), c), c, kv_for(c)) == 1
    assert cache.stats().blocks == 3 and cache.stats().bytes == 3 * BLOCK_BYTES


def test_an_identity_sees_only_its_own_blocks():
    cache = PrefixCache(1 << 20)
    ids = list(range(48))
    alpha, beta, mix = (("alpha@1", None),), (("beta@1", None),), (("alpha@1", 0.5), ("beta@1", 0.5))
    cache.insert(cache.match(alpha, ids), ids, kv_for(ids))
    assert cache.match(alpha, ids).tokens == 48
    for other in ((), beta, mix, (("alpha@1", 0.5),), (("alpha@2", None),)):
        assert cache.match(other, ids).tokens == 0, other


def test_dropping_an_adapter_drops_every_identity_naming_it():
    cache = PrefixCache(1 << 20)
    ids = list(range(32))
    alpha, beta, mix = (("alpha@1", None),), (("beta@1", None),), (("alpha@1", 0.5), ("beta@1", 0.5))
    for identity in ((), alpha, beta, mix):
        cache.insert(cache.match(identity, ids), ids, kv_for(ids))
    assert cache.drop_adapter("alpha@1") == 4  # alpha's 2 blocks and the mix's 2
    assert cache.match(alpha, ids).tokens == 0 and cache.match(mix, ids).tokens == 0
    assert cache.match((), ids).tokens == 32 and cache.match(beta, ids).tokens == 32
    assert cache.stats().bytes == 4 * BLOCK_BYTES


def test_the_budget_holds_under_a_stream_of_distinct_prompts_and_evicts_leaves_first():
    cache = PrefixCache(5 * BLOCK_BYTES)
    for n in range(40):
        ids = [n] * (3 * BLOCK_TOKENS)
        cache.insert(cache.match((), ids), ids, kv_for(ids))
        assert cache.stats().bytes <= 5 * BLOCK_BYTES
        assert cache.match((), ids).tokens == 3 * BLOCK_TOKENS  # the newest chain is whole
    assert cache.stats().evicted_blocks > 0
    # The older chain kept its start: evicting a leaf first leaves a usable prefix.
    assert cache.match((), [38] * (3 * BLOCK_TOKENS)).tokens == 2 * BLOCK_TOKENS


def test_a_chain_longer_than_the_budget_keeps_its_start_and_never_evicts_itself():
    cache = PrefixCache(3 * BLOCK_BYTES)
    ids = list(range(10 * BLOCK_TOKENS))
    assert cache.insert(cache.match((), ids), ids, kv_for(ids)) == 3
    assert cache.match((), ids).tokens == 3 * BLOCK_TOKENS
    assert PrefixCache(BLOCK_BYTES - 1).insert(cache.match((), ids), ids, kv_for(ids)) == 0  # no block fits
    off = PrefixCache(0)
    assert not off.enabled and off.insert(off.match((), ids), ids, kv_for(ids)) == 0


def test_a_block_dropped_between_lookup_and_insert_is_not_chained_to():
    cache = PrefixCache(1 << 20)
    alpha = (("alpha@1", None),)
    ids = list(range(64))
    cache.insert(cache.match(alpha, ids[:32]), ids[:32], kv_for(ids))
    match = cache.match(alpha, ids)
    assert match.tokens == 32
    cache.drop_adapter("alpha@1")  # a runtime unload from another thread
    assert cache.insert(match, ids, kv_for(ids)) == 0
    assert cache.stats().blocks == 0


# -- the engine, embedded model, exact fp32 --------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-adapters")
    return {name: make_embedded_adapter(root / name, seed) for seed, name in enumerate(("a", "b", "c"), start=1)}


def make_engine(adapters, **settings):
    from lora_kit import models
    from lora_kit.engine import Engine, EngineConfig, mapping_resolver

    model, tokenizer = models.load(MODEL, quantization="none")
    config = EngineConfig(MODEL, weight_dtype="float32", max_slots=4, **settings)
    return Engine(config, model=model, tokenizer=tokenizer, adapter_resolver=mapping_resolver(adapters))


@pytest.fixture(scope="module")
def cached(adapters):
    eng = make_engine(adapters)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def uncached(adapters):
    eng = make_engine(adapters, prefix_cache_mib=0)
    yield eng
    eng.stop()


def chat_ids(eng, messages: list[dict]) -> list[int]:
    return list(
        eng.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    )


def ask(eng, question: str) -> list[int]:
    return chat_ids(eng, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


def request(ids, adapter, max_tokens=8):
    return GenerationRequest(
        prompt_ids=ids, params=SamplingParams(max_tokens=max_tokens, temperature=0), adapter=adapter
    )


def run_batch(eng, requests):
    """Run ``requests`` in one batch; their token ids and the logits each token was drawn from."""
    eng.stop()
    with eng.recording_logits() as seen:
        seqs = [eng.submit(r) for r in requests]
        eng.start()
        outs = [eng.result(s) for s in seqs]
    return [o.token_ids for o in outs], [torch.stack(seen[s.request_id]) for s in seqs]


# Logits may differ by fp32 rounding: a row's products run in other shapes with a cached prefix (the
# rest of its prompt only). The uncached engine itself differs by up to 3e-4 (logits ~30) between
# a row prefilled alone and in a batch of five (measured on the embedded model), so 1e-4 would fail
# the uncached path against itself; 1e-3 is that noise with margin, far below a real error.
LOGITS_ATOL = 1e-3


def assert_same(got, want):
    tokens, logits = got
    want_tokens, want_logits = want
    assert tokens == want_tokens
    for mine, theirs in zip(logits, want_logits):
        assert torch.allclose(mine, theirs, atol=LOGITS_ATOL, rtol=0), (mine - theirs).abs().max()


MIX = [AdapterWeight("a", 0.7), AdapterWeight("b", 0.6)]
MIXED = [None, "a", "b", "c", MIX]
QUESTIONS = ["Do you sell drills?", "When do you open?", "Can I return a saw?", "Where are you?", "Hi!"]


def test_a_shared_system_prompt_in_a_mixed_batch_equals_the_uncached_path(cached, uncached):
    reqs = lambda eng: [request(ask(eng, q), lora) for q, lora in zip(QUESTIONS, MIXED)]  # noqa: E731
    want = run_batch(uncached, reqs(uncached))
    before = cached.stats()["prefix_cache"]
    cold = run_batch(cached, reqs(cached))  # one batch: each identity's first row computes it
    warm = run_batch(cached, reqs(cached))  # again: every row starts after the cached system prompt
    assert_same(cold, want)
    assert_same(warm, want)
    stats = cached.stats()["prefix_cache"]
    system_blocks = len(ask(cached, "")) // BLOCK_TOKENS - 1
    assert stats["hits"] - before["hits"] >= len(MIXED)  # the warm batch, every row
    assert stats["tokens_reused"] - before["tokens_reused"] >= len(MIXED) * system_blocks * BLOCK_TOKENS


def test_isolation_a_prefix_cached_for_one_adapter_serves_no_other(cached, uncached):
    system = "You answer questions about a bakery, briefly. " * 8  # seen by no other test
    ids = chat_ids(cached, [{"role": "system", "content": system}, {"role": "user", "content": "Open on Sunday?"}])
    run_batch(cached, [request(ids, "a")])
    before = cached.stats()["prefix_cache"]
    got = run_batch(cached, [request(ids, "b")])
    after = cached.stats()["prefix_cache"]
    assert after["hits"] == before["hits"] and after["tokens_reused"] == before["tokens_reused"]
    got_base = run_batch(cached, [request(ids, None)])
    assert cached.stats()["prefix_cache"]["tokens_reused"] == after["tokens_reused"]
    assert_same(got, run_batch(uncached, [request(ids, "b")]))
    assert_same(got_base, run_batch(uncached, [request(ids, None)]))
    # ... and with a hit its own adapter does reuse it.
    run_batch(cached, [request(ids, "a")])
    assert cached.stats()["prefix_cache"]["tokens_reused"] > after["tokens_reused"]


def test_a_three_turn_chat_reuses_its_earlier_turns(cached, uncached):
    history = [{"role": "system", "content": SYSTEM}]
    prompt_before: list[int] = []
    for question in ["Do you sell hammers?", "How heavy are they?", "Thanks, bye."]:
        history.append({"role": "user", "content": question})
        ids = chat_ids(cached, history)
        before = cached.stats()["prefix_cache"]["tokens_reused"]
        got = run_batch(cached, [request(ids, "c", max_tokens=10)])
        reused = cached.stats()["prefix_cache"]["tokens_reused"] - before
        assert_same(got, run_batch(uncached, [request(ids, "c", max_tokens=10)]))
        if prompt_before:  # the turns before were a prompt already: at most a block and the new text are computed
            assert reused >= len(prompt_before) // BLOCK_TOKENS * BLOCK_TOKENS
        prompt_before = ids
        history.append({"role": "assistant", "content": cached.tokenizer.decode(got[0][0], skip_special_tokens=True)})


def test_what_a_request_generated_is_cached_for_the_next_turn(cached, uncached):
    ids = ask(cached, "Tell me about your saws, at length.")
    first = run_batch(cached, [request(ids, "b", max_tokens=40)])
    reply = first[0][0]
    assert len(reply) == 40
    follow_up = ids + reply + ask(cached, "And hammers?")[-12:]  # the reply's tokens as the next turn sends them
    before = cached.stats()["prefix_cache"]["tokens_reused"]
    got = run_batch(cached, [request(follow_up, "b")])
    # Everything fed before the request finished (the prompt and 39 generated tokens), in full blocks.
    assert cached.stats()["prefix_cache"]["tokens_reused"] - before == (len(ids) + 39) // BLOCK_TOKENS * BLOCK_TOKENS
    assert_same(got, run_batch(uncached, [request(follow_up, "b")]))


def test_a_prompt_that_is_all_cached_prefix(cached, uncached):
    ids = ask(cached, "Any drills?")
    ids = ids[: len(ids) // BLOCK_TOKENS * BLOCK_TOKENS]  # whole blocks only
    run_batch(cached, [request(ids, "a")])
    before = cached.stats()["prefix_cache"]["tokens_reused"]
    got = run_batch(cached, [request(ids, "a")])
    assert cached.stats()["prefix_cache"]["tokens_reused"] - before == len(ids) - 1  # the last is always computed
    assert_same(got, run_batch(uncached, [request(ids, "a")]))


def test_rows_with_and_without_hits_prefill_together(cached, uncached):
    warm_ids = ask(cached, "What is a chisel?")
    run_batch(cached, [request(warm_ids, "b")])
    reqs = [
        request(warm_ids, "b"),
        request(ask(cached, "Totally different?")[::-1], "b"),  # no shared prefix
        request(warm_ids[:40], None),
    ]
    assert_same(run_batch(cached, reqs), run_batch(uncached, reqs))


def test_a_runtime_unload_drops_the_adapters_blocks(adapters):
    eng = make_engine(adapters)
    try:
        ids = ask(eng, "Hello?")
        run_batch(eng, [request(ids, "a"), request(ids, None), request(ids, [AdapterWeight("a", 0.5)])])
        mix = (("a", 0.5),)
        held = eng.prefix_cache.held()
        assert held[()] >= len(ids) // BLOCK_TOKENS and held[(("a", None),)] >= len(ids) // BLOCK_TOKENS
        assert held[mix] >= len(ids) // BLOCK_TOKENS
        assert eng.drop_adapter("a")  # idle: unloaded now, and every identity naming it with it
        assert eng.prefix_cache.held() == {(): held[()]}
        assert eng.prefix_cache.match((("a", None),), ids).tokens == 0
    finally:
        eng.stop()


def test_the_engine_keeps_to_its_budget(adapters):
    eng = make_engine(adapters, prefix_cache_mib=4)
    try:
        for n in range(6):
            run_batch(eng, [request(ask(eng, f"Question number {n}?")[::-1], None, max_tokens=2)])
            stats = eng.stats()["prefix_cache"]
            assert stats["budget_bytes"] == 4 << 20 and 0 < stats["bytes"] <= 4 << 20
        assert stats["evicted_blocks"] > 0
    finally:
        eng.stop()


def test_rows_arriving_together_compute_a_shared_prefix_once(cached, uncached):
    system = "You only talk about garden tools, in few words. " * 8  # seen by no other test
    reqs = lambda eng: [  # noqa: E731
        request(chat_ids(eng, [{"role": "system", "content": system}, {"role": "user", "content": q}]), lora)
        for q, lora in zip(QUESTIONS, [None, None, "a", None, "a"])
    ]
    want = run_batch(uncached, reqs(uncached))
    before = cached.stats()["prefix_cache"]
    got = run_batch(cached, reqs(cached))  # cold: the first base row and the first "a" row go first
    after = cached.stats()["prefix_cache"]
    assert_same(got, want)
    assert after["hits"] - before["hits"] == 3  # the second and third base rows, the second "a" row
    shared = len(chat_ids(cached, [{"role": "system", "content": system}])) // BLOCK_TOKENS * BLOCK_TOKENS
    assert after["tokens_reused"] - before["tokens_reused"] >= 3 * (shared - BLOCK_TOKENS)


# -- the tiny Mistral: both LoRA paths, and a sliding window ------------------------------------------


@pytest.mark.parametrize(
    ("backend", "kv_dtype"),
    [(None, "float32"), ("torch", "float32"), (None, "bfloat16")],
    ids=["cpu", "torch", "bf16-kv"],
)
def test_both_lora_paths_on_the_tiny_mistral(tiny_mistral_dir, word_tokenizer, tmp_path, backend, kv_dtype):
    """Cached and uncached prefills give the same answers, on both LoRA paths, and with a 16-bit KV
    cache, whose blocks are stored in its dtype (a cold prefill attends over its own positions
    unrounded, a later prompt over the cached blocks' rounded values: within the logits' bound here)."""
    from helpers import MISTRAL_ADAPTERS, make_peft_init_adapter, mistral_engine

    adapters = {
        name: make_peft_init_adapter(tiny_mistral_dir, tmp_path / name, t, r, a, rs, seed=i + 1)
        for i, (name, (t, r, a, rs)) in enumerate(MISTRAL_ADAPTERS.items())
    }
    words = word_tokenizer.encode("You are terse . What is two plus two ? Four .", add_special_tokens=False)
    prefix = [word_tokenizer.bos_token_id] + words * 8
    reqs = [request(prefix + words[: 3 + i], lora, 6) for i, lora in enumerate([None, "all", "qv", "mlp", None])]
    engines = [
        mistral_engine(tiny_mistral_dir, word_tokenizer, adapters, backend, prefix_cache_mib=m, kv_dtype=kv_dtype)
        for m in (0, 64)
    ]
    try:
        want = run_batch(engines[0], reqs)
        for _ in range(2):  # cold (in waves for the two base rows), then warm
            assert_same(run_batch(engines[1], reqs), want)
        assert engines[1].stats()["prefix_cache"]["hits"] >= len(reqs) + 1
        blocks = list(engines[1].prefix_cache._blocks.values())
        assert blocks and all(b.kv.dtype == getattr(torch, kv_dtype) for b in blocks)
    finally:
        for eng in engines:
            eng.stop()


def test_a_sliding_window_the_rows_could_outgrow_turns_the_cache_off_for_them(tiny_mistral_dir, word_tokenizer):
    from helpers import mistral_engine

    eng = mistral_engine(tiny_mistral_dir, word_tokenizer, {}, prefix_cache_mib=64)
    try:
        eng.model.config.sliding_window = 48
        eng._runner._window = 48
        ids = [word_tokenizer.bos_token_id] + [5 + n % 20 for n in range(40)]  # 41 tokens: 2 full blocks
        run_batch(eng, [request(ids, None, 4)])
        run_batch(eng, [request(ids, None, 4)])  # 41 + 4 columns fit the window: a hit
        assert eng.stats()["prefix_cache"]["tokens_reused"] == 32
        run_batch(eng, [request(ids, None, 10)])  # 41 + 10 would not: computed whole
        assert eng.stats()["prefix_cache"]["tokens_reused"] == 32
    finally:
        eng.stop()
