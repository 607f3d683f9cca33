"""The worker engine on the real SmolLM2 model: our paged-KV runner against transformers' generate."""
from __future__ import annotations

import pytest
import torch

from services.common.attention_pairs import prefill_pairs
from services.worker.config import WorkerConfig
from services.worker.engine import Engine, PreemptMode
from services.worker.factory import build_engine
from services.worker.sequence import Finish, Sampling, SeqStatus
from tests.helpers import hf_greedy, hf_greedy_ids

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three colours:",
]


def make_engine(model_dir, **overrides) -> Engine:
    cfg = dict(model_dir=str(model_dir), num_blocks=128, num_host_blocks=64, max_batch=16, token_budget=256)
    return build_engine(WorkerConfig(**{**cfg, **overrides}))


def run_to_end(engine: Engine, max_steps: int = 10_000, on_step=lambda out: None) -> dict[str, tuple[list[int], str, Finish]]:
    tokens: dict[str, list[int]] = {}
    texts: dict[str, str] = {}
    done = {}
    for _ in range(max_steps):
        if not engine.has_work:
            break
        out = engine.step()
        on_step(out)
        for d in out.deltas:
            tokens.setdefault(d.job_id, []).extend(d.token_ids)
            texts[d.job_id] = texts.get(d.job_id, "") + d.text
        for job_id, finish in out.finished:
            done[job_id] = (tokens[job_id], texts[job_id], finish)
    return done


@pytest.fixture(scope="module")
def references(hf_model, tokenizer):
    return {p: hf_greedy(hf_model, tokenizer, p, 24) for p in PROMPTS}


@pytest.fixture(scope="module")
def shared_engine(model_dir):
    return make_engine(model_dir)


@pytest.fixture(params=[False, True], ids=["serial", "overlap"])
def engine(shared_engine, request):
    """The module's engine, emptied before each test: a test that failed or timed out half-way must not
    leave jobs, KV blocks or cached prefixes behind for the next one. Each test runs with steps serial and overlapped (the
    GPU's mode: a step's tokens are collected while the next one runs; on CPU the order of work is the
    same, so tokens must be too)."""
    shared_engine.reset()             # jobs, the step in flight and the prefix cache
    assert shared_engine.blocks.num_used == 0 and not shared_engine.has_work
    shared_engine.overlap = request.param
    return shared_engine


def add_all(engine, tokenizer, n=24, **sampling):
    for i, p in enumerate(PROMPTS):
        engine.add(f"j{i}", tokenizer.encode(p, add_special_tokens=False),
                   Sampling(max_tokens=n, ignore_eos=True, **sampling))


def test_the_load_counts_the_blocks_a_prompt_still_needs_as_promised(engine, tokenizer):
    """Regression (session 25 review): the load report said only which blocks were in use. A prompt takes its blocks
    chunk by chunk (a job in the line none yet), so every report showed the scheduler room already spoken for, and
    it placed more jobs there than the worker could hold."""
    from services.worker.block_manager import blocks_for

    ids = (tokenizer.encode("The quick brown fox jumps over the lazy dog. ", add_special_tokens=False) * 80)[:700]
    engine.add("long", ids, Sampling(max_tokens=4, ignore_eos=True))       # 700 tokens: three chunks of <= 256
    need = blocks_for(len(ids) + 1, engine.blocks.block_size)
    load = engine.load()
    assert load.used_blocks == 0 and load.promised_blocks == need
    engine.step()
    load = engine.load()
    assert 0 < load.used_blocks < need and load.used_blocks + load.promised_blocks == need
    run_to_end(engine)
    assert engine.load().promised_blocks == 0 and engine.blocks.num_used == 0


