"""Tests for text_encoders.py and text_tokenizers.py: SD3 key layout, memory-mapped loading,
numerics against an independent float64 reference (and transformers when installed), both
tokenizers (against transformers / sentencepiece when installed), conditioning assembly, the
precompute CLI and sample.py from a prompt to a PNG on a tiny SD3-layout file."""
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import mmdit
import pipeline
import sample
import text_encoders as te
import vae as vae_lib
import weights
from text_encoders import CONFIGS, CLIPTextEncoder, SD3TextEncoder, T5Encoder
from text_tokenizers import CLIP_MERGES_ASSET, CharsMap, CLIPTokenizer, T5Tokenizer
from tiny_sd3 import spiece_model

from conftest import expect_one_line_error, read_png

ONE_THREAD = True
MANIFESTS = Path(__file__).parent / "manifests"
REPO = Path(__file__).parent.parent
P = te.weights.SD3_PREFIXES


def manifest(name, part=None):
    with open(MANIFESTS / name) as f:
        keys = json.load(f)
    return {k: list(v) for k, v in (keys[part] if part else keys).items()}


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def randomize(model, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_models(seed=0):
    """Random tiny CLIP-L, CLIP-G and T5 (test configs; vocabularies of the real tokenizers)."""
    models = {"clip_l": CLIPTextEncoder(CONFIGS["test-clip-l"]),
              "clip_g": CLIPTextEncoder(CONFIGS["test-clip-g"]),
              "t5xxl": T5Encoder(CONFIGS["test-t5"])}
    for i, m in enumerate(models.values()):
        randomize(m, seed + i)
    return models


# a hand-made T5 unigram vocabulary (ids < 64, the test T5's rows)
T5_PIECES = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
             + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,."]
             + [("▁a", -1.0), ("▁red", -2.0), ("▁re", -2.5), ("▁circle", -2.0),
                ("▁on", -2.0), ("▁blue", -2.0), ("▁background", -2.0), ("▁cat", -2.0),
                ("▁photo", -2.0), ("▁of", -2.0), ("ing", -2.0), ("▁the", -2.0), ("▁ca", -3.0),
                ("ts", -1.0)])


def write_t5_json(path, pieces=T5_PIECES):
    spec = {"added_tokens": [{"id": i, "content": p, "special": True}
                             for i, (p, _) in enumerate(pieces[:3])],
            "normalizer": None, "pre_tokenizer": {"type": "Metaspace"},
            "model": {"type": "Unigram", "unk_id": 2, "vocab": [[p, s] for p, s in pieces]}}
    Path(path).write_text(json.dumps(spec))
    return str(path)


@pytest.fixture(scope="module")
def t5_json(tmp_path_factory):
    return write_t5_json(tmp_path_factory.mktemp("t5vocab") / "t5_tokenizer.json")


@pytest.fixture(scope="module")
def clip_tok():
    return CLIPTokenizer.from_files()


@pytest.fixture(scope="module")
def tiny(t5_json, clip_tok):
    m = tiny_models()
    return SD3TextEncoder(m["clip_l"], m["clip_g"], m["t5xxl"], clip_tok, t5_json)


# ----------------------------------------------------------------------------------------------
# layout and loading


def test_keys_and_shapes_equal_the_manifest():
    want = manifest("sd3_text_encoder_keys.json", "present")
    with torch.device("meta"):
        enc = SD3TextEncoder(CLIPTextEncoder(CONFIGS["clip-l"]), CLIPTextEncoder(CONFIGS["clip-g"]),
                             T5Encoder(CONFIGS["t5-xxl"]), clip_tokenizer=object())
    assert {k: list(v.shape) for k, v in enc.state_dict().items()} == want
    assert (enc.context_dim, enc.pooled_dim) == (4096, 2048)
    for name, config in [("clip_l", "clip-l"), ("clip_g", "clip-g"), ("t5xxl", "t5-xxl")]:
        shapes = weights.strip_prefix(want, P[name])
        cls = te.T5Config if name == "t5xxl" else te.CLIPConfig
        act = {} if name == "t5xxl" else {"act": CONFIGS[config].act}
        assert cls.from_state_dict(shapes, **act) == CONFIGS[config]
    # the manifest's "uncertain" keys: CLIP-L's projection loads, the others are ignored
    extra = manifest("sd3_text_encoder_keys.json", "uncertain")
    assert set(weights.strip_prefix(extra, P["clip_l"])) == {
        "text_projection.weight", "text_model.embeddings.position_ids"}
    assert "text_model.embeddings.position_ids" in te.IGNORED_KEYS


