import json

import pytest

from jsonextract.config import core as C
from jsonextract.data.records import read_jsonl
from jsonextract.decoding.extractor import Extractor
from jsonextract.models.inference import load_for_inference
from jsonextract.data.prompt import PromptBuilder
from jsonextract.data.schema import SchemaError, validation_error
from conftest import SNIPS


@pytest.fixture(scope="module")
def extractor(tiny_model, snips_schema):
    # fp32, not the default `auto` (bf16 where bf16 products measure faster): these tests compare the loop with
    # references exactly; bf16 inference has its own test below.
    lm = load_for_inference(C.ModelConfig(name=str(tiny_model), inference_dtype="float32"), None)
    return Extractor(lm.model, lm.tokenizer, PromptBuilder(C.PromptConfig(), snips_schema),
                     C.DecodingConfig(max_new_tokens=48, batch_size=25))


def test_untrained_model_constrained_on_50_snips_texts(extractor, snips_schema):
    recs = [r for r in read_jsonl(SNIPS / "test.jsonl")][:50]
    results = extractor.extract([r.text for r in recs])
    assert len(results) == 50
    for res in results:
        if res.valid:
            assert res.error is None and validation_error(res.output, snips_schema) is None
            assert json.loads(res.raw) == res.output
        else:
            assert res.output is None and res.reason in ("truncated", "invalid_json", "schema_invalid")
    assert sum(r.valid for r in results) > 0  # the grammar does let an untrained model finish objects


def test_tiny_budget_reports_truncated(extractor):
    res = extractor.extract(["play some jazz"], max_new_tokens=3)[0]
    assert not res.valid and res.reason == "truncated" and res.output is None


def test_per_item_schema_and_invalid_schema(extractor):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    res = extractor.extract(["anything"], schemas=[schema])[0]
    assert res.valid and isinstance(res.output["ok"], bool)
    with pytest.raises(SchemaError):
        extractor.extract(["x"], schemas=[{"type": "nonsense"}])


def test_over_long_input_error_when_truncation_off(extractor):
    import dataclasses
    ex = dataclasses.replace(extractor, truncate_input=False, max_prompt_tokens=32)
    res = ex.extract(["play " * 100])[0]
    assert res.reason == "input_too_long"


def test_compiled_grammars_are_a_bounded_lru(extractor):
    import dataclasses
    ex = dataclasses.replace(extractor, grammar_cache_size=2)
    schemas = [{"type": "object", "properties": {f"k{i}": {"type": "boolean"}}, "required": [f"k{i}"],
                "additionalProperties": False} for i in range(3)]
    for s in schemas + schemas[:1]:
        ex.grammar(s)
    info = ex._compiled.cache_info()
    assert info.currsize == 2 and info.misses == 4  # the first schema was evicted by the third, compiled again


@pytest.mark.parametrize("data", ["snips", "restaurant8k"])
def test_grammar_accepts_what_the_model_was_trained_to_write(extractor, data):
    """The training targets' token sequences (keys in schema order, then eos) are accepted by the grammar the
    decoder compiles for the same schema, token by token, to its end: training and decoding agree on the form.
    (With the grammar compiled from a key-sorted copy of the schema, Restaurant-8k's targets, whose keys are not
    in alphabetical order, were refused at their second key.)"""
    import xgrammar as xgr
    from jsonextract.data.schema import load_schema
    schema = load_schema(SNIPS.parent / data / "schema.json")
    assert list(schema["properties"]) != sorted(schema["properties"]) or data == "snips"
    prompt = PromptBuilder(C.PromptConfig(), schema)
    recs = [r for r in read_jsonl(SNIPS.parent / data / "train.jsonl") if r.ok][:40]
    for r in recs:
        matcher = xgr.GrammarMatcher(extractor.grammar(schema))
        ids = prompt.encode_answer(extractor.tokenizer, r.target)
        accepted = [matcher.accept_token(t) for t in ids]
        assert all(accepted), (prompt.answer_text(r.target), accepted.index(False))
        assert matcher.is_terminated()


# ---------------------------------------------------------------------------------------------- jump-forward

