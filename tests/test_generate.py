"""Generation: samplers, AR with a KV cache, NAR passes, NAR-len demasking, batches, long-form."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest
import torch

from valle_cli import formats
from valle_cli.errors import InputError
from valle_cli.generation.generate import (
    GenerateConfig,
    Request,
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    generate_ar,
    generate_nar_len,
    guide,
    sample_tokens,
    synthesize,
    synthesize_long,
)
from valle_cli.generation.params import PASSES
from valle_cli.model.config import preset
from valle_cli.model.valle import CodecLM

K, V, VOCAB = 3, 32, 40
GREEDY = GenerateConfig(mode="ar+nar", ar=SamplingParams(temperature=0.0), max_frames=12)


def model_for(arch: str = "transformer", seed: int = 0, **kw) -> CodecLM:
    torch.manual_seed(seed)
    extra = {"moe_experts": 4} if arch == "mixtral" else {}
    return CodecLM(preset("tiny", arch=arch, n_codebooks=K, codebook_size=V, text_vocab_size=VOCAB, **extra,
                          **kw)).eval()


def request(seed: int, text: int = 6, prompt: int = 8, duration: int | None = None) -> Request:
    rng = np.random.default_rng(seed)
    return Request(text=rng.integers(4, VOCAB, size=text), prompt=rng.integers(0, V, size=(K, prompt)),
                   duration=duration)


# ----------------------------------------------------------------------------- samplers


def test_guidance_strength_zero_is_plain_and_rescale_keeps_the_spread():
    c, u = torch.randn(4, V), torch.randn(4, V)
    assert torch.equal(guide(c, u, 0.0, 0.75), c)
    g = guide(c, u, 3.0, 1.0)
    assert torch.allclose(g.std(-1), c.std(-1), atol=1e-5)
    assert torch.allclose(guide(c, u, 3.0, 0.0), c + 3.0 * (c - u))
    gen = torch.Generator().manual_seed(0)
    plain = sample_tokens(c, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    zero_cfg = sample_tokens(c, SamplingParams(temperature=1.0, cfg_strength=0.0), gen, uncond=u)
    assert torch.equal(plain, zero_cfg)


def test_filters_keep_what_they_should():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, SamplingParams(top_k=2))).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, SamplingParams(top_p=0.7))).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, SamplingParams(top_p=0.81))).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, SamplingParams(min_p=0.25))).tolist() == [[False, False, False, True]]


def test_repetition_penalty_window_and_decay():
    logits = torch.full((1, 6), 2.0)
    history = torch.tensor([[1, 2, 2, 5]])  # 5 is the newest
    out = apply_repetition_penalty(logits, history, SamplingParams(repetition_penalty=2.0, repetition_window=3))
    assert out[0].tolist() == [2.0, 2.0, 0.5, 2.0, 2.0, 1.0]  # 1 is outside the window; 2 twice
    decayed = apply_repetition_penalty(logits, history, SamplingParams(repetition_penalty=2.0, repetition_decay=0.5))
    assert decayed[0, 5] == 1.0 and 1.0 < decayed[0, 1] < decayed[0, 0]


def test_greedy_and_seeded_sampling_are_deterministic():
    logits = torch.randn(64, V)
    cfg = SamplingParams(temperature=1.0, top_k=10)
    a = sample_tokens(logits, cfg, torch.Generator().manual_seed(3))
    b = sample_tokens(logits, cfg, torch.Generator().manual_seed(3))
    c = sample_tokens(logits, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(sample_tokens(logits, SamplingParams(temperature=0), None), logits.argmax(-1))
    draws = torch.stack([sample_tokens(logits[:1], SamplingParams(), torch.Generator().manual_seed(s))
                         for s in range(3000)])
    freq = torch.bincount(draws[:, 0], minlength=V).float() / 3000
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.03)  # the exponential race samples the softmax


# ----------------------------------------------------------------------------- AR + NAR


def test_greedy_synthesis_is_deterministic_and_shaped():
    model = model_for()
    a = synthesize(model, [request(0)], GREEDY)
    b = synthesize(model, [request(0)], GREEDY)
    assert a[0].shape[0] == K and 1 <= a[0].shape[1] <= 12
    assert np.array_equal(a[0], b[0]) and a[0].max() < V


def test_seeded_sampling_reproduces_and_seeds_differ():
    model = model_for()
    cfg = replace(GREEDY, ar=SamplingParams(temperature=1.0), nar=SamplingParams(temperature=1.0), max_frames=30)
    a = synthesize(model, [request(0)], cfg, seed=1)
    b = synthesize(model, [request(0)], cfg, seed=1)
    c = synthesize(model, [request(0)], cfg, seed=2)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])


def test_stop_token_and_max_length_are_honoured():
    model = model_for()
    with torch.no_grad():
        model.head_ar.bias[V] = 100.0  # the stop token always wins...
    out = synthesize(model, [request(0)], replace(GREEDY, min_frames=3))
    assert out[0].shape[1] == 3  # ...once it is allowed
    with torch.no_grad():
        model.head_ar.bias[V] = -100.0  # never stops
    out = synthesize(model, [request(0)], replace(GREEDY, max_frames=17))
    assert out[0].shape[1] == 17


@pytest.mark.parametrize("arch", ["transformer", "llama", "mixtral"])
def test_cached_decoding_equals_recomputing_token_for_token(arch):
    model = model_for(arch)
    with torch.no_grad():
        model.head_ar.bias[V] = -100.0
    reqs = [request(0), request(1, text=3, prompt=5)]
    for batch in (reqs, reqs[:1]):  # padded rows (step masks), and one row (plain causal steps, no mask)
        cached = generate_ar(model, batch, replace(GREEDY, max_frames=20))
        full = generate_ar(model, batch, replace(GREEDY, max_frames=20, use_cache=False))
        assert all(np.array_equal(a, b) for a, b in zip(cached, full, strict=True))


@pytest.mark.parametrize("arch", ["transformer", "llama"])
def test_a_batch_gives_what_each_row_gives_alone(arch):
    model = model_for(arch)
    reqs = [request(0), request(1, text=3, prompt=0), request(2, text=9, prompt=12)]
    cfg = replace(GREEDY, max_frames=25)
    ended_apart = False
    for bias in (0.0, 0.1, 0.2, 0.3, 0.45, 0.6):  # a stop bias at which the rows end at different times
        with torch.no_grad():
            model.head_ar.bias[V] = bias
        together = synthesize(model, reqs, cfg)
        for r, got in zip(reqs, together, strict=True):
            (alone,) = synthesize(model, [r], cfg)
            assert np.array_equal(alone, got), bias
        ended_apart |= len({c.shape[1] for c in together}) > 1
    assert ended_apart  # finished rows really stopped while others went on


def test_cfg_runs_and_changes_the_output():
    model = model_for()
    with torch.no_grad():
        model.head_ar.bias[V] = -100.0
    plain = synthesize(model, [request(0)], GREEDY)
    guided = synthesize(model, [request(0)], replace(GREEDY, ar=SamplingParams(temperature=0.0, cfg_strength=3.0)))
    assert plain[0].shape == guided[0].shape and not np.array_equal(plain[0], guided[0])


# ----------------------------------------------------------------------------- NAR-len


def test_nar_len_never_remasks_kept_tokens_and_ends_unmasked():
    model = model_for()
    history = []
    cfg = GenerateConfig(mode="nar-len", steps=6, demask=SamplingParams(temperature=1.0, cfg_strength=2.5))
    generate_nar_len(model, [request(0, duration=20), request(1, duration=9)], cfg,
                     torch.Generator().manual_seed(0), on_step=lambda i, t, m: history.append((t, m)))
    assert len(history) == 6
    for row in range(2):
        for (t_prev, m_prev), (t_next, m_next) in zip(history, history[1:], strict=False):
            kept = ~m_prev[row]
            assert not m_next[row][kept].any()  # never re-masked
            assert np.array_equal(t_prev[row][kept], t_next[row][kept])  # never changed
            assert m_next[row].sum() < max(m_prev[row].sum(), 1)  # progress every round
        assert not history[-1][1][row].any()


def test_nar_len_duration_from_the_len_head_or_forced():
    model = model_for()
    with torch.no_grad():  # the len head says 00017 frames
        model.head_len.bias.fill_(-50.0)
        for position, digit in enumerate([0, 0, 0, 1, 7]):
            model.head_len.bias[position * 10 + digit] = 50.0
    cfg = GenerateConfig(mode="nar-len", steps=3)
    predicted, forced = synthesize(model, [request(0), request(1, duration=5)], cfg, seed=0)
    assert predicted.shape == (K, 17) and forced.shape == (K, 5)


# ----------------------------------------------------------------------------- long-form, errors


def test_long_form_is_the_sum_of_its_segments():
    model = model_for()
    sentences = [request(i).text for i in range(3)]
    joined, frames = synthesize_long(model, sentences, request(9).prompt, GREEDY, context_history=1)
    assert len(frames) == 3 and joined.shape == (K, sum(frames))


def test_bad_requests_are_refused():
    model = model_for()
    with pytest.raises(InputError, match="codebooks"):
        synthesize(model, [Request(text=np.array([5]), prompt=np.zeros((K + 1, 4), np.int64))], GREEDY)
    with pytest.raises(InputError, match="outside"):
        synthesize(model, [Request(text=np.array([5]), prompt=np.full((K, 4), V))], GREEDY)
    with pytest.raises(InputError, match="text token"):
        synthesize(model, [Request(text=np.array([VOCAB]), prompt=np.zeros((K, 4), np.int64))], GREEDY)
    ar_only = model_for(capabilities=("ar", "nar"))
    with pytest.raises(InputError, match="without NAR-len"):
        synthesize(ar_only, [request(0)], GenerateConfig(mode="nar-len"))


def test_requests_past_the_context_are_one_line_errors_naming_the_limit():
    """The tiny preset has 2048 positions; past them the RoPE table ended in an IndexError, in every mode."""
    from valle_cli.generation.generate import continue_audio, infill

    model = model_for()
    too_long = 2100
    with pytest.raises(InputError, match="2100 frames asked, past the model's context of 2048 positions"):
        synthesize(model, [request(0, duration=too_long)], GenerateConfig(mode="nar-len", steps=1))
    with pytest.raises(InputError, match="a prompt of 2100 frames fill the model's 2048 positions"):
        synthesize(model, [request(0, prompt=too_long)], GREEDY)
    with pytest.raises(InputError, match="2048 positions"):
        continue_audio(model, request(0).prompt, too_long, GREEDY)
    with pytest.raises(InputError, match="2048 positions"):
        infill(model, request(0).prompt, request(1).prompt, GenerateConfig(mode="nar-len", steps=1), frames=too_long)


@pytest.mark.parametrize("unified", [False, True])
def test_ar_ends_each_row_at_the_end_of_its_context(unified):
    """A model that never says stop, with max_frames past the context: each row of a batch stops where its
    positions run out (segment positions: 2048 frames; unified: 2048 minus its text and prompt)."""
    model = model_for(unified_positions=unified)
    with torch.no_grad():
        model.head_ar.bias[V] = -100.0  # never stops
    rows = [request(0, prompt=8), request(1, prompt=40)]
    out = synthesize(model, rows, replace(GREEDY, max_frames=2100))
    expected = [2048 - (6 + 2 + p) for p in (8, 40)] if unified else [2048, 2048]
    assert [o.shape[1] for o in out] == expected


def test_continuation_rollouts_stitch_one_tape():
    from valle_cli.generation.generate import continue_audio

    model = model_for()
    prompt = request(0, prompt=10).prompt
    tape, parts = continue_audio(model, prompt, 6, GREEDY, rollouts=3, context_frames=8)
    assert parts == [10, 6, 6, 6] and tape.shape == (K, 28)
    assert np.array_equal(tape[:, :10], prompt)  # the prompt stays at the head of the tape
    nar_len = continue_audio(model, prompt, 5, GenerateConfig(mode="nar-len", steps=2), rollouts=2)[0]
    assert nar_len.shape == (K, 20)


def test_infill_keeps_prefix_and_suffix_around_the_middle():
    from valle_cli.generation.generate import infill

    model = model_for()
    prefix, suffix = request(0, prompt=7).prompt, request(1, prompt=5).prompt
    tape, parts = infill(model, prefix, suffix, GREEDY, frames=4)
    assert parts == [7, 4, 5] and np.array_equal(tape[:, :7], prefix) and np.array_equal(tape[:, -5:], suffix)
    free, parts = infill(model, prefix, suffix, replace(GREEDY, max_frames=9))
    assert 1 <= parts[1] <= 9


@pytest.mark.slow
def test_compiled_one_step_function_gives_the_eager_tokens():
    model = model_for()
    with torch.no_grad():
        model.head_ar.bias[V] = -100.0
    reqs = [request(0), request(1, text=3, prompt=5)]
    eager = generate_ar(model, reqs, replace(GREEDY, max_frames=8))
    compiled = generate_ar(model, reqs, replace(GREEDY, max_frames=8, compile=True))
    assert all(np.array_equal(a, b) for a, b in zip(eager, compiled, strict=True))
    with pytest.raises(InputError, match="--compile needs --arch transformer"):
        generate_ar(model_for("llama"), reqs, replace(GREEDY, compile=True))


# ----------------------------------------------------------------------------- valle sample: the sampler flags


def _sample_cli(capsys, *args) -> tuple[int, str, str]:
    from valle_cli.cli import main

    with pytest.raises(SystemExit) as info:
        main(["sample", *map(str, args)])
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_sample_help_lists_every_sampling_param_with_its_default_in_each_pass(capsys):
    code, out, _ = _sample_cli(capsys, "--help")
    text = " ".join(out.split())
    assert code == 0 and "--NAME sets every pass; --ar-NAME, --nar-NAME or --demask-NAME sets one pass" in text
    defaults = GenerateConfig()
    for field in fields(SamplingParams):
        per_pass = [f"{getattr(getattr(defaults, p), field.name):g}" for p in PASSES]
        default = ", ".join(f"{p} {d}" for p, d in zip(PASSES, per_pass, strict=True))
        if len(set(per_pass)) == 1:
            default = per_pass[0]
        kind = {int: "INTEGER", float: "FLOAT"}[type(field.default)]
        meaning = " ".join(field.metadata["help"].split())
        assert f"--{field.name.replace('_', '-')} {kind} {meaning} [default: {default}]" in text, field.name
    assert "ar 1, nar 0, demask 1" in text and "ar 0, nar 0, demask 2.5" in text  # the passes differ here


def test_every_sampler_flag_sets_every_pass_or_only_the_prefixed_one():
    from valle_cli.cli.sample import flag_settings
    from valle_cli.generation.params import with_settings

    defaults = GenerateConfig()
    for field in fields(SamplingParams):
        flag, value = field.name.replace("_", "-"), type(field.default)("3")
        everywhere = with_settings(defaults, flag_settings([f"--{flag}", "3"]))
        assert all(getattr(getattr(everywhere, p), field.name) == value for p in PASSES), field.name
        for chosen in PASSES:
            one = with_settings(defaults, flag_settings([f"--{chosen}-{flag}=3"]))
            for p in PASSES:
                expected = value if p == chosen else getattr(getattr(defaults, p), field.name)
                assert getattr(getattr(one, p), field.name) == expected, (chosen, field.name)
        both = with_settings(defaults, flag_settings([f"--ar-{flag}=2", f"--{flag}", "3"]))  # the pass's own wins
        assert getattr(both.ar, field.name) == type(field.default)("2") and getattr(both.nar, field.name) == value


@pytest.mark.parametrize(("typo", "meant"), [("--ar-temprature", "--ar-temperature"), ("--top-kk", "--top-k"),
                                             ("--demsk-cfg-strength", "--demask-cfg-strength"),
                                             ("--max-secnds", "--max-seconds")])
def test_a_misspelled_sampler_flag_is_a_usage_error_that_suggests_the_flag(typo, meant, capsys, tmp_path):
    code, out, err = _sample_cli(capsys, tmp_path, "--text", "Hi.", "--prompt", "x.wav", "-o", "-", typo, "0.8")
    assert code == 2 and out == ""
    assert f"No such option: {typo} Did you mean {meant}?" in err


# ----------------------------------------------------------------------------- Synthesizer: a manifest of rows


def test_a_manifest_writes_every_good_row_then_names_the_failed_ones(tiny_run, espeak_corpus, tmp_path):
    from valle_cli.errors import PartialFailure
    from valle_cli.generation.synthesizer import Synthesizer

    synth = Synthesizer.load(tiny_run / "run")
    prompt = sorted((espeak_corpus / "spk00").glob("*.wav"))[0]
    table = tmp_path / "rows.csv"
    table.write_text(f"a|Good morning.|{prompt}\nb|Hello.|{tmp_path / 'missing.wav'}\nc|One. And two.|{prompt}\n")
    out = tmp_path / "out"
    with pytest.raises(PartialFailure, match=r"1 row\(s\) of .*rows.csv failed \(2 sampled, 0 already done\)") as info:
        synth.tts_manifest(table, out, GenerateConfig(max_frames=20), batch_size=2, seed=0)
    assert list(info.value.failures) == ["b"] and "no such file" in info.value.failures["b"]
    assert sorted(p.name for p in out.glob("*.npz")) == ["a.npz", "c.npz"]  # written before the error
    assert len(formats.read_codes(out / "c.npz").extra["segments"]) == 2  # the long-form row, sentence by sentence
    done = []
    with pytest.raises(PartialFailure, match=r"\(0 sampled, 2 already done\)"):
        synth.tts_manifest(table, out, GenerateConfig(max_frames=20), on_progress=done.append)
    assert sum(done) == 3  # every row counted, the skipped ones included
    (out / "a.npz").unlink()
    table.write_text(f"a|Good morning.|{prompt}\nc|One. And two.|{prompt}\n")
    report = synth.tts_manifest(table, out, GenerateConfig(max_frames=20))
    assert (report.rows, report.written, report.skipped, report.failures) == (2, 1, 1, {})


def test_manifest_ids_that_leave_the_output_folder_refuse_the_manifest(tiny_run, espeak_corpus, tmp_path):
    """A hostile rows file must not write (or, with --overwrite, replace) files outside -o."""
    from valle_cli.generation.synthesizer import Synthesizer

    synth = Synthesizer.load(tiny_run / "run")
    prompt = sorted((espeak_corpus / "spk00").glob("*.wav"))[0]
    out = tmp_path / "a" / "b" / "out"
    for bad in ("../../escaped", str(tmp_path / "absolute")):
        table = tmp_path / "rows.csv"
        table.write_text(f"fine|Good morning.|{prompt}\n{bad}|Hello.|{prompt}\n")
        with pytest.raises(InputError, match=r"rows.csv: 1 id\(s\) would write outside the output folder"):
            synth.tts_manifest(table, out, GenerateConfig(max_frames=5), overwrite=True)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.npz")) == []  # nothing at all
    table.write_text(f"spk/fine|Good morning.|{prompt}\n")  # a subfolder inside -o is fine
    synth.tts_manifest(table, out, GenerateConfig(max_frames=5))
    assert (out / "spk" / "fine.npz").is_file()


def test_durations_past_the_context_name_the_seconds_and_the_limit(tiny_run, espeak_corpus):
    from valle_cli.generation.synthesizer import Synthesizer

    synth = Synthesizer.load(tiny_run / "run")
    prompt = sorted((espeak_corpus / "spk00").glob("*.wav"))[0]
    limit = synth.model.config.max_positions
    with pytest.raises(InputError, match=rf"--duration 600: 600.00 s \(\d+ frames\) is past the model's context "
                                         rf"of {limit} positions \(room for"):
        synth.tts("Hello.", [prompt], GenerateConfig(mode="nar-len", steps=1), duration_seconds=600)
    with pytest.raises(InputError, match=rf"--continue-seconds 600 .*of {limit} positions"):
        synth.continuation([prompt], 600, GenerateConfig(mode="nar-len", steps=1))
    with pytest.raises(InputError, match=rf"in-fill of 600 s: .*of {limit} positions"):
        synth.infill([prompt], [prompt], GenerateConfig(mode="nar-len", steps=1), seconds=600)


def test_the_codes_encoder_and_the_prompts_read_codes_the_same_way(tiny_run, espeak_corpus):
    from valle_cli.evaluation.similarity import CodesEncoder

    encoder = CodesEncoder(tiny_run / "run", "cpu")
    wav = sorted((espeak_corpus / "spk00").glob("*.wav"))[0]
    npz = sorted((tiny_run / "codes" / "spk00").glob("*.npz"))[0]
    for path in (wav, npz):
        assert np.array_equal(encoder.codes(path), encoder._synth.prompt_codes([path], None))
    with pytest.raises(InputError, match="codes outside"):
        bad = formats.read_codes(npz)
        bad.codes[0, 0] = 64  # the tiny codec has 64 codes
        encoder._synth.codes_of(formats.codes_to_bytes(bad))


def test_int8_weights_sample_from_a_checkpoint_in_the_library_and_the_cli(tiny_run, espeak_corpus, tmp_path):
    from conftest import run_valle

    from valle_cli.generation.synthesizer import Synthesizer
    from valle_cli.model.int8 import Int8Linear
    from valle_cli.model.load import prepare_for_decoding

    synth = Synthesizer.load(tiny_run / "run", quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in synth.model.modules())
    assert synth.model.backbone.layers[0].attention.wqkv is not None  # fused, then quantized
    prompt = sorted((espeak_corpus / "spk00").glob("*.wav"))[0]
    codes = synth.tts("Hello there.", [prompt], replace(GREEDY, max_frames=10), seed=0)
    assert codes.codes.shape[0] == synth.model.config.n_codebooks and 1 <= codes.codes.shape[1] <= 10
    with pytest.raises(InputError, match="--quantize 'int4': expected none | int8"):
        prepare_for_decoding(synth.model, "int4")
    res = run_valle("sample", tiny_run / "run", "--text", "Hello.", "--prompt", prompt, "-o", tmp_path / "x.npz",
                    "--device", "cpu", "--quantize", "int8", "--max-seconds", "0.3", "--seed", "0")
    assert res.returncode == 0, res.stderr.decode()
    assert formats.read_codes(tmp_path / "x.npz").codes.shape[0] == synth.model.config.n_codebooks


@pytest.mark.parametrize("cfg", [0.0, 1.5], ids=["plain", "cfg"])
def test_the_fixed_shape_step_gives_the_dynamic_steps_tokens(cfg):
    model = model_for(seed=3)
    with torch.no_grad():
        model.head_ar.bias[V] = -100.0
    reqs = [request(0), request(1, text=3, prompt=5)]  # padded rows
    config = replace(GREEDY, max_frames=20, ar=SamplingParams(temperature=0.0, cfg_strength=cfg))
    dynamic = generate_ar(model, reqs, config)
    fixed = generate_ar(model, reqs, replace(config, fixed_shape=True))
    assert all(np.array_equal(a, b) for a, b in zip(dynamic, fixed, strict=True))
    with pytest.raises(InputError, match="--compile needs --arch transformer"):
        generate_ar(model_for("llama"), reqs, replace(GREEDY, fixed_shape=True))


@pytest.mark.parametrize("arch", ["transformer", "llama"])
@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
@torch.no_grad()
def test_passes_after_a_shared_prefix_give_the_whole_sequences_hidden_states(arch, cfg):
    from valle_cli.generation.generate import Passes, _examples, _layout

    model = model_for(arch, unified_positions=arch == "llama")
    assert model.config.task_after_prompt
    reqs = [request(0), request(1, text=3, prompt=5), request(2, text=9, prompt=0)]
    codes = [np.random.default_rng(i).integers(0, V, size=(K, t)) for i, t in enumerate((6, 9, 2))]
    passes = Passes(model, room=10)
    for kind, level in (("nar", 1), ("nar", 2), ("nar", 1)):  # the prefix is run once, by the first pass
        batch = _layout(model, _examples(reqs, kind, codes, level, cfg), "cpu")
        whole = model.hidden_states(batch)[0]
        shared, offsets = passes.hidden(batch)
        for r in range(len(batch.segment)):
            start, t = int(batch.bidir_start[r]), codes[r % len(reqs)].shape[1]
            torch.testing.assert_close(shared[r, start - offsets[r]:start - offsets[r] + t], whole[r, start:start + t],
                                       atol=1e-5, rtol=1e-5)


def test_nar_and_nar_len_tokens_with_and_without_the_shared_prefix(monkeypatch):
    from valle_cli.generation import generate

    model = model_for(seed=2)
    reqs = [request(0), request(1, text=3, prompt=5, duration=7), request(2, duration=4)]
    config = replace(GREEDY, mode="nar-len", steps=4, demask=SamplingParams(temperature=0.0, cfg_strength=1.0))
    reqs = [replace(r, duration=r.duration or 5) for r in reqs]
    shared = synthesize(model, reqs, config)
    monkeypatch.setattr(generate.Passes, "hidden", lambda self, batch: (self.model.hidden_states(batch)[0], None))
    whole = synthesize(model, reqs, config)
    assert all(np.array_equal(a, b) for a, b in zip(shared, whole, strict=True))


@pytest.mark.parametrize("arch", ["transformer", "llama"])
@pytest.mark.parametrize(("ar_cfg", "nar_cfg"), [(0.0, 0.0), (1.5, 1.0), (1.5, 0.0)], ids=["plain", "cfg", "ar-cfg"])
def test_the_nar_passes_reuse_the_ar_prefix_and_give_the_same_codes(arch, ar_cfg, nar_cfg, monkeypatch):
    from valle_cli.generation import generate

    model = model_for(arch, seed=4)
    with torch.no_grad():
        model.head_ar.bias[V] = -100.0
    reqs = [request(0), request(1, text=3, prompt=5), request(2, text=8, prompt=0)]
    config = replace(GREEDY, max_frames=9, ar=SamplingParams(temperature=0.0, cfg_strength=ar_cfg),
                     nar=SamplingParams(temperature=0.0, cfg_strength=nar_cfg))
    adopted = []
    adopt = generate.Passes.adopt
    monkeypatch.setattr(generate.Passes, "adopt", lambda self, *a: adopted.append(1) or adopt(self, *a))
    shared = synthesize(model, reqs, config)
    assert adopted == ([1] if (ar_cfg != 0) == (nar_cfg != 0) else [])  # the same rows: the AR's cache reused
    monkeypatch.setattr(generate.Passes, "hidden", lambda self, batch: (self.model.hidden_states(batch)[0], None))
    whole = synthesize(model, reqs, config)
    assert all(np.array_equal(a, b) for a, b in zip(shared, whole, strict=True))