def test_real_size_incl_clips_t5xxlfp16_file_loads_memory_mapped(tmp_path):
    """The full sd3_medium_incl_clips_t5xxlfp16 layout (MMDiT + VAE + CLIP-L + CLIP-G + T5-XXL,
    15.6 GB of fp16 zeros, sparse on disk) loads its text encoders in seconds, with the tensors
    in a mapping of the file and almost no memory."""
    shapes = {**manifest("sd3_medium_mmdit_keys.json"), **manifest("sd3_vae_keys.json"),
              **manifest("sd3_text_encoder_keys.json", "present")}
    header, pos = {}, 0
    for k in sorted(shapes):
        n = 2 * math.prod(shapes[k])
        header[k] = {"dtype": "F16", "shape": shapes[k], "data_offsets": [pos, pos + n]}
        pos += n
    text = json.dumps(header).encode()
    path = tmp_path / "sd3_medium_incl_clips_t5xxlfp16.safetensors"
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
    os.truncate(path, 8 + len(text) + pos)                      # sparse: no data written
    assert pos > 15e9
    script = textwrap.dedent(f"""
        import resource, sys, time
        sys.path.insert(0, {str(REPO)!r})
        import torch, text_encoders as te
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
        before, peak_before = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.time()
        enc = te.SD3TextEncoder.from_pretrained({str(path)!r})
        dt = time.time() - t0
        grew = max(rss() - before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before)
        t5 = enc.encoders["t5xxl"]
        assert t5.config == te.CONFIGS["t5-xxl"] and t5.shared is t5.encoder.embed_tokens
        assert enc.encoders["clip_g"].config == te.CONFIGS["clip-g"]
        w = t5.encoder.block[23].layer[1].DenseReluDense.wo.weight
        assert w.dtype == torch.float16 and w.shape == (4096, 10240)
        ptr, mapped = w.data_ptr(), False
        for line in open("/proc/self/maps"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            mapped |= lo <= ptr < hi and line.rstrip().endswith({path.name!r})
        assert mapped, "T5 weight is not in a mapping of the file"
        print(dt, grew)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seconds, grew = map(float, out.stdout.split())
    print(f"15.6 GB incl_clips_t5xxlfp16 file: encoders in {seconds:.2f} s, memory +{grew / 1e6:.0f} MB")
    assert seconds < 10 and grew < 0.3e9, (seconds, grew)


def test_t5_takes_either_embedding_key_and_ties_them(tmp_path):
    t5 = tiny_models()["t5xxl"]
    state = t5.state_dict()
    for keep in ("shared.weight", "encoder.embed_tokens.weight"):
        single = {k: v for k, v in state.items()
                  if k not in ("shared.weight", "encoder.embed_tokens.weight") or k == keep}
        loaded = te.load_encoder(single, "t5xxl", "file", {"max_distance": 20})
        assert loaded.shared is loaded.encoder.embed_tokens
        assert torch.equal(loaded.shared.weight, state[keep])
        ids = torch.randint(0, 64, (2, 9))
        with torch.no_grad():
            assert torch.equal(loaded(ids), t5(ids))
    # the release's t5xxl_fp8_e4m3fn file: 8-bit weights, converted when placed for compute
    fp8 = te.load_encoder({k: v.to(torch.float8_e4m3fn) for k, v in state.items()}, "t5xxl", "fp8",
                          {"max_distance": 20})
    with te.placed(fp8, "cpu", torch.float32, keep=True), torch.no_grad():
        assert rel_err(fp8(ids), t5(ids)) < 0.2  # e4m3 keeps 3 mantissa bits


def test_separate_files_and_diffusers_folder(tmp_path, t5_json):
    """The release's text_encoders/*.safetensors (bare keys) and a diffusers folder load too."""
    m = tiny_models(seed=3)
    ref = SD3TextEncoder(m["clip_l"], m["clip_g"], m["t5xxl"], t5_vocab=t5_json)
    files = {}
    for name, model in m.items():
        files[name] = tmp_path / f"{name}.safetensors"
        weights.save_file(model.state_dict(), files[name])
    configs = json.loads(ref.metadata()["text_encoders"])
    sep = SD3TextEncoder.from_pretrained(None, files["clip_l"], files["clip_g"], files["t5xxl"],
                                         t5_vocab=t5_json, configs=configs)
    root = tmp_path / "diffusers"
    for name, model in m.items():
        state = model.state_dict()
        if name == "t5xxl":
            del state["encoder.embed_tokens.weight"]
        weights.save_file(state, root / te.DIFFUSERS_FOLDERS[name] / "model.safetensors")
    (root / "tokenizer_3").mkdir()
    write_t5_json(root / "tokenizer_3" / "tokenizer.json")
    folder = SD3TextEncoder.from_pretrained(root, configs=configs)
    prompts = ["a red circle", ""]
    want = ref.encode(prompts)
    for enc in (sep, folder):
        for a, b in zip(enc.encode(prompts), want):
            assert torch.equal(a, b)


def test_bad_files_are_clear_errors(tmp_path, tiny):
    state = tiny.state_dict()
    meta = tiny.metadata()

    def save(s, name):
        path = tmp_path / name
        weights.save_file(s, path, meta)
        return path

    only_l = save({k: v for k, v in state.items() if k.startswith(P["clip_l"])}, "only_l.safetensors")
    with pytest.raises(weights.WeightsError, match=r"no clip_g text encoder.*--clip-g.*text_encoders/clip_g"):
        SD3TextEncoder.from_pretrained(only_l)
    unknown = save({**state, P["clip_g"] + "text_model.encoder.layers.0.extra.weight": torch.zeros(2)},
                   "unknown.safetensors")
    with pytest.raises(weights.WeightsError, match=r"1 unexpected: text_model\.encoder\.layers\.0\.extra"):
        SD3TextEncoder.from_pretrained(unknown)
    bad_shape = dict(state)
    bad_shape[P["t5xxl"] + "encoder.block.1.layer.0.SelfAttention.o.weight"] = torch.zeros(48, 5)
    with pytest.raises(weights.WeightsError, match=r"mis-shaped: encoder\.block\.1\.layer\.0\.SelfAttention"
                                                   r"\.o\.weight file \[48, 5\] vs model \[48, 24\]"):
        SD3TextEncoder.from_pretrained(save(bad_shape, "shape.safetensors"))
    no_proj = {k: v for k, v in state.items() if k != P["clip_g"] + "text_projection.weight"}
    with pytest.raises(weights.WeightsError, match="CLIP-G needs its text_projection"):
        SD3TextEncoder.from_pretrained(save(no_proj, "noproj.safetensors"))
    v10 = {k.replace("wi_0", "wi"): v for k, v in state.items() if "wi_1" not in k}
    with pytest.raises(weights.WeightsError, match="T5 v1.0"):
        SD3TextEncoder.from_pretrained(save(v10, "v10.safetensors"))
    mmdit_only = save({"model.diffusion_model.x": torch.zeros(1)}, "mmdit.safetensors")
    with pytest.raises(weights.WeightsError, match="sd3_medium_incl_clips"):
        SD3TextEncoder.from_pretrained(mmdit_only)


def test_missing_vocabularies_are_clear_errors(tmp_path, tiny):
    path = tmp_path / "enc.safetensors"
    tiny.save_pretrained(path)
    enc = SD3TextEncoder.from_pretrained(path)  # no T5 vocabulary anywhere near: fine until used
    with pytest.raises(FileNotFoundError, match=r"tokenizer_3/spiece\.model.*tokenizer_3/tokenizer\.json"
                                                r".*--no-t5"):
        enc.encode(["a cat"])
    with pytest.raises(FileNotFoundError, match=r"missing\.model: no such file.*--t5-vocab"):
        T5Tokenizer.from_files(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="no spiece.model or tokenizer.json"):
        T5Tokenizer.from_files(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"merges\.txt: no such file.*tokenizer/ folder"):
        CLIPTokenizer.from_files(tmp_path)
    bpe = tmp_path / "bpe.json"
    bpe.write_text(json.dumps({"model": {"type": "BPE", "vocab": {}}}))
    with pytest.raises(ValueError, match="not Unigram"):
        T5Tokenizer.from_files(bpe)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="not a T5 SentencePiece unigram vocabulary"):
        T5Tokenizer.from_files(garbage)
    # a vocabulary larger than the model's embedding is caught before indexing
    big = SD3TextEncoder(tiny.encoders["clip_l"], tiny.encoders["clip_g"], tiny.encoders["t5xxl"],
                         tiny.clip_tokenizer, write_t5_json(tmp_path / "big.json", T5_PIECES + [
                             (f"▁w{i}", -1.0) for i in range(20)]))
    with pytest.raises(ValueError, match="wrong vocabulary file"):
        big.encode(["w19"])
    # with T5 left out, no T5 vocabulary is needed
    context, _ = SD3TextEncoder.from_pretrained(path, use_t5=False).encode(["a cat"])
    assert context.shape == (1, 154, 48) and not context[:, 77:].any()