JUMP_SCHEMAS = {
    "enum and integer": {"type": "object", "properties": {
        "intent": {"enum": ["PlayMusic", "AddToPlaylist", "RateBook", "GetWeather"]}, "stars": {"type": "integer"}},
        "required": ["intent", "stars"]},
    "nested objects": {"type": "object", "properties": {"booking": {"type": "object", "properties": {
        "restaurant": {"type": "object", "properties": {"name": {"type": "string"}, "open": {"type": "boolean"}},
                       "required": ["name", "open"]}, "people": {"type": "integer"}},
        "required": ["restaurant", "people"]}}, "required": ["booking"]},
    "arrays": {"type": "object", "properties": {"artists": {"type": "array", "items": {"type": "string"}},
                                                "years": {"type": "array", "items": {"type": "integer"}}},
               "required": ["artists", "years"]},
    "optional fields (SNIPS)": None,
}


@pytest.mark.parametrize("kind", list(JUMP_SCHEMAS))
def test_jump_forward_gives_the_step_by_step_output_in_fewer_passes(extractor, snips_schema, kind):
    """Jump-forward feeds the grammar-forced tokens in one pass and keeps those the model agrees with: the tokens,
    outputs and confidences are those of one-pass-per-token decoding on the same model."""
    import dataclasses
    schema = JUMP_SCHEMAS[kind] or snips_schema
    texts = [r.text for r in read_jsonl(SNIPS / "test.jsonl")][:12]
    runs = {}
    for jf in (False, True):
        ex = Extractor(extractor.model, extractor.tokenizer, PromptBuilder(C.PromptConfig(), schema),
                       dataclasses.replace(extractor.cfg, jump_forward=jf, max_new_tokens=40))
        runs[jf] = (ex.extract(texts), ex.stats)
    (step, st0), (jump, st1) = runs[False], runs[True]
    assert [r.raw for r in jump] == [r.raw for r in step]
    assert [r.output_tokens for r in jump] == [r.output_tokens for r in step]
    for a, b in zip(jump, step):
        assert a.valid == b.valid and a.output == b.output
        assert (a.confidence or {}).keys() == (b.confidence or {}).keys()
        assert all(abs(a.confidence[p] - b.confidence[p]) < 1e-4 for p in a.confidence or {})
    assert st1.accepted > 0 and st1.forward_passes < st0.forward_passes, (st0, st1)
    assert st0.drafted == 0 and st0.ended == 0 and st0.output_tokens == st1.output_tokens
    if any(r.valid for r in step):  # a finished answer ends in tokens forced to the end: emitted without a pass
        assert st1.ended > 0, st1


@pytest.mark.parametrize("data", ["snips", "restaurant8k"])
def test_forced_end_is_the_rest_of_the_answer_exactly_when_nothing_is_left_to_choose(extractor, data):
    """Along each training target's tokens, `forced_end` returns None while a choice is still ahead, and once
    none is, exactly the target's remaining tokens (closing braces, eos); where it returns None the matcher is as
    before (the target's next tokens are still accepted)."""
    import xgrammar as xgr
    from jsonextract.decoding.grammar import forced_end
    from jsonextract.data.schema import load_schema
    schema = load_schema(SNIPS.parent / data / "schema.json")
    prompt = PromptBuilder(C.PromptConfig(), schema)
    scratch = xgr.allocate_token_bitmask(1, extractor.model.config.vocab_size)
    for r in [r for r in read_jsonl(SNIPS.parent / data / "train.jsonl") if r.ok][:12]:
        ids = prompt.encode_answer(extractor.tokenizer, r.target)
        matcher = xgr.GrammarMatcher(extractor.grammar(schema))
        first = None
        for i, t in enumerate(ids):
            end = forced_end(matcher, scratch, limit=len(ids))
            if end is not None:
                first = i
                assert end == ids[i:] and matcher.is_terminated(), (prompt.answer_text(r.target), i)
                break
            assert matcher.accept_token(t), (prompt.answer_text(r.target), i)
        # the last choice is the closing of the last value or object: only braces and eos are forced after it
        assert first is not None and 1 <= len(ids) - first <= 3, (prompt.answer_text(r.target), first, len(ids))
        assert forced_end(xgr.GrammarMatcher(extractor.grammar(schema)), scratch, limit=len(ids)) is None


