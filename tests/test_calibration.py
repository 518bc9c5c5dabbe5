"""Calibration sources: windows sampled from the model itself (`--calib self`), the built-in text, JSONL chat records
through the chat template, mixing sources, and the offline default."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgequant import self_calibration as sc
from edgequant.calibration import BUILTIN, BUILTIN_TEXT, calibrate, load_text, split, windows
from edgequant.errors import UserError
from edgequant.model import SourceModel
from edgequant.tokens import ReferenceTokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def qwen(tiny_qwen2):
    return SourceModel(str(tiny_qwen2))


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return SourceModel(str(tiny_llama))


def test_min_p_sampling_draws_from_the_renormalized_survivors():
    """Tokens less than MIN_P times as likely as the most likely one never come; the others come with their
    renormalized probabilities; banned tokens never come."""
    p = torch.tensor([0.5, 0.3, 0.1, 0.07, 0.02, 0.01])  # min-p 0.05 of 0.5: 0.025, the last two go
    assert sc.MIN_P == 0.05
    logits = torch.log(p)[None].repeat(40000, 1)
    gen = torch.Generator().manual_seed(1)
    counts = np.bincount(sc.next_token(logits.clone(), gen).numpy(), minlength=6) / len(logits)
    assert counts[4:].sum() == 0
    np.testing.assert_allclose(counts[:4], (p[:4] / p[:4].sum()).numpy(), atol=0.01)
    counts = np.bincount(sc.next_token(logits.clone(), gen, torch.arange(6) == 0).numpy(), minlength=6) / len(logits)
    q = p[1:] / p[1:].sum()  # without token 0 the threshold is 0.05 * 0.3: token 4 (0.02) comes back
    assert counts[0] == 0 and counts[5] == 0
    np.testing.assert_allclose(counts[1:5], (q[:4] / q[:4].sum()).numpy(), atol=0.01)


@pytest.mark.parametrize("model", ["llama", "qwen"])
def test_cached_generation_equals_recomputing_every_step(model, request):
    """The KV-cached batched loop samples exactly what a loop re-running the whole sequence each step samples, with
    rows of different prompts and banned tokens in one batch: each row keeps its prompt, then never samples what it
    bans."""
    m = request.getfixturevalue(model)
    net = sc.load_model(m, CPU, torch.float32)
    prompts, banned, length, seed = [[3, 17, 5], [3], [3, 9], [4]], [[0], [0, 1, 2], [], [0]], 20, 7
    got = sc.generate(net, prompts, banned, length, 3, seed, CPU)
    assert got.shape == (4, length)
    for r, (p, b) in enumerate(zip(prompts, banned)):
        assert got[r, : len(p)].tolist() == p and not torch.isin(got[r, len(p):], torch.tensor(b, dtype=torch.int64)).any()
    vocab = net.get_output_embeddings().weight.shape[0]
    for k, b in enumerate(range(0, 4, 3)):  # the same generator per batch as generate's
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
        rows = range(b, min(b + 3, 4))
        ban = torch.zeros(len(rows), vocab, dtype=torch.bool)
        for i, r in enumerate(rows):
            ban[i, banned[r]] = True
        ids = torch.tensor([[prompts[r][0]] for r in rows])
        while ids.shape[1] < length:
            with torch.no_grad():
                logits = net(ids, use_cache=False).logits[:, -1]
            t, s = ids.shape[1], sc.next_token(logits, gen, ban)
            nxt = [prompts[r][t] if t < len(prompts[r]) else int(s[i]) for i, r in enumerate(rows)]
            ids = torch.cat([ids, torch.tensor(nxt)[:, None]], 1)
        assert torch.equal(got[b : b + len(rows)], ids)


def test_load_model_equals_the_checkpoint(llama, tiny_llama):
    """The sampler's model computes what transformers' own from_pretrained model computes."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 40, 41, 42, 43, 7]])
    ours = sc.load_model(llama, CPU, torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny_phi3", "tiny_phi4_mini", "tiny_gemma2", "tiny_gemma3"])
def test_load_model_equals_the_checkpoint_for_each_architecture(name, request):
    """Also where the model computes scalars at init (Gemma's embedding scale, lost on the meta device) and where SDPA
    cannot compute it (Gemma 2's soft-capped attention)."""
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(name)
    ids = torch.tensor([[2, 40, 41, 42, 43, 7] * 8])  # past the Gemma fixtures' 32-token sliding window
    ours = sc.load_model(SourceModel(str(model_dir)), CPU, torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_self_windows_plain_and_chat(qwen, tiny_qwen2):
    """A model with a chat template: a quarter of the windows open a user turn of it, the rest start a document
    (Qwen has no BOS: its end-of-text token) and never sample an end-of-text token; same seed, same windows."""
    tok = ReferenceTokenizer(tiny_qwen2)
    ids, record = sc.self_windows(qwen, 8, 96, seed=3, device=CPU)
    assert ids.shape == (8, 96) and record["chat_windows"] == 2 and record["source"] == "self"
    start = sc.document_start(tok)
    assert start == tok.token_id("<|endoftext|>")
    plain, chat = ids[:6], ids[6:]
    assert (plain[:, 0] == start).all() and not torch.isin(plain[:, 1:], torch.tensor(tok.eos_ids + [start])).any()
    prompt = sc.chat_prompt(tok)
    assert tok.token_id("<|im_start|>") == prompt[0]
    assert (chat[:, : len(prompt)] == torch.tensor(prompt)).all()
    assert len({tuple(r) for r in ids.tolist()}) == 8  # sampled, not greedy
    again, _ = sc.self_windows(qwen, 8, 96, seed=3, device=CPU)
    other, _ = sc.self_windows(qwen, 8, 96, seed=4, device=CPU)
    assert torch.equal(ids, again) and not torch.equal(ids, other)


def test_self_windows_refused_when_the_model_does_not_fit(llama, monkeypatch):
    monkeypatch.setattr(sc, "available_memory", lambda device: 1 << 20)
    with pytest.raises(UserError, match="sampling from the model needs"):
        sc.self_windows(llama, 4, 32, seed=0, device=CPU)


def test_chat_prompt_opens_a_user_turn(tiny_qwen2, tiny_llama):
    tok = ReferenceTokenizer(tiny_qwen2)
    text = tok.render_chat([{"role": "user", "content": "hello"}])
    prompt = sc.chat_prompt(tok)
    assert tok.encode(text[: text.index("hello")], add_bos=False) == prompt
    assert tok.token_id("<|im_start|>") in prompt and tok.token_id("<|im_end|>") in prompt  # the system turn
    llama = ReferenceTokenizer(tiny_llama)
    assert sc.chat_prompt(llama)[0] == llama.bos_id


def test_sentencepiece_special_strings_become_tokens(tiny_llama):
    tok = ReferenceTokenizer(tiny_llama)
    assert tok.encode("<s>a b</s>", add_bos=False, special=True) == [tok.bos_id, *tok.encode("a b", add_bos=False), tok.eos_id]
    assert tok.bos_id not in tok.encode("<s>a b", add_bos=False)  # plain text: spelled out, as llama-imatrix does


def test_jsonl_chat_records_go_through_the_template(tmp_path, tiny_qwen2):
    tok = ReferenceTokenizer(tiny_qwen2)
    path = tmp_path / "c.jsonl"
    chat = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on the mat"}]
    path.write_text(json.dumps({"messages": chat}) + "\n\n" + json.dumps({"text": "plain words"}) + "\n")
    text = load_text(str(path), tok)
    assert text.special and text.text == tok.render_chat(chat) + "\n\nplain words"
    ids = windows(tok, text, 1, 8)
    assert ids[0, 0] == tok.token_id("<|im_start|>")  # the special string became the token


@pytest.mark.parametrize("line,error", [
    ('{"messages": "hi"}', "needs a \"text\" string or a \"messages\" list"),
    ('{"messages": [{"role": "user"}]}', "needs a \"text\" string"),
    ('{"other": 1}', "needs a \"text\" string"),
    ("not json", "c.jsonl:1: each JSONL line"),
])
def test_bad_jsonl_records(tmp_path, tiny_qwen2, line, error):
    path = tmp_path / "c.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UserError, match=error.replace('"', '.').replace("[", ".")):
        load_text(str(path), ReferenceTokenizer(tiny_qwen2))


def test_chat_records_need_a_template(tmp_path, tiny_llama):
    cfg = json.loads((tiny_llama / "tokenizer_config.json").read_text())
    model = tmp_path / "m"
    model.mkdir()
    for f in tiny_llama.iterdir():
        (model / f.name).symlink_to(f)
    (model / "tokenizer_config.json").unlink()
    (model / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "chat_template"}))
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match="needs a model with a chat template"):
        load_text(str(path), ReferenceTokenizer(model))
    assert sc.chat_prompt(ReferenceTokenizer(model)) is None


