"""Config presets, dual encoder, mask-guided aggregation and the LLM's REF capture."""
from __future__ import annotations

import json

import pytest
import torch

from refvlm_core import trp
from refvlm_core.aggregation import cosine_position_encoding, mask_guided_aggregation, resize_masks
from refvlm_core.config import ModelConfig, preset
from refvlm_core.errors import ConfigError

torch.set_num_threads(1)


# ---- config -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "nano", "paper"])
def test_preset_json_round_trip(name, tmp_path):
    config = preset(name)
    path = tmp_path / "config.json"
    config.to_json(path)
    assert ModelConfig.from_json(path) == config


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    data = preset("tiny").to_dict()
    data["vision"]["vit_lyer"] = 3
    with pytest.raises(ConfigError, match=r"config\.vision: unknown field"):
        ModelConfig.from_dict(data)
    config = preset("tiny")
    config.vision.vit_weights = str(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="vision.vit_weights"):
        config.check_paths()
    with pytest.raises(ConfigError, match="llm.path is not set"):
        preset("paper").check_paths()
    bad = preset("tiny")
    bad.vision.convnext_stages = (2, 1)
    with pytest.raises(ConfigError, match="increasing"):
        bad.validate()
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_json(tmp_path / "nope.json")


# ---- encoders -----------------------------------------------------------------------

def test_dual_encoder_shapes_and_frozen():
    from refvlm_core.encoders import DualImageEncoder

    torch.manual_seed(0)
    config = preset("tiny").vision
    encoder = DualImageEncoder(config)
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    features = encoder(torch.rand(2, 3, 64, 64))
    assert features.patch_tokens.shape == (2, encoder.num_image_tokens, encoder.vit_width) == (2, 16, 32)
    assert [tuple(level.shape) for level in features.pyramid] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4)]
    assert features.pyramid_channels == encoder.pyramid_channels


def test_vit_layer_is_the_configured_block():
    """Layer -2 of a 2-block ViT is block 0's output: compare with running it by hand."""
    from refvlm_core.encoders import DualImageEncoder

    torch.manual_seed(0)
    encoder = DualImageEncoder(preset("tiny").vision)
    images = torch.rand(1, 3, 64, 64)
    x = encoder.vit._embeds(images)
    expected = encoder.vit.transformer.resblocks[0](x)[:, 1:]
    assert torch.allclose(encoder.vit_tokens(images), expected)
    full = encoder.vit.transformer(x)[:, 1:]
    assert not torch.allclose(encoder.vit_tokens(images), full)


def test_vit_weights_load_from_local_file(tmp_path):
    from safetensors.torch import save_file

    from refvlm_core.encoders import DualImageEncoder
    from refvlm_core.errors import CheckpointError

    torch.manual_seed(0)
    source = DualImageEncoder(preset("tiny").vision)
    path = tmp_path / "vit.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in source.vit.state_dict().items()}, str(path))
    config = preset("tiny").vision
    config.vit_weights = str(path)
    torch.manual_seed(1)
    loaded = DualImageEncoder(config)
    for key, value in source.vit.state_dict().items():
        assert torch.equal(loaded.vit.state_dict()[key], value)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="vit.safetensors"):
        DualImageEncoder(config)


# ---- aggregation --------------------------------------------------------------------