def test_decoding_loop_matches_generate_token_for_token(extractor):
    """Unconstrained, with prompts of different lengths (left padding) and the shared-prefix cache: the loop's
    greedy tokens are model.generate()'s, so its cache, padding holes and position ids are right."""
    import torch
    from jsonextract.decoding.kv_cache import PrefixCache
    from jsonextract.decoding.loop import greedy_generate

    tok = extractor.tokenizer
    prompts = [extractor.prompt.encode_prompt(tok, t).ids
               for t in ["play jazz", "add this song by the beatles to my evening playlist please", "rate it 4"]]
    n = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (n - len(p)) + p for p in prompts])
    mask = (ids != tok.pad_token_id).long()
    with torch.inference_mode():
        ref = extractor.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, n:].tolist()
    from jsonextract.decoding.scheduling import PassCost, length_groups
    assert len(length_groups([len(p) for p in prompts], PassCost.for_device("cpu").prior)) > 1  # caches joined
    cache = PrefixCache()
    for prefix in (None, cache, cache):  # no prefix; prefix computed; prefix reused
        got = greedy_generate(extractor.model, prompts, max_new=20, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                              prefix=prefix)
        for g, r in zip(got.tokens, ref):
            r = r[:r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r
            assert g == r
    assert cache.hits == 1 and len(cache.ids) > 0


def test_prompt_length_groups_partition_the_rows():
    from jsonextract.decoding.scheduling import length_groups
    lengths = [5, 30, 6, 29, 5]
    groups = length_groups(lengths, overhead=2.0)
    assert sorted(j for g in groups for j in g) == [0, 1, 2, 3, 4]  # every row once
    assert groups == [[0, 4, 2], [3, 1]]  # short rows apart from long ones: 3x6 + 2x30 + 2 passes' overhead
    assert length_groups(lengths, overhead=1e4) == [[0, 4, 2, 3, 1]]  # a pass costs more than any padding


def test_packed_gqa_attention_is_sdpa_without_copying_the_cache():
    """Query heads laid along the query length over the key/value heads: the attention of transformers' sdpa
    (which copies the cache per query head), for passes of several positions with holes in the mask."""
    import torch
    from types import SimpleNamespace
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from jsonextract.models.attention import packed_gqa_sdpa

    torch.manual_seed(0)
    for groups, T, L in [(3, 4, 20), (2, 1, 9), (4, 7, 7)]:
        module = SimpleNamespace(num_key_value_groups=groups, is_causal=True)
        q, k, v = torch.randn(5, 2 * groups, T, 16), torch.randn(5, 2, L, 16), torch.randn(5, 2, L, 16)
        mask = torch.rand(5, 1, T, L) > 0.3
        mask[..., 0] = True  # every position sees at least one key
        want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
        got, _ = packed_gqa_sdpa(module, q, k, v, mask, scaling=0.25)
        assert got.shape == want.shape == (5, T, 2 * groups, 16)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_half_products_attention_is_close_to_fp32_sdpa():
    """Attention's two products over a bf16 cache (attention.HALF): within bf16 rounding of fp32 sdpa, for passes
    of one and several positions, holes in the mask, no mask (transformers drops it for one position, or for
    causal attention over as many keys as queries), a row that sees no key (left padding: no
    NaN), and batches cut into slices; over an fp32 cache it is the packed fp32 attention, exactly."""
    import torch
    from types import SimpleNamespace
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from jsonextract.models import attention as attention
    from jsonextract.models.attention import packed_gqa_half_products, packed_gqa_sdpa

    torch.manual_seed(0)
    for groups, T, L, masked in [(3, 4, 20, True), (3, 1, 9, True), (1, 5, 5, True), (2, 6, 6, False), (2, 1, 7, False)]:
        module = SimpleNamespace(num_key_value_groups=groups, is_causal=True)
        q, k, v = torch.randn(5, 2 * groups, T, 16), torch.randn(5, 2, L, 16), torch.randn(5, 2, L, 16)
        mask = None
        if masked:
            mask = torch.rand(5, 1, T, L) > 0.3
            mask[..., 0] = True
        want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
        got, _ = packed_gqa_half_products(module, q, k.bfloat16(), v.bfloat16(), mask, scaling=0.25)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0.05)
        assert (got - want).abs().max() > 0  # rounded: the bf16 path ran
        same, _ = packed_gqa_half_products(module, q, k, v, mask, scaling=0.25)  # fp32 cache: the fp32 attention
        assert torch.equal(same, packed_gqa_sdpa(module, q, k, v, mask, scaling=0.25)[0])
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    q, k, v = torch.randn(4, 6, 3, 16), torch.randn(4, 2, 8, 16).bfloat16(), torch.randn(4, 2, 8, 16).bfloat16()
    mask = torch.ones(4, 1, 3, 8, dtype=torch.bool)
    mask[1, :, 0] = False  # a padding position that sees nothing
    whole, _ = packed_gqa_half_products(module, q, k, v, mask)
    assert torch.isfinite(whole).all()
    old = attention.SCORES_PER_CHUNK
    try:
        attention.SCORES_PER_CHUNK = 6 * 3 * 8  # one row at a time
        assert torch.equal(packed_gqa_half_products(module, q, k, v, mask)[0], whole)
    finally:
        attention.SCORES_PER_CHUNK = old