def test_builtin_text_is_shipped_and_long_enough(tiny_qwen2):
    assert BUILTIN_TEXT.is_file() and BUILTIN_TEXT.stat().st_size > 100_000
    ids = windows(ReferenceTokenizer(tiny_qwen2), load_text(BUILTIN), 16, 512)
    assert ids.shape == (16, 512)


def test_builtin_text_gives_what_it_holds(llama):
    """Asked for more windows than the shipped text holds, --calib builtin takes all it has, and says how many."""
    tok = ReferenceTokenizer(llama.dir)
    available = len(tok.encode(load_text(BUILTIN).text, add_bos=True)) // 512
    got = calibrate(llama, [BUILTIN], available + 50, 512, seed=0, device=CPU)
    assert got.ids.shape == (available, 512) and got.parts == [{"source": BUILTIN, "windows": available}]
    assert torch.equal(got.ids, windows(tok, load_text(BUILTIN), available, 512))


def test_sources_mix_in_order_with_the_windows_split(llama, fixture_text):
    assert split(7, 3) == [3, 2, 2]
    got = calibrate(llama, [str(fixture_text), "self", BUILTIN], 7, 32, seed=0, device=CPU)
    assert got.ids.shape == (7, 32)
    assert [(p["source"], p["windows"]) for p in got.parts] == [(str(fixture_text), 3), ("self", 2), (BUILTIN, 2)]
    tok = ReferenceTokenizer(llama.dir)
    assert torch.equal(got.ids[:3], windows(tok, load_text(str(fixture_text)), 3, 32))
    assert torch.equal(got.ids[5:], windows(tok, load_text(BUILTIN), 2, 32))
    with pytest.raises(UserError, match="at least one window per source"):
        calibrate(llama, ["self", BUILTIN], 1, 32, seed=0, device=CPU)