# ----------------------------------------------------------------------------------------------
# numerics: an independent float64 reference written from the formulas


def ref_layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps) * w + b


def ref_clip(sd, cfg, ids, eos=49407):
    """CLIP by the book, in float64, one head at a time: (penultimate, pooled, projected)."""
    sd = {k: v.double() for k, v in sd.items()}
    t = lambda name: sd["text_model." + name]  # noqa: E731
    B, L = ids.shape
    x = t("embeddings.token_embedding.weight")[ids] + t("embeddings.position_embedding.weight")[:L]
    causal = torch.triu(torch.full((L, L), -math.inf, dtype=torch.float64), 1)
    hd, outs = cfg.width // cfg.heads, [x]
    for i in range(cfg.layers):
        w = lambda n: t(f"encoder.layers.{i}.{n}")  # noqa: E731
        h = ref_layer_norm(x, w("layer_norm1.weight"), w("layer_norm1.bias"), cfg.eps)
        q, k, v = (h @ w(f"self_attn.{n}_proj.weight").T + w(f"self_attn.{n}_proj.bias") for n in "qkv")
        att = torch.zeros_like(x)
        for head in range(cfg.heads):
            s = slice(head * hd, (head + 1) * hd)
            scores = q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(hd) + causal
            att[..., s] = torch.softmax(scores, -1) @ v[..., s]
        x = x + att @ w("self_attn.out_proj.weight").T + w("self_attn.out_proj.bias")
        h = ref_layer_norm(x, w("layer_norm2.weight"), w("layer_norm2.bias"), cfg.eps)
        h = h @ w("mlp.fc1.weight").T + w("mlp.fc1.bias")
        h = h * torch.sigmoid(1.702 * h) if cfg.act == "quick_gelu" else 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + h @ w("mlp.fc2.weight").T + w("mlp.fc2.bias")
        outs.append(x)
    final = ref_layer_norm(x, t("final_layer_norm.weight"), t("final_layer_norm.bias"), cfg.eps)
    pooled = torch.stack([final[b, ids[b].tolist().index(eos)] for b in range(B)])
    projected = pooled @ sd["text_projection.weight"].T if "text_projection.weight" in sd else None
    return outs[-2], pooled, projected


def ref_bucket(rel, num_buckets, max_distance):
    """T5's relative position bucket for one integer, from the Mesh TensorFlow description."""
    half = num_buckets // 2
    base, n, exact = (half if rel > 0 else 0), abs(rel), half // 2
    if n < exact:
        return base + n
    return base + min(half - 1, exact + int(math.log(n / exact) / math.log(max_distance / exact)
                                            * (half - exact)))


def ref_t5(sd, cfg, ids):
    sd = {k: v.double() for k, v in sd.items()}
    B, L = ids.shape
    rms = lambda x, w: x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.eps) * w  # noqa: E731
    gelu_tanh = lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))  # noqa: E731
    table = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    bias = torch.stack([torch.stack([table[ref_bucket(kp - qp, cfg.num_buckets, cfg.max_distance)]
                                     for kp in range(L)]) for qp in range(L)])  # [Lq, Lk, H]
    x = sd["shared.weight"][ids]
    for i in range(cfg.layers):
        w = lambda n: sd[f"encoder.block.{i}.layer.{n}"]  # noqa: E731
        h = rms(x, w("0.layer_norm.weight"))
        q, k, v = (h @ w(f"0.SelfAttention.{n}.weight").T for n in "qkv")
        att = torch.zeros(B, L, cfg.heads * cfg.d_kv, dtype=torch.float64)
        for head in range(cfg.heads):
            s = slice(head * cfg.d_kv, (head + 1) * cfg.d_kv)
            scores = q[..., s] @ k[..., s].transpose(1, 2) + bias[..., head]   # no 1/sqrt(d)
            att[..., s] = torch.softmax(scores, -1) @ v[..., s]
        x = x + att @ w("0.SelfAttention.o.weight").T
        h = rms(x, w("1.layer_norm.weight"))
        h = gelu_tanh(h @ w("1.DenseReluDense.wi_0.weight").T) * (h @ w("1.DenseReluDense.wi_1.weight").T)
        x = x + h @ w("1.DenseReluDense.wo.weight").T
    return rms(x, sd["encoder.final_layer_norm.weight"])