def test_batched_greedy_matches_transformers(engine, tokenizer, references):
    add_all(engine, tokenizer)
    done = run_to_end(engine)
    for i, p in enumerate(PROMPTS):
        tokens, text, finish = done[f"j{i}"]
        assert tokens == references[p], p
        assert finish is Finish.LENGTH
        assert text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_chunked_prefill_and_tiny_pool_give_same_tokens(model_dir, tokenizer, references, overlap):
    # 8-token steps split every prompt; 6 blocks of 16 cannot hold all four jobs, so the engine
    # preempts (recompute) and resumes them locally -- with overlap, also jobs whose last token is in flight.
    engine = make_engine(model_dir, token_budget=8, num_blocks=6)
    engine.overlap = overlap
    add_all(engine, tokenizer)
    recomputed: list[str] = []
    done = run_to_end(engine, on_step=lambda out: recomputed.extend(out.recomputed))
    assert engine.num_preemptions > 0
    # each preemption for room is named, once, for the scheduler to count against the job's bound
    assert len(recomputed) == engine.num_preemptions and set(recomputed) <= set(done)
    assert {p: done[f"j{i}"][0] for i, p in enumerate(PROMPTS)} == references
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("mode", list(PreemptMode))
def test_preempt_then_resume_gives_same_output(engine, tokenizer, references, mode):
    prompt = PROMPTS[2]
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    engine.add("p", ids, Sampling(max_tokens=24, ignore_eos=True))
    first: list[int] = []
    text = ""
    while len(first) < 10:
        for d in engine.step().deltas:
            first += d.token_ids
            text += d.text
    for d in engine.flush().deltas:     # what the worker's loop does before a preempt: emit the step in flight
        first += d.token_ids
        text += d.text
    assert engine.preempt("p", mode) == mode
    assert (engine.blocks.num_used > 0) == (mode is PreemptMode.PARK)          # parked: its KV stays on the device
    assert engine.blocks.num_swapped > 0 if mode is PreemptMode.SWAP else engine.blocks.num_swapped == 0
    assert not engine.has_work                                                  # nothing runs until it is resumed
    # what the scheduler does on resume: re-send the job with the tokens recorded so far
    engine.add("p", ids, Sampling(max_tokens=24, ignore_eos=True), first, text)
    tokens, rest_text, finish = run_to_end(engine)["p"]
    assert first + tokens == references[prompt]
    assert text + rest_text == tokenizer.decode(references[prompt], skip_special_tokens=True)
    assert engine.blocks.num_used == 0 and engine.blocks.num_swapped == 0


def test_jobs_parked_after_their_first_token_resume_with_the_same_output(engine, tokenizer, references):
    """What prefill-early does: two of four jobs are prefilled, send one token and park with their KV; the other two
    run to the end meanwhile. Resumed (the scheduler re-sends them), the parked ones continue where they stopped."""
    ids = {p: tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS}
    for i, p in enumerate(PROMPTS):
        engine.add(f"j{i}", ids[p], Sampling(max_tokens=24, ignore_eos=True), park_after_first_token=i % 2 == 0)
    tokens: dict[str, list[int]] = {}
    parked: list[str] = []
    while engine.has_work:
        out = engine.step()
        for d in out.deltas:
            tokens.setdefault(d.job_id, []).extend(d.token_ids)
        parked += out.parked
    assert sorted(parked) == ["j0", "j2"]
    assert [len(tokens[j]) for j in ("j0", "j1", "j2", "j3")] == [1, 24, 1, 24]     # parked ones: one token only
    assert engine.load().parked == 2 and engine.blocks.num_used > 0
    for i in (0, 2):
        p = PROMPTS[i]
        engine.add(f"j{i}", ids[p], Sampling(max_tokens=24, ignore_eos=True), tokens[f"j{i}"],
                   tokenizer.decode(tokens[f"j{i}"]))
    done = run_to_end(engine)
    for i, p in enumerate(PROMPTS):
        assert tokens[f"j{i}"] + (done[f"j{i}"][0] if i % 2 == 0 else []) == references[p], p
    assert engine.blocks.num_used == 0 and engine.load().parked == 0