def test_gqa_model_decodes_with_packed_attention_as_with_sdpa(tiny_model, snips_schema, tmp_path):
    """A model with grouped query heads (SmolLM2: 9 over 3) is loaded for inference with the packed attention, and
    the decoding loop's outputs, jump-forward passes of several positions included, are those of sdpa's."""
    import shutil
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from jsonextract.models.attention import NAME

    cfg = AutoConfig.from_pretrained(tiny_model)
    cfg.num_key_value_heads = 1  # 2 query heads over 1 key/value head
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    for f in tiny_model.iterdir():
        if "token" in f.name:
            shutil.copy(f, tmp_path / f.name)
    lm = load_for_inference(C.ModelConfig(name=str(tmp_path), inference_dtype="float32"), None)
    assert lm.model.config._attn_implementation == NAME
    ex = Extractor(lm.model, lm.tokenizer, PromptBuilder(C.PromptConfig(), snips_schema),
                   C.DecodingConfig(max_new_tokens=40, batch_size=20))
    texts = [r.text for r in read_jsonl(SNIPS / "test.jsonl")][:20]
    packed = ex.extract(texts)
    assert ex.stats.drafted > 0  # passes of several positions ran (a draft is fed with its sampled token)
    lm.model.set_attn_implementation("sdpa")
    ex.weights_changed()
    plain = ex.extract(texts)
    assert [r.raw for r in packed] == [r.raw for r in plain]
    assert all(abs(a.confidence[p] - b.confidence[p]) < 1e-4
               for a, b in zip(packed, plain) if a.confidence for p in a.confidence)


def test_prefix_cache_is_dropped_when_weights_change(extractor):
    from jsonextract.decoding.kv_cache import PrefixCache
    extractor.extract(["play jazz", "play rock"])
    assert extractor._prefix.ids
    extractor.weights_changed()
    assert isinstance(extractor._prefix, PrefixCache) and not extractor._prefix.ids


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jump_forward_on_cuda(tiny_model, snips_schema, dtype):
    """The decoding loop on a GPU: jump-forward gives step-by-step decoding's outputs in fewer forward passes."""
    lm = load_for_inference(C.ModelConfig(name=str(tiny_model), dtype=dtype), None, device="cuda")
    texts = [r.text for r in read_jsonl(SNIPS / "test.jsonl")][:32]
    for kind, schema in JUMP_SCHEMAS.items():
        runs = {}
        for jf in (False, True):
            ex = Extractor(lm.model, lm.tokenizer, PromptBuilder(C.PromptConfig(), schema or snips_schema),
                           C.DecodingConfig(max_new_tokens=40, jump_forward=jf))
            runs[jf] = (ex.extract(texts), ex.stats)
        (step, st0), (jump, st1) = runs[False], runs[True]
        same = sum(a.raw == b.raw for a, b in zip(jump, step))
        print(f"{dtype} {kind}: identical {same}/{len(texts)}, passes {st0.forward_passes} -> {st1.forward_passes}")
        assert st1.forward_passes < st0.forward_passes
        # fp32: identical. bf16 rounds a multi-token pass differently from a one-token pass, so an untrained
        # model's near-ties may break the other way on a few rows.
        assert same == len(texts) if dtype == "float32" else same >= 0.75 * len(texts)


@pytest.mark.parametrize("precision", [{"inference_dtype": "bfloat16"}, {"dtype": "bfloat16"}],
                         ids=["bf16-matmuls", "bf16-model"])