def clip_ids(B=3, L=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49406, (B, L), generator=g)
    ids[:, 0] = 49406
    ends = [5, 40, 76][:B]
    for b, e in enumerate(ends):
        ids[b, e] = 49407
        ids[b, e + 1:] = 49407 if b % 2 else 0  # CLIP-L and CLIP-G padding
    return ids


@pytest.mark.parametrize("name", ["test-clip-l", "test-clip-g"])
def test_clip_equals_an_independent_float64_reference(name):
    model = randomize(CLIPTextEncoder(CONFIGS[name]), seed=1)
    ids = clip_ids()
    with torch.no_grad():
        got = model(ids)
    want = ref_clip(model.state_dict(), model.config, ids)
    for what, a, b in zip(("penultimate", "pooled", "projected"), got, want):
        if b is None:
            assert a is None and name == "test-clip-l"
            continue
        assert rel_err(a, b) <= 1e-5, (what, rel_err(a, b))


def test_t5_equals_an_independent_float64_reference():
    """Sequences longer than max_distance exercise the exact, logarithmic and clamped buckets."""
    cfg = CONFIGS["test-t5"]
    model = randomize(T5Encoder(cfg), seed=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids)
    assert rel_err(got, ref_t5(model.state_dict(), cfg, ids)) <= 1e-5
    for nb, md in [(32, 128), (8, 20)]:
        rel = torch.arange(-300, 301)
        want = torch.tensor([ref_bucket(r, nb, md) for r in rel.tolist()])
        assert torch.equal(te.relative_position_bucket(rel, nb, md), want)
    assert te.relative_position_bucket(torch.tensor([0, 1, -1, 7, 8, 127, 128, -500]), 32, 128).tolist() \
        == [0, 17, 1, 23, 24, 31, 31, 15]