def test_default_is_self_and_builtin_and_falls_back_to_the_builtin_text(llama, monkeypatch, capsys):
    got = calibrate(llama, [], 4, 32, seed=0, device=CPU)
    assert [(p["source"], p["windows"]) for p in got.parts] == [("self", 2), (BUILTIN, 2)]
    tok = ReferenceTokenizer(llama.dir)
    assert torch.equal(got.ids[2:], windows(tok, load_text(BUILTIN), 2, 32))
    assert torch.equal(got.ids[:2], sc.self_windows(llama, 2, 32, 0, CPU)[0])
    monkeypatch.setattr(sc, "available_memory", lambda device: 1 << 20)
    got = calibrate(llama, [], 4, 32, seed=0, device=CPU)
    assert [p["source"] for p in got.parts] == [BUILTIN] and got.ids.shape == (4, 32)
    assert "calibrating on the built-in text (sampling from the model needs" in capsys.readouterr().err


def test_self_samples_what_the_builtin_text_lacks(llama, tmp_path, monkeypatch):
    """A built-in text shorter than its share gives what it holds, and `self` samples the rest: the build still
    calibrates on the windows asked for.  Two `self` sources sample different windows."""
    import edgequant.calibration as calibration

    short = tmp_path / "short.txt"
    short.write_text(" ".join(["the river runs past the old mill"] * 5), encoding="utf-8")
    monkeypatch.setattr(calibration, "BUILTIN_TEXT", short)
    tok = ReferenceTokenizer(llama.dir)
    held = len(tok.encode(short.read_text(), add_bos=True)) // 32
    assert 1 <= held < 3
    got = calibrate(llama, [], 6, 32, seed=0, device=CPU)
    assert [(p["source"], p["windows"]) for p in got.parts] == [("self", 6 - held), (BUILTIN, held)]
    assert got.ids.shape == (6, 32)
    two = calibrate(llama, ["self", "self"], 4, 32, seed=0, device=CPU)
    assert not torch.equal(two.ids[:2], two.ids[2:])