def test_bf16_inference_on_cpu_keeps_outputs_valid_and_close(extractor, tiny_model, snips_schema, precision):
    """bf16 matrix products (`auto` where bf16 products measure faster), or a whole model loaded in
    bf16: the loop with jump-forward gives schema-valid outputs or an error with a reason, and step-by-step
    decoding's outputs on most rows (bf16 rounds a multi-token pass differently from one-token passes, so an
    untrained model's near-ties may break the other way on a few rows, as on a GPU)."""
    import dataclasses
    lm = load_for_inference(C.ModelConfig(name=str(tiny_model), **precision), None)
    import torch
    from jsonextract.decoding.vocab_head import VocabHead
    from jsonextract.models.precision import matmul_dtype
    assert matmul_dtype(lm.model) == torch.bfloat16
    hidden = torch.randn(3, lm.model.config.hidden_size, dtype=torch.bfloat16)
    assert VocabHead.for_model(lm.model).project(hidden).dtype == torch.float32  # logits not rounded to bf16
    texts = [r.text for r in read_jsonl(SNIPS / "test.jsonl")][:32]
    runs = {}
    for jf in (False, True):
        ex = Extractor(lm.model, lm.tokenizer, extractor.prompt, dataclasses.replace(extractor.cfg, jump_forward=jf))
        runs[jf] = ex.extract(texts)
    for res in runs[True]:
        assert (res.valid and validation_error(res.output, snips_schema) is None) or res.reason in (
            "truncated", "invalid_json", "schema_invalid")
    same = sum(a.raw == b.raw for a, b in zip(runs[True], runs[False]))
    assert same >= 0.75 * len(texts), same


def test_decoding_loop_gives_generates_outputs_under_the_grammar(extractor, snips_schema):
    """The loop with all its measures (jump-forward, prefix cache, rows leaving the batch) against transformers'
    generate() with the same grammar masks: the same outputs and confidences."""
    import dataclasses
    texts = [r.text for r in read_jsonl(SNIPS / "test.jsonl")][50:66]
    runs = {}
    for engine in ("generate", "loop"):
        ex = Extractor(extractor.model, extractor.tokenizer, extractor.prompt,
                       dataclasses.replace(extractor.cfg, engine=engine))
        runs[engine] = ex.extract(texts)
    assert [r.raw for r in runs["loop"]] == [r.raw for r in runs["generate"]]
    for a, b in zip(runs["loop"], runs["generate"]):
        assert a.output_tokens == b.output_tokens
        assert all(abs(a.confidence[p] - b.confidence[p]) < 1e-4 for p in a.confidence or {})


# ---------------------------------------------------------------------------------------------- vocabulary head, cache


def test_vocab_head_gives_the_full_projections_masked_argmax(extractor):
    """Projecting onto the allowed tokens alone (few allowed) or by vocabulary chunks (many): the same token and
    log-probability as masking the model's own full logits."""
    import copy

    import torch
    import xgrammar as xgr
    from jsonextract.decoding.grammar import masked_argmax
    from jsonextract.decoding.vocab_head import VocabHead

    model = extractor.model
    head = VocabHead.for_model(model)
    assert head is not None  # a plain Llama on a CPU
    V = model.config.vocab_size
    torch.manual_seed(0)
    hidden = torch.randn(6, model.config.hidden_size)
    allowed = [[7], [3, 90, 400], list(range(0, V, 5)), list(range(V)), [V - 1, 11], list(range(100, 100 + VocabHead.FEW))]
    bitmask = xgr.allocate_token_bitmask(len(allowed), V)
    bitmask.zero_()
    for r, ids in enumerate(allowed):
        for t in ids:
            bitmask[r, t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)
    with torch.inference_mode():
        full = model.get_output_embeddings()(hidden).float()
    ref_tokens, ref_lp, _ = masked_argmax(full.clone(), bitmask.clone())
    tokens, lp, _ = head.choose(hidden, bitmask)
    assert tokens == ref_tokens and all(t in ids for t, ids in zip(tokens, allowed))
    assert lp[0] == 0.0 and max(abs(a - b) for a, b in zip(lp, ref_lp)) < 1e-4
    assert head.choose(hidden, None)[0] == full.argmax(-1).tolist()  # unconstrained: chunked full projection
    wrapped = copy.copy(model)  # a subclass outside transformers (as PEFT and FSDP make): the model's own logits
    wrapped.__class__ = type("Wrapped", (type(model),), {})
    assert VocabHead.for_model(wrapped) is None


