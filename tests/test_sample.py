"""sample.py: cached vs naive decoding, K-row sampling, stops, the sampling distribution."""
import pytest
import torch
from conftest import tiny_model

from sample import KVCache, decode_step, generate, generate_naive, prefill, sample_next


@pytest.mark.parametrize("model_type, window", [("llama", None), ("mistral", 5)])
def test_cached_greedy_equals_naive_recompute(model_type, window):
    model = tiny_model(model_type, sliding_window=window)
    prompt = list(range(1, 13))  # longer than the window: the cached path must enforce it too
    naive = generate_naive(model, prompt, 40)
    cached = generate(model, [prompt], max_new_tokens=40, temperature=0)
    assert cached.tokens[0] == naive
    assert len(set(naive)) > 5  # a non-degenerate continuation, so the comparison means something


@pytest.mark.parametrize("model_type, window", [("llama", None), ("mistral", 4)])
def test_batch_of_different_prompts_matches_one_at_a_time(model_type, window):
    model = tiny_model(model_type, sliding_window=window)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]
    batched = generate(model, prompts, num_samples=2, max_new_tokens=15, temperature=0)
    for row, tokens in enumerate(batched.tokens):  # row p*K + s continues prompt p
        assert tokens == generate_naive(model, prompts[row // 2], 15)


def test_prefill_then_decode_equals_full_forward():
    model = tiny_model("mistral", sliding_window=3)
    x = torch.randint(0, 101, (2, 9))
    cache = KVCache(model.cfg, rows=2, max_len=9, dtype=torch.float32, device="cpu")
    logits = [prefill(model, x[:, :5], cache)]
    for pos in range(5, 9):
        logits.append(decode_step(model, x[:, pos], pos, cache))
    with torch.no_grad():
        full = model(x)[:, 4:]
    torch.testing.assert_close(torch.stack(logits, 1), full, atol=1e-5, rtol=1e-5)


def test_k_rows_reproducible_with_generator_and_rows_differ():
    model = tiny_model()
    kwargs = dict(num_samples=6, max_new_tokens=12, temperature=1.0)
    a = generate(model, [[1, 2, 3]], generator=torch.Generator().manual_seed(7), **kwargs)
    b = generate(model, [[1, 2, 3]], generator=torch.Generator().manual_seed(7), **kwargs)
    c = generate(model, [[1, 2, 3]], generator=torch.Generator().manual_seed(8), **kwargs)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens
    assert len({tuple(t) for t in a.tokens}) > 1  # the K rows are independent samples, not copies


def test_returned_logprobs_are_the_models_at_temperature_one():
    model = tiny_model()
    prompt = [4, 5, 6]
    out = generate(model, [prompt], num_samples=3, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    for ids, lps in zip(out.tokens, out.logprobs):
        seq = torch.tensor([prompt + ids])
        with torch.no_grad():
            ref = model(seq)[0, len(prompt) - 1:-1].log_softmax(-1).gather(-1, seq[0, len(prompt):, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-5, rtol=1e-5)


def test_stop_ids_end_only_their_rows():
    model = tiny_model()
    free = generate(model, [[1, 2, 3]], num_samples=8, max_new_tokens=20, generator=torch.Generator().manual_seed(3))
    stop = free.tokens[0][4]  # a token row 0 is known to emit at step 4
    out = generate(model, [[1, 2, 3]], num_samples=8, max_new_tokens=20, stop_ids={stop},
                   generator=torch.Generator().manual_seed(3))
    for ids, full, reason in zip(out.tokens, free.tokens, out.stop_reason):
        if stop in full:
            cut = full.index(stop) + 1
            assert ids == full[:cut] and reason == "stop_id"  # the stop token is kept
        else:
            assert ids == full and reason == "length"
    assert out.stop_reason[0] == "stop_id" and len(out.tokens[0]) <= 5


def test_stop_strings_use_decoded_text():
    model = tiny_model()
    decode = lambda ids: "".join(chr(65 + i % 26) for i in ids)  # noqa: E731 - one letter per token
    free = generate(model, [[9, 9]], num_samples=4, max_new_tokens=16, generator=torch.Generator().manual_seed(1))
    target = decode(free.tokens[2][5:7])  # a two-token string row 2 produces
    out = generate(model, [[9, 9]], num_samples=4, max_new_tokens=16, stop_strings=[target], decode=decode,
                   generator=torch.Generator().manual_seed(1))
    for ids, full, reason in zip(out.tokens, free.tokens, out.stop_reason):
        text = decode(full)
        if target in text:
            assert reason == "stop_string" and target in decode(ids) and target not in decode(ids[:-1])
        else:
            assert reason == "length" and ids == full
    with pytest.raises(ValueError, match="decode"):
        generate(model, [[1]], stop_strings=["x"])


def test_top_k_and_top_p_restrict_the_distribution():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    tok, lp = sample_next(logits, top_k=2, generator=gen)
    assert set(tok.tolist()) == {0, 1}
    p = torch.tensor([3.0, 2.0]).softmax(-1)
    assert abs((tok == 0).float().mean().item() - p[0].item()) < 0.03
    torch.testing.assert_close(lp[tok == 0][0], p[0].log())
    probs = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, ...: top_p=0.8 keeps the first two
    tok, _ = sample_next(logits, top_p=0.8, generator=gen)
    assert set(tok.tolist()) == {0, 1} and probs[:2].sum() > 0.8 > probs[0]
    tok, _ = sample_next(logits, temperature=0)
    assert (tok == 0).all()


def test_unbiased_sampling_frequencies():
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0]]).repeat(20000, 1)
    tok, _ = sample_next(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=4).float() / tok.numel()
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.015, rtol=0)
    assert freq[3] == 0


def test_prompt_longer_than_the_model_is_a_clear_error():
    model = tiny_model(max_position_embeddings=32)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        generate(model, [[1] * 20], max_new_tokens=20)


def test_default_model_greedy_chat_says_paris(default_model_dir):
    """The real default through the CLI: our model, tokenizer, chat template and cached sampler."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), f"--model_dir={default_model_dir}",
           "--prompt=What is the capital of France?", "--max_new_tokens=20", "--device=cpu"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    reply = run.stdout.split("--- sample 0")[1]
    assert "Paris" in reply and "stop: stop_id" in reply