def test_a_job_parked_while_its_token_is_in_flight_parks_without_a_flush(engine, tokenizer, references):
    """A preemption by parking does not wait for the step in flight (the worker's loop used to flush first, leaving
    the GPU idle while the next step was prepared): the job leaves the next step's plan, parks once its token in
    flight is collected, and resumed, continues with the same output; the other job never stops."""
    ids = {p: tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:2]}
    engine.add("p", ids[PROMPTS[0]], Sampling(max_tokens=24, ignore_eos=True))
    engine.add("q", ids[PROMPTS[1]], Sampling(max_tokens=24, ignore_eos=True))
    tokens: dict[str, list[int]] = {"p": [], "q": []}

    def take(out):
        for d in out.deltas:
            tokens[d.job_id] += d.token_ids
        return out
    while len(tokens["p"]) < 8:
        take(engine.step())
    if not engine.overlap:                       # serial steps: nothing is in flight, preempt() parks it at once
        assert not engine.park_when_sampled("p")
        return
    preemptions = engine.num_preemptions
    assert engine.park_when_sampled("p") and engine.park_when_sampled("p")
    assert engine.num_preemptions == preemptions      # counted when it parks: its token in flight might finish it
    before = len(tokens["p"])
    out = take(engine.step())                    # launches q's next step, collects the one in flight
    assert out.parked == ["p"] and len(tokens["p"]) == before + 1             # its token in flight, then parked
    assert engine.num_preemptions == preemptions + 1                          # asked twice: counted once
    assert engine.load().parked == 1 and engine.blocks.num_used > 0
    while engine.has_work:                       # q runs on alone, p gets nothing more
        take(engine.step())
    assert len(tokens["p"]) == before + 1 and tokens["q"] == references[PROMPTS[1]]
    engine.add("p", ids[PROMPTS[0]], Sampling(max_tokens=24, ignore_eos=True), tokens["p"],
               tokenizer.decode(tokens["p"]))
    rest, _, _ = run_to_end(engine)["p"]
    assert tokens["p"] + rest == references[PROMPTS[0]]
    assert engine.blocks.num_used == 0 and engine.load().parked == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_parked_kv_is_given_up_before_running_jobs_are_preempted(model_dir, tokenizer, references, overlap):
    """A pool of 4 blocks: a parked job holds one; the two running jobs need all four to grow. The engine drops the parked
    job (it is forgotten: the scheduler recomputes it where it resumes it) instead of preempting a running one."""
    engine = make_engine(model_dir, num_blocks=4)
    engine.overlap = overlap
    ids = {p: tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS}
    engine.add("parked", ids[PROMPTS[2]], Sampling(max_tokens=24, ignore_eos=True), park_after_first_token=True)
    first = run_until_parked(engine, "parked")
    held = engine.blocks.num_used
    for i in (0, 1):
        engine.add(f"j{i}", ids[PROMPTS[i]], Sampling(max_tokens=24, ignore_eos=True))
    dropped: list[str] = []
    done = run_to_end(engine, on_step=lambda out: dropped.extend(out.kv_dropped))
    assert dropped == ["parked"]                             # reported, so the scheduler stops counting on that KV
    assert "parked" not in engine.seqs and engine.load().parked == 0 and held > 0
    assert engine.num_preemptions == 0                       # nobody running lost its KV
    assert [done[f"j{i}"][0] for i in (0, 1)] == [references[PROMPTS[0]], references[PROMPTS[1]]]
    # resumed by the scheduler: recomputed from its prompt and the token it sent, same output
    engine.add("parked", ids[PROMPTS[2]], Sampling(max_tokens=24, ignore_eos=True), first, tokenizer.decode(first))
    assert first + run_to_end(engine)["parked"][0] == references[PROMPTS[2]]
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_a_job_prefilled_early_generates_its_early_tokens_before_it_parks(model_dir, tokenizer, references, overlap):
    """With early_tokens (the scheduler's --early-tokens) a job sent to be prefilled early decodes that many tokens
    before it parks, so one whose whole output is that short ends there without waiting for a decode slot; resumed,
    it goes on to the output it would have had uninterrupted."""
    engine = make_engine(model_dir)
    engine.overlap = overlap
    ids = tokenizer.encode(PROMPTS[2], add_special_tokens=False)
    engine.add("long", ids, Sampling(max_tokens=24, ignore_eos=True), park_after_first_token=True, early_tokens=5)
    engine.add("short", ids, Sampling(max_tokens=3, ignore_eos=True), park_after_first_token=True, early_tokens=5)
    first = run_until_parked(engine, "long")
    assert first == references[PROMPTS[2]][:5] and engine.seqs["long"].status is SeqStatus.PARKED
    assert "short" not in engine.seqs                        # it ended within its early tokens: never parked
    engine.add("long", ids, Sampling(max_tokens=24, ignore_eos=True), first, tokenizer.decode(first))
    assert first + run_to_end(engine)["long"][0] == references[PROMPTS[2]]
    assert engine.blocks.num_used == 0