def test_vocab_head_in_bf16_gives_the_fp32_argmax(extractor):
    """Where the decoder's products run in bf16, the full projection does too, and the tokens whose bf16 logit
    is within rounding of the best are recomputed in fp32: the argmax is fp32's on rows where bf16's own argmax
    is not, masked or not, and the log-probabilities stay close."""
    import torch
    import xgrammar as xgr
    from jsonextract.decoding.grammar import masked_argmax
    from jsonextract.decoding.vocab_head import VocabHead

    model = extractor.model
    weight = model.get_output_embeddings().weight
    head = VocabHead(model.get_decoder(), weight, torch.bfloat16)
    V = model.config.vocab_size
    torch.manual_seed(0)
    hidden = 6 * torch.randn(2000, model.config.hidden_size)  # logits of tens: bf16 steps of 0.06-0.25
    full = hidden @ weight.detach().float().T
    assert (full.bfloat16().float().argmax(-1) != full.argmax(-1)).any()  # bf16 alone would change tokens
    tokens, lp, _ = head.choose(hidden, None)
    assert tokens == full.argmax(-1).tolist()
    ref_lp = (full.max(-1).values - torch.logsumexp(full, -1)).tolist()
    assert max(abs(a - b) for a, b in zip(lp, ref_lp)) < 0.05
    bitmask = xgr.allocate_token_bitmask(len(hidden), V)  # every other token allowed, none in the last row
    bitmask.fill_(0x55555555)
    bitmask[-1] = 0
    masked_tokens = head.choose(hidden, bitmask)[0]
    ref_tokens = masked_argmax(full.clone(), bitmask.clone())[0]
    assert masked_tokens[:-1] == ref_tokens[:-1] and all(t % 2 == 0 for t in masked_tokens[:-1])


def test_vocab_head_runs_a_peft_models_active_lora_adapter(extractor):
    """Serve's unmerged LoRA adapters: the head projects from the PEFT model's decoder, whose layers apply the
    active adapter (or none when adapters are disabled); the loop's tokens are then PEFT's own generate()'s."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from jsonextract.decoding.loop import greedy_generate
    from jsonextract.decoding.vocab_head import VocabHead

    tok = extractor.tokenizer
    torch.manual_seed(0)
    lora = dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)  # random, not zero
    peft = get_peft_model(copy.deepcopy(extractor.model), LoraConfig(**lora), adapter_name="first")
    peft.add_adapter("second", LoraConfig(**lora))
    peft.eval()
    assert VocabHead.for_model(peft) is not None
    prompts = [extractor.prompt.encode_prompt(tok, t).ids for t in ["play jazz", "rate this book 4 out of 6"]]
    n = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (n - len(p)) + p for p in prompts])
    outputs = {}
    for name in ("first", "second", ""):
        peft.set_adapter(name or "first")
        with peft.disable_adapter() if not name else torch.inference_mode():
            with torch.inference_mode():
                ref = peft.generate(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), max_new_tokens=12,
                                    do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            got = greedy_generate(peft, prompts, max_new=12, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        for g, r in zip(got.tokens, ref[:, n:].tolist()):
            assert g == (r[:r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r), name
        outputs[name] = got.tokens
    assert outputs["first"] != outputs[""] and outputs["second"] != outputs["first"]  # the adapters were applied, each its own
    on_head = get_peft_model(copy.deepcopy(extractor.model), LoraConfig(r=4, target_modules=["lm_head"]))
    assert VocabHead.for_model(on_head) is None  # an adapter on the projection itself: the model's own logits


def test_growing_cache_keeps_the_rows_a_dynamic_cache_keeps():
    """The loop's cache writes passes in place and moves the fewest rows when rows finish; its keys and values
    are a DynamicCache's with the same rows selected."""
    import torch
    from transformers import DynamicCache
    from jsonextract.decoding.kv_cache import growing_cache as _growing
    from jsonextract.decoding.scheduling import fill_holes

    assert fill_holes([0, 2, 3, 5]) == [0, 5, 2, 3] and fill_holes([1, 2]) == [2, 1]
    torch.manual_seed(0)
    grow, ref = _growing(), DynamicCache()
    B = 6
    for step, (t, keep) in enumerate([(40, None), (1, None), (3, [0, 2, 3, 5]), (70, None), (1, [1, 3]), (2, None)]):
        if keep is not None:  # rows leave: the loop's order for the growing cache, any order for the reference
            order = torch.tensor(fill_holes(keep) if step % 2 else keep[::-1])
            grow.batch_select_indices(order)
            ref.batch_select_indices(order)
            B = len(keep)
        for layer in range(2):
            k, v = torch.randn(B, 3, t, 8), torch.randn(B, 3, t, 8)
            gk, gv = grow.update(k, v, layer)
            rk, rv = ref.update(k, v, layer)
            assert torch.equal(gk, rk) and torch.equal(gv, rv)
    assert grow.get_seq_length() == ref.get_seq_length() == 117