def test_against_transformers():
    """Our modules take transformers' state dicts as they are (same key names) and give the same
    penultimate states, pooled outputs and T5 outputs (relative error <= 1e-5, float32)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    for name, act, proj in [("clip_l", "quick_gelu", 16), ("clip_g", "gelu", 24)]:
        cfg = transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
            num_attention_heads=3, max_position_embeddings=77, hidden_act=act, projection_dim=proj,
            eos_token_id=49407)
        ref = randomize(transformers.CLIPTextModelWithProjection(cfg).eval(), seed=5)
        ours = te.load_encoder(dict(ref.state_dict()), name, "transformers", {"heads": 3})
        ids = clip_ids(seed=3)
        with torch.no_grad():
            out = ref(ids, output_hidden_states=True)
            pooled = ref.text_model(ids).pooler_output
            pen, pool, projected = ours(ids)
        assert rel_err(pen, out.hidden_states[-2]) <= 1e-5
        assert rel_err(pool, pooled) <= 1e-5
        assert rel_err(projected, out.text_embeds) <= 1e-5
    cfg = transformers.T5Config(vocab_size=64, d_model=48, d_kv=6, d_ff=40, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                feed_forward_proj="gated-gelu", use_cache=False)
    ref = randomize(transformers.T5EncoderModel(cfg).eval(), seed=6)
    ours = te.load_encoder(dict(ref.state_dict()), "t5xxl", "transformers", {"max_distance": 20})
    ids = torch.randint(0, 64, (2, 45))
    with torch.no_grad():
        assert rel_err(ours(ids), ref(ids).last_hidden_state) <= 1e-5


# ----------------------------------------------------------------------------------------------
# tokenizers

WORDS = ("a an the photo painting portrait of cat dog astronaut riding horse on moon city street "
         "at night cyberpunk neon lights highly detailed 8k octane render trending artstation by "
         "greg rutkowski beautiful landscape mountains lake sunset golden hour cinematic lighting "
         "close-up macro shot woman man child old young red blue green yellow purple orange black "
         "white wearing hat glasses sitting flying underwater forest castle dragon robot spaceship "
         "watercolor oil sketch anime hyperrealistic unreal engine volumetric fog bokeh 35mm f/1.8 "
         "don't can't it's he's she'd we'll they've I'm y'all o'clock rock'n'roll").split()
PUNCT = list(",.;:!?-()[]{}\"'/\\|@#$%^&*_+=<>~`")
SPACES = [" ", "  ", "\t", "\n", " \n ", "   ", "\r\n"]
NON_ASCII = ["café", "naïve", "Ærøskøbing", "straße", "İstanbul", "ΣΊΣΥΦΟΣ", "東京の夜景", "猫", "🐱🚀",
             "“quoted”", "‘single’", "em—dash", "…", "\u00a0nbsp", "ﬁne ligature", "ｆｕｌｌｗｉｄｔｈ",
             "e\u0301 combining", "½ cup", "x²", "Ⅻ", "١٢٣", "привет мир", "Ελληνικά", "한국어",
             "\u200bzero-width", "tab\u3000ideographic", "©®™", "€100", "ﬀ", "Å", "ǅ", "a▁b", "▁x"]


def ascii_prompts(n, seed=0):
    """Varied English prompts: punctuation, numbers, casing, long prompts, white space, specials."""
    r = random.Random(seed)
    out = ["", " ", "a", "A", "\t\n", "a photo of a cat", "A PHOTO OF A CAT", "<|endoftext|>",
           "a <|startoftext|> b", "x <|ENDOFTEXT|> y", "it's", "IT'S", "'s", "''s", "!'s", "&amp; &lt;",
           "3.14159", "1,000,000", "2024-01-01", "http://example.com/a_b?c=d", "user@example.com",
           "a" * 300, "ab" * 100, " ".join(["word"] * 120), "</s>", "<pad> <unk>", "<extra_id_0>",
           "hello__world", "snake_case_name", "CamelCaseWord", "x" + "!" * 50]
    while len(out) < n:
        parts = []
        for _ in range(r.choice([1, 2, 3, 5, 8, 12, 20, 40, 90])):
            t = r.random()
            w = (r.choice(WORDS) if t < 0.65 else r.choice(PUNCT) * r.choice([1, 1, 2, 3]) if t < 0.8
                 else str(r.choice([0, 7, 42, 1024, 3.5, 2.25, 1920, 10 ** 12])) if t < 0.92
                 else r.choice(WORDS) + r.choice(PUNCT) + r.choice(WORDS))
            c = r.random()
            w = (w.upper() if c < 0.1 else w.capitalize() if c < 0.2
                 else "".join(ch.upper() if r.random() < .5 else ch for ch in w) if c < 0.25 else w)
            parts += [w, r.choice(SPACES) if r.random() < 0.15 else "" if r.random() < 0.1 else " "]
        s = "".join(parts)
        out.append(r.choice(SPACES) + s + r.choice(SPACES) if r.random() < 0.1 else s)
    return out[:n]


def non_ascii_prompts(n, seed=1):
    r = random.Random(seed)
    out = list(NON_ASCII)
    while len(out) < n:
        out.append(" ".join(r.choice(WORDS + NON_ASCII) for _ in range(r.choice([2, 4, 8]))))
    return out


def test_clip_tokenizer_ids_padding_and_truncation(clip_tok):
    tok = clip_tok
    assert tok.tokens("a photo of a cat") == [320, 1125, 539, 320, 2368]  # CLIP's well-known ids
    assert tok.tokens("  A PHOTO\tof\na  Cat ") == tok.tokens("a photo of a cat")
    assert (tok.start_id, tok.end_id, len(tok.vocab)) == (49406, 49407, 49408)
    assert tok.vocab["!"] == 0 and tok.vocab["a</w>"] == 320
    assert tok.tokens("it's") == tok.tokens("it") + tok.tokens("'s")
    assert tok.tokens("<|endoftext|>") == [49407]  # the exact special text is the special token
    ids_l, ids_g = tok(["", "a cat"], tok.end_id), tok(["", "a cat"], 0)
    assert ids_l.shape == ids_g.shape == (2, 77)
    assert ids_l[0].tolist() == [49406] + [49407] * 76                # the empty prompt, CLIP-L
    assert ids_g[0].tolist() == [49406, 49407] + [0] * 75             # and CLIP-G
    assert ids_g[1, :4].tolist() == [49406, 320, 2368, 49407] and not ids_g[1, 4:].any()
    long = tok([" ".join(["cat"] * 100)], 0)[0]
    assert long.tolist() == [49406] + [2368] * 75 + [49407]            # cut to 75 tokens


def test_clip_tokenizer_equals_transformers_on_thousands_of_prompts(tmp_path, clip_tok):
    """3,000 varied English prompts and 400 non-ASCII ones give the ids of transformers'
    CLIPTokenizer (the reference's) built from vocab.json + merges.txt; CLIP-G is the same
    tokenizer padded with 0 (the reference's SDXLClipGTokenizer)."""
    transformers = pytest.importorskip("transformers")
    import gzip
    with gzip.open(CLIP_MERGES_ASSET, "rt", encoding="utf-8") as f:
        merges = [line for line in f.read().split("\n")[1:] if line]
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # vocab.json as HF built it
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    symbols += [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    ref = transformers.CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    ours_from_files = CLIPTokenizer.from_files(tmp_path)
    report = {}
    for kind, prompts in [("ascii", ascii_prompts(3000)), ("non-ascii", non_ascii_prompts(400))]:
        want = ref(prompts, padding="max_length", max_length=77, truncation=True,
                   return_tensors="pt")["input_ids"]
        got_l, got_g = clip_tok(prompts, clip_tok.end_id), clip_tok(prompts, 0)
        assert torch.equal(ours_from_files(prompts, 49407), got_l)
        for p, l_ids, g_ids in zip(prompts, got_l, got_g):  # G: L's ids, 0 after the end token
            n = 2 + min(len(clip_tok.tokens(p)), 75)
            assert torch.equal(g_ids[:n], l_ids[:n]) and not g_ids[n:].any()
        bad = [p for p, a, b in zip(prompts, got_l, want) if not torch.equal(a, b)]
        report[kind] = (len(prompts), len(bad), bad[:5])
    print("CLIP tokenizer vs transformers (prompts, differing, examples):", report)
    assert report["ascii"][1] == 0 and report["non-ascii"][1] == 0


def test_t5_unigram_tokenizer_on_a_hand_made_vocabulary(t5_json):
    tok = T5Tokenizer.from_files(t5_json)
    ids = {p: i for i, (p, _) in enumerate(T5_PIECES)}
    assert tok.tokens("a red circle") == [ids["▁a"], ids["▁red"], ids["▁circle"]]
    # the most probable segmentation, not the longest first piece: ▁ca + ts (-4) beats ▁cat + s (-7)
    assert tok.tokens("cats") == [ids["▁ca"], ids["ts"]] and tok.tokens("cat") == [ids["▁cat"]]
    assert tok.tokens("redd") == [ids["▁red"], ids["d"]]             # -7, not ▁re + d + d (-12.5)
    assert tok.tokens("  A\tRED\n") == [ids["▁"], 2, ids["▁"], 2]      # no lower-casing: unknown
    assert tok.tokens("a €€€b") == [ids["▁a"], ids["▁"], 2, ids["b"]]   # a run of <unk> is one
    assert tok.tokens("</s>") == [1]                                   # specials in the text
    out = tok(["a cat", "", "cat " * 100], length=8)
    assert out.tolist()[:2] == [[ids["▁a"], ids["▁cat"], 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert out[2].tolist() == [ids["▁cat"]] * 7 + [1]                  # cut, then </s>


def test_spiece_model_and_precompiled_charsmap(tmp_path, t5_json):
    """The protobuf reader gives the tokenizer.json's ids; the double-array normaliser replaces
    the longest matching rule ('AB' -> 'x' before 'A' -> 'a') and copies the rest."""
    units = [0] * 80
    units[0] = 1 << 10                                   # root, children at 1 ^ byte
    units[64] = 0x41 | 1 << 8 | 4 << 10                  # 'A': has a leaf, children at 64 ^ 4 ^ byte
    units[68] = 1 << 31 | 0                              # leaf: 'A' -> strings[0:] = "a"
    units[6] = 0x42 | 1 << 8 | 1 << 10                   # 'AB'
    units[7] = 1 << 31 | 2                               # leaf: 'AB' -> strings[2:] = "x"
    trie = b"".join(u.to_bytes(4, "little") for u in units)
    charsmap = len(trie).to_bytes(4, "little") + trie + b"a\0x\0"
    assert CharsMap(charsmap).normalize("ABAC Ä") == "xaC Ä"
    path = tmp_path / "spiece.model"
    path.write_bytes(spiece_model(T5_PIECES, charsmap=charsmap))
    sp, js = T5Tokenizer.from_files(tmp_path), T5Tokenizer.from_files(t5_json)
    assert sp.source == str(path)                         # a folder: spiece.model first
    assert [(p, round(s, 6)) for p, (_, s) in sp.pieces.items()] == [(p, s) for p, s in T5_PIECES]
    assert sp.specials["<extra_id_0>"] == len(T5_PIECES) + 99  # T5's sentinels follow the pieces
    for text in ["a red circle", "the photo of a cat, 2024.", "  blue\tbackground ", ""]:
        assert sp.tokens(text) == js.tokens(text)
    assert sp.tokens("A cat") == js.tokens("a cat")        # the charsmap at work


def test_t5_tokenizer_equals_transformers_and_sentencepiece(tmp_path):
    """A small unigram model trained with the real SentencePiece (nmt_nfkc normalisation): our
    ids from its spiece.model and from transformers' tokenizer.json equal transformers'
    T5Tokenizer (the reference's) on 3,000 English and 400 non-ASCII prompts. sentencepiece
    itself differs only on special-token texts and on ties between equal-score segmentations."""
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    corpus = [c for c in ascii_prompts(4000, seed=5) + non_ascii_prompts(300, seed=6) if c.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "spiece"), vocab_size=800,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        normalization_rule_name="nmt_nfkc", character_coverage=0.98, minloglevel=2)
    ref = transformers.T5Tokenizer.from_pretrained(str(tmp_path))
    ref.save_pretrained(str(tmp_path / "hf"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model"))
    ours = T5Tokenizer.from_files(tmp_path / "spiece.model")
    ours_json = T5Tokenizer.from_files(tmp_path / "hf" / "tokenizer.json")
    assert ours.charsmap is not None and ours.charsmap.normalize("ｆｕｌｌ") == "full"
    report = {}
    for kind, prompts in [("ascii", ascii_prompts(3000)), ("non-ascii", non_ascii_prompts(400))]:
        want = ref(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
        got = ours(prompts, 77).tolist()
        assert got == ours_json(prompts, 77).tolist()
        bad = [p for p, a, b in zip(prompts, got, want) if a != b]
        sp_bad = [p for p in prompts if ours.tokens(p) != sp.encode(p)]
        report[kind] = (len(prompts), len(bad), bad[:5], len(sp_bad), sp_bad[:5])
    print("T5 tokenizer vs transformers (prompts, differing, examples, vs sentencepiece, examples):", report)
    assert report["ascii"][1] == 0 and report["non-ascii"][1] == 0


# ----------------------------------------------------------------------------------------------
# SD3 conditioning


def test_encode_assembles_sd3_conditioning(tiny):
    prompts = ["a red circle on a blue background", "", "A photo of a cat, 2024."]
    context, pooled = tiny.encode(prompts)
    assert context.shape == (3, 154, 48) and pooled.shape == (3, 32)
    assert context.dtype == pooled.dtype == torch.float32 and context.device.type == "cpu"
    tok, (L, G, T5) = tiny.clip_tokenizer, tiny.encoders.values()
    with torch.no_grad():
        hl, pl, _ = L(tok(prompts, tok.end_id))
        hg, _, pg = G(tok(prompts, 0))
        t5 = T5(tiny.t5_tokenizer(prompts, 77))
    assert torch.equal(context[:, :77, :16], hl)          # CLIP-L penultimate
    assert torch.equal(context[:, :77, 16:40], hg)        # then CLIP-G
    assert not context[:, :77, 40:].any()                 # zero-padded to the T5 width
    assert torch.equal(context[:, 77:], t5)               # then T5's 77 tokens
    assert torch.equal(pooled, torch.cat([pl, pg], -1))   # L un-projected, G projected
    one = [tiny.encode([p]) for p in prompts]              # a prompt's encoding is batch-independent
    assert torch.allclose(torch.cat([c for c, _ in one]), context, atol=1e-6)
    assert torch.allclose(torch.cat([p for _, p in one]), pooled, atol=1e-6)
    small = tiny.encode(prompts, batch_size=1)
    assert torch.allclose(small[0], context, atol=1e-6)
    with pytest.raises(ValueError, match="list of prompts"):
        tiny.encode("a cat")


def test_no_t5_means_zero_t5_rows(tiny):
    no_t5 = SD3TextEncoder(tiny.encoders["clip_l"], tiny.encoders["clip_g"], None,
                           tiny.clip_tokenizer, context_dim=48)
    with_t5, without = tiny.encode(["a cat"]), no_t5.encode(["a cat"])
    assert without[0].shape == (1, 154, 48) and not without[0][:, 77:].any()
    assert torch.equal(without[0][:, :77], with_t5[0][:, :77]) and torch.equal(without[1], with_t5[1])
    assert SD3TextEncoder(tiny.encoders["clip_l"], tiny.encoders["clip_g"], None,
                          tiny.clip_tokenizer).context_dim == 4096  # SD3's width without T5


def test_offload_puts_the_original_weights_back(tmp_path, tiny, t5_json):
    """With offload, weights are copied (here: converted fp16 -> fp32) only while encoding and
    the memory-mapped originals are put back; without, they are converted once and kept."""
    path = tmp_path / "fp16.safetensors"
    weights.save_file({k: v.half() for k, v in tiny.state_dict().items()}, path, tiny.metadata())
    enc = SD3TextEncoder.from_pretrained(path, t5_vocab=t5_json)
    t5 = enc.encoders["t5xxl"]
    w = t5.encoder.block[0].layer[0].SelfAttention.q.weight
    ptr = w.data_ptr()
    with te.placed(t5, "cpu", torch.float32, keep=False):
        assert w.dtype == torch.float32 and t5.shared.weight.dtype == torch.float32
    assert w.dtype == torch.float16 and w.data_ptr() == ptr and t5.shared is t5.encoder.embed_tokens
    context, _ = enc.to("cpu").encode(["a cat"])          # on the CPU: converted once, kept
    assert w.dtype == torch.float32
    want, _ = tiny.encode(["a cat"])
    assert torch.allclose(context, want, atol=2e-2, rtol=1e-2)
    assert te.auto_dtype("t5xxl", "cuda") == torch.bfloat16 and te.auto_dtype("clip_g", "cuda") == torch.float16
    assert te.auto_dtype("t5xxl", "cpu") == torch.float32


# ----------------------------------------------------------------------------------------------
# the precompute CLI and sample.py


def sd3_file(folder, tiny, name="tiny_sd3.safetensors"):
    """A tiny SD3-layout single file: MMDiT (model.diffusion_model.), VAE (first_stage_model.)
    and CLIP-L, CLIP-G, T5 (text_encoders.*), with the T5 vocabulary beside it."""
    torch.manual_seed(0)
    cfg = mmdit.MMDiTConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2, in_channels=4,
                            out_channels=4, pos_embed_max_size=16, pooled_dim=32, context_dim=48,
                            qk_norm=True)
    model = randomize(mmdit.MMDiT(cfg), seed=9, std=0.05)
    vae = vae_lib.VAE("test")
    state = {**{P["mmdit"] + k: v for k, v in model.state_dict().items()},
             **{P["vae"] + k: v for k, v in vae.state_dict().items()}, **tiny.state_dict()}
    write_t5_json(os.path.join(folder, "t5_tokenizer.json"))
    path = os.path.join(folder, name)
    weights.save_file(state, path, {
        **tiny.metadata(),
        "config": json.dumps({**asdict(cfg), **{k: getattr(vae.config, k)
                                                for k in ("norm_groups", "scale", "shift")}}),
        "text_encoder": json.dumps({"name": "sd3", "t5_vocab": "t5_tokenizer.json"}),
        "sampler": json.dumps({"steps": 2, "cfg": 2.0, "shift": 1.0, "sampler": "euler"}),
        "sizes": json.dumps([[16, 16]])})
    return path


@pytest.fixture(scope="module")
def sd3_ckpt(tmp_path_factory, tiny):
    return sd3_file(str(tmp_path_factory.mktemp("sd3")), tiny)


def test_precompute_cli_writes_shards_sample_reads(sd3_ckpt, tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    lines = ["a red circle", "a blue cat", "", "the photo of a cat", "a red background"]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "cond"
    argv = ["--ckpt", sd3_ckpt, "--prompts", str(prompts), "--out", str(out), "--shard-size", "2",
            "--device", "cpu", "--save-dtype", "fp32"]
    te.main(argv)
    assert "cond-00001.safetensors: prompts 2..3 of 4" in capsys.readouterr().out
    files = sorted(os.listdir(out))
    assert files == ["cond-00000.safetensors", "cond-00001.safetensors", "config.json"]
    given = [p for p in lines if p]  # blank lines are skipped, as in sample.py
    names, tensors = te.read_shards(out)
    assert names == given
    context, pooled = tiny.encode(given + [""])
    assert torch.allclose(tensors["context"], context[:-1], atol=1e-6)
    assert torch.allclose(tensors["pooled"], pooled[:-1], atol=1e-6)
    cond = pipeline.load_cond(out / "cond-00001.safetensors")
    assert cond.context.shape == (2, 154, 48) and cond.uncond_pooled.shape == (1, 32)
    assert torch.allclose(cond.uncond_context, context[-1:], atol=1e-6)
    assert json.loads(weights.load_metadata(out / "cond-00001.safetensors")["prompts"]) == given[2:]
    config = json.loads((out / "config.json").read_text())
    assert config["context"] == [154, 48] and config["t5_used"] and config["shards"] == 2
    # a second run keeps finished shards; fp16 by default
    mtime = os.path.getmtime(out / "cond-00000.safetensors")
    te.main(argv + ["--quiet"])
    assert os.path.getmtime(out / "cond-00000.safetensors") == mtime
    te.main(["--ckpt", sd3_ckpt, "--prompts", "a cat", "--out", str(tmp_path / "h"), "--device",
             "cpu", "--quiet", "--no-t5"])
    h = weights.load_file(tmp_path / "h" / "cond-00000.safetensors")
    assert h["context"].dtype == torch.float16 and not h["context"][:, 77:].any()


def test_precompute_cli_errors_are_one_line(sd3_ckpt, tmp_path, capsys, tiny):
    base = ["--out", str(tmp_path / "o"), "--device", "cpu"]
    expect_one_line_error(te.main, capsys, ["--ckpt", sd3_ckpt] + base, "no prompts")
    expect_one_line_error(te.main, capsys, ["--prompts", "x"] + base, "--ckpt")
    expect_one_line_error(te.main, capsys, ["--ckpt", sd3_ckpt, "--prompts", "x", "--t5-lenght", "9"],
                          "--t5-lenght", "--t5-length")
    bare = tmp_path / "bare.safetensors"                  # encoders without a T5 vocabulary nearby
    tiny.save_pretrained(bare)
    err = expect_one_line_error(te.main, capsys, ["--ckpt", str(bare), "--prompts", "x"] + base,
                                "tokenizer_3/spiece.model", "--t5-vocab", "--no-t5")
    assert "bare.safetensors" in err
    expect_one_line_error(te.main, capsys, ["--ckpt", str(tmp_path / "none.safetensors"),
                                            "--prompts", "x"] + base, "none.safetensors")


def test_sample_py_from_a_prompt_to_a_png(sd3_ckpt, tmp_path, capsys):
    """One tiny SD3-layout file (MMDiT + VAE + text encoders): sample.py encodes the prompt with
    CLIP-L, CLIP-G and T5 and writes a PNG; --cond with precomputed shards gives the same image."""
    a, b = tmp_path / "a", tmp_path / "b"
    sample.main(["--ckpt", sd3_ckpt, "--prompt", "a red circle", "--out", str(a), "--device", "cpu",
                 "--quiet"])
    image = read_png(a / "000.png")
    assert image.shape == (16, 16, 3) and image.std() > 0
    pipe = pipeline.load_pipeline(sd3_ckpt)
    assert isinstance(pipe.text_encoder, SD3TextEncoder) and pipe.text_encoder.encoders["t5xxl"] is not None
    te.main(["--ckpt", sd3_ckpt, "--prompts", "a red circle", "--out", str(tmp_path / "cond"),
             "--device", "cpu", "--save-dtype", "fp32", "--quiet"])
    sample.main(["--ckpt", sd3_ckpt, "--cond", str(tmp_path / "cond" / "cond-00000.safetensors"),
                 "--out", str(b), "--device", "cpu", "--quiet"])
    assert np.abs(read_png(b / "000.png") - image).max() <= 1
    # a checkpoint without encoders still says what to do, in one line
    bare = tmp_path / "mmdit_only.safetensors"
    state = {k: v for k, v in weights.load_file(sd3_ckpt).items() if not k.startswith("text_encoders.")}
    weights.save_file(state, bare, weights.load_metadata(sd3_ckpt))
    expect_one_line_error(sample.main, capsys, ["--ckpt", str(bare), "--prompt", "x", "--out",
                                                str(tmp_path / "c"), "--device", "cpu"],
                          "text_encoders.py", "--cond")


def test_sample_py_takes_encoders_from_the_file_its_metadata_names(sd3_ckpt, tmp_path, capsys):
    """An MMDiT file can name a separate encoders file (like its VAE): "text_encoder":
    {"name": "sd3", "file": ..., "t5_vocab": ...}, paths relative to the checkpoint."""
    state = weights.load_file(sd3_ckpt)
    meta = weights.load_metadata(sd3_ckpt)
    weights.save_file({k: v for k, v in state.items() if k.startswith("text_encoders.")},
                      tmp_path / "encoders.safetensors", {"text_encoders": meta["text_encoders"]})
    (tmp_path / "vocab").mkdir()
    write_t5_json(tmp_path / "vocab" / "t5.json")
    meta["text_encoder"] = json.dumps({"name": "sd3", "file": "encoders.safetensors",
                                       "t5_vocab": "vocab/t5.json"})
    ckpt = tmp_path / "mmdit.safetensors"
    weights.save_file({k: v for k, v in state.items() if not k.startswith("text_encoders.")}, ckpt, meta)
    pipe = pipeline.load_pipeline(ckpt)
    want = pipeline.encode(pipeline.load_pipeline(sd3_ckpt), ["a red circle"])
    got = pipeline.encode(pipe, ["a red circle"])
    assert torch.equal(got.context, want.context) and torch.equal(got.uncond_pooled, want.uncond_pooled)
    os.remove(tmp_path / "encoders.safetensors")
    expect_one_line_error(sample.main, capsys, ["--ckpt", str(ckpt), "--prompt", "x", "--out",
                                                str(tmp_path / "o"), "--device", "cpu"],
                          str(tmp_path / "encoders.safetensors"), "does not exist")


def test_train_ladd_distils_an_sd3_layout_file_from_prompts(sd3_ckpt, tmp_path):
    """The real-SD3 path end to end on a tiny file: prompts -> CLIP/T5 conditioning -> teacher
    data -> a student whose metadata finds the teacher's encoders, sampled from a prompt."""
    import train_ladd
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nthe photo of a cat\n")
    run = tmp_path / "run"
    train_ladd.main(["--preset", "test", "--teacher", sd3_ckpt, "--prompts", str(prompts),
                     "--out", str(run), "--data-dir", str(tmp_path / "data"), "--device", "cpu"])
    spec = json.loads(weights.load_metadata(run / "model.safetensors")["text_encoder"])
    assert spec["file"] == os.path.abspath(sd3_ckpt) and os.path.isabs(spec["t5_vocab"])
    sample.main(["--ckpt", str(run), "--prompt", "a red circle", "--out", str(tmp_path / "s"),
                 "--device", "cpu", "--quiet"])
    assert read_png(tmp_path / "s" / "000.png").shape == (16, 16, 3)