def _aggregate_loop(features, masks, grid, temperature, alpha=1.0):
    """Eq. (1)-(3) written out with python loops over regions, patches and pixels."""
    batch, channels, height, width = features.shape
    masks = resize_masks(masks, height, width)
    code = cosine_position_encoding(grid, channels, temperature, alpha)
    rows = [[int(round(i * -(-height // grid))) for i in range(grid + 1)]]
    step_h, step_w = -(-height // grid), -(-width // grid)
    out = torch.zeros(batch, masks.shape[1], channels, dtype=torch.float64)
    for b in range(batch):
        for r in range(masks.shape[1]):
            numerator = torch.zeros(channels, dtype=torch.float64)
            total_area = 0.0
            for gy in range(grid):
                for gx in range(grid):
                    summed = torch.zeros(channels, dtype=torch.float64)
                    area = 0.0
                    for y in range(gy * step_h, min((gy + 1) * step_h, height)):
                        for x in range(gx * step_w, min((gx + 1) * step_w, width)):
                            weight = float(masks[b, r, y, x])
                            summed += features[b, :, y, x].double() * weight
                            area += weight
                    patch = summed / (area + 1e-6) + code[gy * grid + gx].double()
                    numerator += area * patch
                    total_area += area
            out[b, r] = numerator / (total_area + 1e-6)
    del rows
    return out


@pytest.mark.parametrize("height,width,grid", [(8, 8, 2), (7, 9, 3)])
def test_aggregation_equals_loop(height, width, grid):
    torch.manual_seed(0)
    features = torch.randn(2, 8, height, width)
    masks = torch.rand(2, 3, height * 4, width * 4) > 0.6
    masks[1, 2] = False  # an empty prompt gives a zero feature
    fast = mask_guided_aggregation(features, masks, grid, temperature=100.0)
    slow = _aggregate_loop(features, masks, grid, temperature=100.0)
    assert fast.shape == (2, 3, 8)
    assert torch.allclose(fast.double(), slow, atol=1e-4)
    assert torch.count_nonzero(fast[1, 2]) == 0


def test_aggregation_is_local():
    """A mask over one corner pools only that corner's features (plus its position code)."""
    features = torch.zeros(1, 4, 8, 8)
    features[..., :4, :4] = 1.0
    masks = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    masks[0, 0, :4, :4] = True
    masks[0, 1, 4:, 4:] = True
    regions = mask_guided_aggregation(features, masks, grid=2, temperature=10.0, alpha=0.0)
    assert torch.allclose(regions[0, 0], torch.ones(4), atol=1e-5)
    assert torch.allclose(regions[0, 1], torch.zeros(4), atol=1e-5)


# ---- LLM ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llm():
    from refvlm_core.llm import RefLLM

    torch.manual_seed(0)
    return RefLLM.from_config(preset("tiny"))


def test_special_tokens_are_single_tokens(tiny_llm):
    tokenizer = tiny_llm.tokenizer
    for token in trp.SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False).input_ids
        assert ids == [tiny_llm.token_ids[token]]
    text = trp.format_phrase("cat", ("box",), 2)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(tiny_llm.ref_id) == 2


def test_splice_places_features_in_their_slots(tiny_llm):
    ids = torch.tensor([[5, tiny_llm.image_id, tiny_llm.image_id, 6, tiny_llm.region_id],
                        [tiny_llm.image_id, tiny_llm.image_id, tiny_llm.region_id, tiny_llm.region_id, 7]])
    image = torch.randn(2, 2, 64)
    regions = torch.randn(3, 64)
    embeds = tiny_llm.embed_multimodal(ids, image, regions)
    assert torch.equal(embeds[0, 1:3], image[0]) and torch.equal(embeds[1, 0:2], image[1])
    assert torch.equal(embeds[0, 4], regions[0]) and torch.equal(embeds[1, 2:4], regions[1:])
    plain = tiny_llm.lm.get_input_embeddings()(ids)
    assert torch.equal(embeds[0, 0], plain[0, 0]) and torch.equal(embeds[1, 4], plain[1, 4])
    with pytest.raises(ValueError, match="region"):
        tiny_llm.embed_multimodal(ids, image, regions[:2])


def test_generate_captures_ref_states_of_teacher_forcing(tiny_llm):
    """Each captured state equals the final-norm state at that <REF> under teacher forcing,
    including a <REF> that is the very last generated token."""
    tokenizer = tiny_llm.tokenizer
    script = tokenizer(trp.format_phrase("dogs", ("box",), 2), add_special_tokens=False).input_ids
    script = script[: script.index(tiny_llm.ref_id, script.index(tiny_llm.ref_id) + 1) + 1]

    def force(step, logits):
        forced = torch.full_like(logits, -1e9)
        forced[0, script[step]] = 0
        return forced

    prompt = tokenizer("find the dogs", return_tensors="pt").input_ids
    generation = tiny_llm.generate(tiny_llm.embed_multimodal(prompt), max_new_tokens=len(script),
                                   logits_hook=force)
    assert generation.token_ids == script and generation.text.endswith("<REF>")
    full = torch.cat([prompt, torch.tensor([script])], dim=1)
    with torch.no_grad():
        _, hidden = tiny_llm(tiny_llm.embed_multimodal(full))
    positions = (full[0] == tiny_llm.ref_id).nonzero().flatten()
    assert generation.ref_states.shape == (2, 64)
    assert torch.allclose(generation.ref_states, hidden[0, positions], atol=1e-5)
    assert not trp.parse(generation.text).refs[1].units == ()


def test_lm_loss_at_answer_tokens_equals_full_logits_cross_entropy(tiny_llm):
    torch.manual_seed(1)
    hidden = torch.randn(2, 7, 64)
    labels = torch.full((2, 7), -100)
    labels[0, 3:6] = torch.tensor([11, 12, 13])
    labels[1, 6] = 14
    logits = tiny_llm.lm.lm_head(hidden)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=-100)
    assert torch.allclose(tiny_llm.lm_loss(hidden, labels), expected, atol=1e-6)
    unlabelled = tiny_llm.lm_loss(hidden.requires_grad_(), torch.full((2, 7), -100))
    assert unlabelled.item() == 0.0 and unlabelled.requires_grad


def test_paper_llm_on_meta_device():
    from refvlm_core.llm import RefLLM

    with torch.device("meta"):
        llm = RefLLM.from_config(preset("paper"))
    count = sum(p.numel() for p in llm.parameters())
    # Vicuna-7B: 6.74e9 parameters; +7 TRP rows in embed_tokens and lm_head
    assert count == 6_738_415_616 + 2 * 4096 * len(trp.SPECIAL_TOKENS)
    assert json.dumps(llm.lm.config.to_dict()) and llm.hidden_size == 4096


def test_llm_image_pool_gives_the_llm_fewer_image_tokens():
    """llm_image_pool=2 averages 2x2 ViT tokens: a quarter of the image tokens in the prompt,
    each projected from the mean of its 2x2 block of ViT tokens."""
    from refvlm_core.model import RefVLM

    torch.manual_seed(0)
    plain = RefVLM.from_config(preset("tiny"))
    config = preset("tiny")
    config.llm_image_pool = 2
    torch.manual_seed(0)
    pooled = RefVLM.from_config(config)
    features = plain.encode_images(torch.rand(1, 3, 64, 64))
    grid = plain.encoder.vit_grid
    assert plain.num_image_tokens == grid ** 2 and pooled.num_image_tokens == (grid // 2) ** 2
    tokens = pooled.image_tokens(features)                                   # [1, (G/2)^2, D]
    assert tokens.shape[1] == pooled.num_image_tokens
    block = features.patch_tokens[0].view(grid, grid, -1)[:2, :2].reshape(4, -1).mean(0)
    assert torch.allclose(tokens[0, 0], pooled.projector(block[None])[0], atol=1e-5)
    ids = pooled.processor.prompt_ids("Find the cube.", 0)
    assert int((ids == pooled.llm.image_id).sum()) == pooled.num_image_tokens
    with pytest.raises(ConfigError, match="llm_image_pool"):
        bad = preset("tiny")
        bad.llm_image_pool = 0
        bad.validate()