def test_a_job_to_prefill_early_is_promised_room_for_its_early_tokens(engine, tokenizer):
    """The load report's promised blocks (what the scheduler counts as taken) cover a job's prompt and next token,
    and for a job sent to be prefilled early, its early tokens too (found by review: they counted one token)."""
    ids = tokenizer.encode(PROMPTS[2], add_special_tokens=False)
    bs = engine.blocks.block_size
    engine.add("plain", ids, Sampling(max_tokens=64, ignore_eos=True))
    plain = engine.load().promised_blocks
    assert plain == -(-(len(ids) + 1) // bs)
    engine.add("early", ids, Sampling(max_tokens=64, ignore_eos=True), park_after_first_token=True, early_tokens=40)
    assert engine.load().promised_blocks - plain == -(-(len(ids) + 40) // bs)


def run_until_parked(engine: Engine, job_id: str) -> list[int]:
    tokens: list[int] = []
    for _ in range(1000):
        out = engine.step()
        tokens += [t for d in out.deltas if d.job_id == job_id for t in d.token_ids]
        if job_id in out.parked:
            return tokens
    raise AssertionError(f"{job_id} never parked")


def test_stop_string_ends_generation_and_is_not_returned(engine, tokenizer, references):
    prompt = PROMPTS[2]
    full = tokenizer.decode(references[prompt], skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    engine.add("s", tokenizer.encode(prompt, add_special_tokens=False), Sampling(max_tokens=24, stop=(stop,)))
    tokens, text, finish = run_to_end(engine)["s"]
    assert finish is Finish.STOP_STRING
    assert stop not in text and full.startswith(text) and len(text) < len(full)
    assert len(tokens) < 24


def test_seeded_sampling_is_reproducible(engine, tokenizer):
    ids = tokenizer.encode(PROMPTS[3], add_special_tokens=False)
    runs = []
    for job, seed in (("a", 7), ("b", 7), ("c", 8)):
        engine.add(job, ids, Sampling(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=seed, ignore_eos=True))
        runs.append(run_to_end(engine)[job][0])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_abort_frees_blocks(engine, tokenizer):
    engine.add("x", tokenizer.encode(PROMPTS[0], add_special_tokens=False), Sampling(max_tokens=50))
    engine.step()
    assert engine.blocks.num_used > 0
    assert engine.abort("x")
    assert engine.blocks.num_used == 0
    engine.flush()                  # overlapped: the step in flight was settled, its output waits to be sent
    assert not engine.has_work


def test_logits_match_transformers_through_prefill_decode_and_mixed_steps(model_dir):
    """The GPU benchmark's check, on CPU with the real SmolLM2 in fp32: 3 prompts prefilled together,
    64 decode steps, and a 4th prompt joining in two chunks while the others decode."""
    from bench.engine_bench import check_logits
    from services.worker.model_runner import load_hf_model

    hf = load_hf_model(str(model_dir), torch.float32, torch.device("cpu"))
    engine = build_engine(WorkerConfig(model_dir=str(model_dir), num_blocks=256, max_batch=8), model=hf)
    res = check_logits(engine, hf, [37, 200, 513], steps=64, late=100, join_at=8)
    assert res["positions"] == 3 * 65 + (64 - 9)
    assert res["max_rel_err"] < 1e-4 and res["argmax_agree"] == 1 and not res["nan"]


def test_other_architectures_fall_back_to_transformers(tmp_path):
    """A GPT-2-shaped model (not Llama family) runs through transformers' own forward, with the same
    greedy output as `generate`, also across a swap and a recompute preemption."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=256)).eval()
    engine = build_engine(WorkerConfig(num_blocks=64, num_host_blocks=16, max_batch=4), model=model)
    prompt = [5, 17, 42, 7, 99]
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    engine.add("a", prompt, Sampling(max_tokens=20, ignore_eos=True))
    engine.add("b", prompt, Sampling(max_tokens=20, ignore_eos=True))
    for _ in range(5):
        engine.step()
    a_first, b_first = engine.seqs["a"].output_ids[:], engine.seqs["b"].output_ids[:]
    assert engine.preempt("a", PreemptMode.SWAP) is PreemptMode.SWAP and engine.preempt("b", PreemptMode.RECOMPUTE) is PreemptMode.RECOMPUTE
    engine.add("a", prompt, Sampling(max_tokens=20, ignore_eos=True))            # swapped: resumes in place
    engine.add("b", prompt, Sampling(max_tokens=20, ignore_eos=True), b_first)   # recompute from its tokens
    done = run_to_end(engine)
    assert a_first + done["a"][0] == ref and b_first + done["b"][0] == ref
    assert not engine.runner._caches                                             # released when finished


def test_prefix_cache_hits_give_the_same_tokens(engine, tokenizer, hf_model):
    """A second turn resends the first turn's prompt and answer: their full blocks come from the prefix
    cache, and the tokens are still transformers' greedy ones (so are those of a recompute that hits)."""
    first = " ".join(PROMPTS) + " " + PROMPTS[2]
    ids = tokenizer.encode(first, add_special_tokens=False)
    engine.add("t1", ids, Sampling(max_tokens=24, ignore_eos=True))
    answer = run_to_end(engine)["t1"][0]
    second = ids + answer + tokenizer.encode(" Tell me more.", add_special_tokens=False)
    before = engine.sched.cached_tokens
    engine.add("t2", second, Sampling(max_tokens=24, ignore_eos=True))
    tokens = run_to_end(engine)["t2"][0]
    hit = engine.sched.cached_tokens - before
    assert hit >= (len(ids) + len(answer)) // 16 * 16 - 16 and hit % 16 == 0
    assert tokens == hf_greedy_ids(hf_model, second, 24)


def test_steps_count_the_attention_pairs_of_a_turns_prefill_over_its_cached_history(engine, tokenizer):
    """Each step reports its prefill chunks' query-key pairs (the simulator's step cost fits them): however the
    prompt is chunked, a prompt of P tokens whose first H come from the prefix cache computes P(P+1)/2 - H(H+1)/2."""
    ids = tokenizer.encode(" ".join(PROMPTS * 12), add_special_tokens=False)
    pairs = lambda n: prefill_pairs(0, n)
    shapes = []
    engine.add("t1", ids, Sampling(max_tokens=8, ignore_eos=True))
    answer = run_to_end(engine, on_step=lambda out: shapes.append(out.shape))["t1"][0]
    budget = engine.sched.token_budget
    assert len(ids) > budget and len(ids) % budget != 1        # chunked, and no chunk of one token (a decode's size)
    assert sum(s.prefill_pairs for s in shapes if s) == pairs(len(ids))
    assert all(s.prefill_pairs == 0 for s in shapes if s and not s.prefill_tokens)      # decodes attend as context
    second, before, shapes[:] = ids + answer + tokenizer.encode(" Tell me more.", add_special_tokens=False), \
        engine.sched.cached_tokens, []
    engine.add("t2", second, Sampling(max_tokens=4, ignore_eos=True))
    run_to_end(engine, on_step=lambda out: shapes.append(out.shape))
    hit = engine.sched.cached_tokens - before
    assert hit > 0 and (len(second) - hit) % budget != 1
    assert sum(s.prefill_pairs for s in shapes if s) == pairs(len(second)) - pairs(hit)


def test_a_prompt_chunk_the_token_budget_cuts_to_one_token_counts_as_the_prefill_it_runs_as(model_dir):
    """Budget 2: A's 2-token prompt fills the first step; then A decodes beside one token of B's 3-token prompt a
    step. That chunk samples nothing and runs the mixed path: the step reports it as prefill (tokens, pairs, mixed).
    B's last prompt token samples, as a decode row does (no prefill), but the length probe reads it: mixed too."""
    engine = make_engine(model_dir, token_budget=2, max_batch=2)
    engine.add("a", [101, 102], Sampling(max_tokens=3, ignore_eos=True))
    engine.add("b", [201, 202, 203], Sampling(max_tokens=1, ignore_eos=True))
    shapes = []
    run_to_end(engine, on_step=lambda out: shapes.append(out.shape))
    shapes = [s for s in shapes if s]
    assert sum(s.prefill_tokens for s in shapes) == 2 + 1 + 1
    assert sum(s.prefill_pairs for s in shapes) == prefill_pairs(0, 2) + prefill_pairs(0, 1) + prefill_pairs(1, 1)
    assert sum(s.mixed for s in shapes) == 4


def test_reset_forgets_the_prefix_cache(engine, tokenizer):
    """After a failed step the worker resets; blocks registered by that step may hold no KV, so no later
    request may hit them."""
    engine.add("r", tokenizer.encode(" ".join(PROMPTS), add_special_tokens=False), Sampling(max_tokens=4))
    engine.step()
    assert engine.blocks.num_cached > 0
    engine.reset()
    assert engine.blocks.num_cached == 0 and engine.blocks.num_used == 0 and not engine.has_work


def test_tenants_do_not_share_prefix_cache_entries(engine, tokenizer):
    ids = tokenizer.encode(" ".join(PROMPTS) * 2, add_special_tokens=False)
    hits = []
    for job in ("acme/1", "globex/1", "acme/2"):
        before = engine.sched.cached_tokens
        engine.add(job, ids, Sampling(max_tokens=2, ignore_eos=True))
        run_to_end(engine)
        hits.append(engine.sched.cached_tokens - before)
    assert hits[0] == 0 and hits[1] == 0 and hits[2] >= len(ids) // 16 * 16 - 16


@pytest.mark.parametrize("prompt, problem", [([], "tokens"), ([10**9], "token ids"), ([-1], "token ids"),
                                             ([5] * 100_000, "tokens")])
def test_an_assignment_the_model_cannot_run_is_refused_alone(engine, tokenizer, references, prompt, problem):
    """Before, an id outside the vocabulary was taken and failed the next step's embedding for the whole
    batch (on a GPU a device assert that ends the process); an empty prompt never got a step at all."""
    add_all(engine, tokenizer)
    with pytest.raises(ValueError, match=problem):
        engine.add("bad", prompt, Sampling(max_tokens=4))
    assert "bad" not in engine.seqs
    done = run_to_end(engine)
    assert {p: done[f"j{i}"][0] for i, p in enumerate(PROMPTS)} == references


def test_output_settled_by_a_command_keeps_the_engine_busy(engine, tokenizer):
    """An abort settles the step in flight; its tokens (here the job's last) must still come out of the
    next step, or the worker's loop would sleep on its command queue with a finished job unreported."""
    engine.overlap = True
    engine.add("last", tokenizer.encode(PROMPTS[0], add_special_tokens=False), Sampling(max_tokens=1))
    engine.step()                              # launches the one step; its token is in flight
    engine.abort("someone-else")               # settles it
    assert engine.has_work
    out = engine.step()
    assert [j for j, _ in out.finished] == ["last"] and not engine.has_work


def test_a_resumed_job_whose_recorded_output_already_ends_it_ends_without_another_token(engine, tokenizer, references):
    """The scheduler can send a job out again with its whole output recorded (its finish was lost between the record
    of its last tokens and the record of its end). It must end at once, by the rule that had ended it, with nothing
    more generated: before, the worker ran it on (one token past max_tokens, past EOS, or past a stop string whose
    text then reached the client)."""
    prompt_ids = tokenizer.encode(PROMPTS[2], add_special_tokens=False)
    ref = references[PROMPTS[2]]
    full = tokenizer.decode(ref, skip_special_tokens=True)
    cut = next(i for i in range(4, len(ref)) if len(tokenizer.decode(ref[:i], skip_special_tokens=True)) >= 8)
    so_far = tokenizer.decode(ref[:cut], skip_special_tokens=True)
    stop = so_far[-3:]                                       # completed by the recorded tokens, held back, unsent
    eos = next(iter(engine.eos_ids))
    engine.add("len", prompt_ids, Sampling(max_tokens=6, ignore_eos=True), output_ids=ref[:6],
               output_text=tokenizer.decode(ref[:6], skip_special_tokens=True))
    engine.add("eos", prompt_ids, Sampling(max_tokens=24), output_ids=[*ref[:3], eos],
               output_text=tokenizer.decode(ref[:3], skip_special_tokens=True))
    engine.add("stop", prompt_ids, Sampling(max_tokens=24, stop=(stop,)), output_ids=ref[:cut],
               output_text=so_far[:-5])
    done = run_to_end(engine)
    assert {j: (tokens, finish) for j, (tokens, _, finish) in done.items()} == {
        "len": ([], Finish.LENGTH), "eos": ([], Finish.STOP), "stop": ([], Finish.STOP_STRING)}
    assert done["stop"][1] == so_far[-5:-3] and full.startswith(so_far)      # the text before the stop string only
    assert engine.blocks.num_used == 0 and not engine.seqs


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_grouped_prefix_rows_give_each_job_its_own_tokens(model_dir, tokenizer, hf_model, overlap):
    """With rows that share prefix blocks grouped (a step's rows out of admission order), each job still gets
    transformers' greedy tokens: second turns, admitted in the other order while their first turns decode, share
    those turns' blocks."""
    engine = make_engine(model_dir, group_prefix_rows=True)
    engine.overlap = overlap
    tokens: dict[str, list[int]] = {}
    collect = lambda out: [tokens.setdefault(d.job_id, []).extend(d.token_ids) for d in out.deltas]  # noqa: E731
    prompts = {f"t1-{i}": tokenizer.encode(" ".join(3 * (PROMPTS[i:] + PROMPTS[:i])), add_special_tokens=False)
               for i in range(3)}                       # over 4 blocks: rows are grouped by their 4th block
    for job, ids in prompts.items():
        engine.add(job, ids, Sampling(max_tokens=24, ignore_eos=True))
    for _ in range(3):                                   # prefilled and decoding: their full blocks are cached
        collect(engine.step())
    before = engine.sched.cached_tokens
    for job, ids in reversed(list(prompts.items())):
        prompts[job.replace("t1", "t2")] = ids + tokenizer.encode(" Tell me more.", add_special_tokens=False)
        engine.add(job.replace("t1", "t2"), prompts[job.replace("t1", "t2")], Sampling(max_tokens=24, ignore_eos=True))
    collect(engine.step())                               # the second turns are admitted
    jobs = list(prompts)                                 # admission order: t1-0, t1-1, t1-2, t2-2, t2-1, t2-0
    assert [jobs[i] for i in engine.blocks.prefix_order(jobs)] == ["t1-0", "t2-0", "t1-1", "t2-1", "t1-2", "t2-2"]
    run_to_end(engine, on_step=collect)
    assert engine.sched.cached_tokens - before >= 3 * 64     # the second turns hit their first turns' blocks
    assert {job: tokens[job] for job in prompts} == {job: hf_greedy_ids(hf_model, ids, 24)
                                                     for job, ids in prompts.items()}
