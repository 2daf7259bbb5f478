"""Every option of TrainConfig and ModelConfig does something.

``train_encoders: true`` once left the towers frozen without a word. This module keeps
that from coming back for any option: ``REGISTRY`` maps the dotted path of every field
found by walking the dataclasses (``ModelConfig.loss_weights`` by the fields of
``LossWeights``, the names it accepts) to one of

- ``Effect(test)``: a test that changes the option and asserts what changes with it (a
  weight that moves, a loss, an output, a file, a refusal): one of this module's, or an
  existing test elsewhere named ``path::function`` that asserts it;
- ``NotBehavioural(reason)``: a label or a location, with where its use is tested.

``test_the_registry_covers_every_field`` fails for a field added without an entry (and for
an entry left behind by a removed field); ``test_every_effect_test_exists`` fails when a
named test is renamed or removed. Effect checks run on the tiny preset, 1-3 steps.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
import multiprocessing
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from refvlm_core.config import MatchCosts, ModelConfig, preset
from refvlm_core.errors import ConfigError, InputError
from refvlm_core.losses import LossWeights
from refvlm_training.engine.config import TrainConfig
from train_helpers import tiny_train_config, write_tiny_train_data

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent
HERE = "tests/test_option_effects.py"


class Effect:
    """Tests ("tests/<file>.py::<test function>") that each assert the field's effect."""

    def __init__(self, *tests: str) -> None:
        self.tests = tests


@dataclasses.dataclass(frozen=True)
class NotBehavioural:
    reason: str


def here(*names: str) -> Effect:
    return Effect(*(f"{HERE}::{name}" for name in names))


# Dict fields whose keys are options of their own (each key must show its effect).
EXPANDED_DICTS = {(ModelConfig, "loss_weights"): LossWeights}


def walk(cls: type, prefix: str = "") -> list[str]:
    """Dotted paths of the leaf fields of a dataclass (nested dataclasses, optional ones
    included, walked into; dicts of EXPANDED_DICTS by their dataclass's fields)."""
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        nested = EXPANDED_DICTS.get((cls, f.name)) or next(
            (t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)), None)
        if nested is not None:
            paths += walk(nested, f"{prefix}{f.name}.")
        else:
            paths.append(prefix + f.name)
    return paths


# ---- the registry ----------------------------------------------------------------

ENGINE = "tests/test_train_engine.py"
VISION = "tests/test_train_vision.py"
PROBES = "tests/test_model_probes.py"
CORE = "tests/test_model_core.py"

MODEL_REGISTRY: dict[str, Effect | NotBehavioural] = {
    "name": NotBehavioural("a label: written to config.json and shown in logs and the model card"),
    "vision.image_size": here("test_image_size_is_the_model_frame"),
    "vision.vit_model": here("test_named_tower_configs_pick_the_towers"),
    "vision.vit_custom": here("test_custom_tower_sizes_shape_the_features"),
    "vision.vit_layer": Effect(f"{CORE}::test_vit_layer_is_the_configured_block"),
    "vision.vit_weights": Effect(f"{CORE}::test_vit_weights_load_from_local_file"),
    "vision.convnext_model": here("test_named_tower_configs_pick_the_towers"),
    "vision.convnext_custom": here("test_custom_tower_sizes_shape_the_features"),
    "vision.convnext_stages": here("test_convnext_stages_are_the_pyramid_levels"),
    "vision.convnext_weights": here("test_convnext_weights_load_from_local_file"),
    "vision.pyramid_input": Effect(f"{PROBES}::test_luminance_pyramid_cannot_see_hue_and_the_colour_pathway_can"),
    "vision.colour_channels": Effect(f"{PROBES}::test_luminance_pyramid_cannot_see_hue_and_the_colour_pathway_can",
                                     f"{PROBES}::test_colour_pathway_has_no_spatial_extent_beyond_its_cell"),
    "vision.object_maps": Effect(f"{PROBES}::test_stage0_learns_split_towers_with_object_maps"),
    "vision.mean": here("test_normalisation_changes_the_features"),
    "vision.std": here("test_normalisation_changes_the_features"),
    "llm.kind": here("test_hf_kind_loads_the_folder_at_llm_path"),
    "llm.path": here("test_hf_kind_loads_the_folder_at_llm_path"),
    "llm.tokenizer_path": here("test_tokenizer_path_is_the_tokenizer"),
    "llm.arch": here("test_llm_arch_and_dtype_build_the_llm"),
    "llm.dtype": here("test_llm_arch_and_dtype_build_the_llm"),
    "llm.max_new_tokens": here("test_max_new_tokens_cuts_the_answer"),
    "llm.constrained": here("test_constrained_is_the_default_decoding"),
    "projector.hidden_size": here("test_projector_hidden_size"),
    "aggregation.grid": here("test_aggregation_options_change_region_features"),
    "aggregation.temperature": here("test_aggregation_options_change_region_features"),
    "aggregation.alpha": here("test_aggregation_options_change_region_features"),
    "llm_image_pool": Effect(f"{CORE}::test_llm_image_pool_gives_the_llm_fewer_image_tokens"),
    "router_length": here("test_router_length_is_the_inference_group_length"),
    "decoders": Effect(f"{HERE}::test_decoders_name_the_units_and_their_sizes",  # and 'kind' picks the class:
                       f"{ENGINE}::test_stage3_external_decoder_trains_saves_loads_predicts_and_exports"),
    "system_prompt": here("test_system_prompt_is_in_the_prompt"),
    "max_prompt_chars": here("test_max_prompt_chars_refuses_longer_prompts"),
    "cache_dir": here("test_cache_dir_is_where_the_tokenizer_is_read"),
    **{f"loss_weights.{f.name}": here("test_each_loss_weight_changes_the_losses")
       for f in dataclasses.fields(LossWeights) if f.name != "select"},
    "loss_weights.select": Effect("tests/test_object_decoders.py::test_select_weight_scales_the_choice_loss"),
    **{f"match_costs.{f.name}": Effect("tests/test_match_costs.py::test_each_match_cost_changes_the_assignment",
                                       f"{HERE}::test_match_costs_reach_the_model_decoders")
       for f in dataclasses.fields(MatchCosts)},
}

TRAIN_REGISTRY: dict[str, Effect | NotBehavioural] = {
    "stage": Effect(f"{ENGINE}::test_stage1_then_stage2_lower_the_loss"),
    "seed": here("test_seed_picks_the_initial_weights"),
    "out": NotBehavioural("where the run writes (a path): test_stage1_then_stage2_lower_the_loss reads the "
                          "model, metrics and TensorBoard files from it"),
    "steps": Effect(f"{ENGINE}::test_stage1_then_stage2_lower_the_loss"),
    "batch_size": here("test_batch_size_and_grad_accum_consume_samples"),
    "grad_accum": here("test_batch_size_and_grad_accum_consume_samples", "test_stage0_refuses_what_it_does_not_read"),
    "grad_clip": here("test_grad_clip_shrinks_the_step"),
    "strategy": Effect("tests/test_train_fsdp.py::test_fsdp_with_lora_is_refused"),
    "mixed_precision": here("test_bf16_mixed_precision_changes_the_loss"),
    "gradient_checkpointing": here("test_gradient_checkpointing_keeps_fewer_activations"),
    "train_encoders": Effect(f"{VISION}::test_a_training_step_moves_the_towers_only_when_asked"),
    "trainable": Effect(f"{VISION}::test_decoder_phase_moves_only_the_decoders"),
    "cache_frozen": Effect(f"{VISION}::test_cached_features_and_ref_states_equal_recomputed_ones"),
    "checkpoint_every": here("test_log_every_and_checkpoint_every_pick_the_steps"),
    "log_every": here("test_log_every_and_checkpoint_every_pick_the_steps"),
    "save_trainable_only": here("test_save_trainable_only_writes_only_trained_tensors"),
    "loss_weights": here("test_train_loss_weights_reach_the_losses"),
    "data.train": NotBehavioural("where the samples come from (a path): every training test reads its "
                                 "shard through it; test_config_layers_and_errors shows the refusal when unset"),
    "data.num_workers": here("test_num_workers_starts_reader_processes"),
    "data.stage1_decimals": here("test_stage1_decimals_are_the_digits_of_text_boxes",
                                 "test_stage_sections_are_refused_in_the_other_stages"),
    "data.max_samples": here("test_max_samples_limits_the_stream"),
    "model.preset": here("test_model_preset_and_overrides_build_the_model"),
    "model.init_from": Effect(f"{ENGINE}::test_stage1_then_stage2_lower_the_loss"),
    "model.load_parts": Effect(f"{PROBES}::test_load_parts_puts_stage0_object_heads_into_the_choosers"),
    "model.overrides": Effect(f"{HERE}::test_model_preset_and_overrides_build_the_model",
                              f"{PROBES}::test_overrides_on_init_from_rebuild_only_the_changed_parts"),
    "optim.lr": here("test_lr_scales_the_first_step"),
    "optim.weight_decay": here("test_weight_decay_shrinks_the_matrices"),
    "optim.betas": here("test_betas_change_the_second_step"),
    "optim.warmup_steps": here("test_schedule_options_set_the_optimizer_rate"),
    "optim.min_lr_ratio": here("test_schedule_options_set_the_optimizer_rate"),
    "lora.enabled": Effect("tests/test_checkpoint_over_base.py::test_lora_training_moves_only_adapters_rows_and_non_llm"),
    "lora.r": here("test_lora_rank_and_target_modules_shape_the_adapters"),
    "lora.target_modules": here("test_lora_rank_and_target_modules_shape_the_adapters"),
    "lora.alpha": here("test_lora_alpha_scales_the_adapters"),
    "lora.dropout": here("test_lora_dropout_makes_training_passes_differ"),
    "external_decoder.unit": Effect(f"{ENGINE}::test_stage3_external_decoder_trains_saves_loads_predicts_and_exports",
                                    f"{HERE}::test_stage_sections_are_refused_in_the_other_stages"),
    "external_decoder.kind": Effect(f"{ENGINE}::test_stage3_external_decoder_trains_saves_loads_predicts_and_exports"),
    "external_decoder.settings": here("test_external_decoder_settings_and_weights"),
    "external_decoder.weights": here("test_external_decoder_settings_and_weights"),
    "vision_pretrain.scenes": here("test_stage0_render_options_change_the_first_loss",
                                   "test_stage_sections_are_refused_in_the_other_stages"),
    "vision_pretrain.width": here("test_stage0_render_options_change_the_first_loss"),
    "vision_pretrain.height": here("test_stage0_render_options_change_the_first_loss"),
    "vision_pretrain.head_dim": here("test_stage0_head_dim_is_the_heads_width"),
    "vision_pretrain.brightness_jitter": Effect(f"{PROBES}::test_stage0_learns_split_towers_with_object_maps"),
    "vision_pretrain.loss_weights": Effect(f"{VISION}::test_stage0_loss_weights_scale_their_terms"),
}


@pytest.mark.parametrize("cls, registry", [(ModelConfig, MODEL_REGISTRY), (TrainConfig, TRAIN_REGISTRY)],
                         ids=["ModelConfig", "TrainConfig"])
def test_the_registry_covers_every_field(cls, registry):
    fields = set(walk(cls))
    missing, stale = sorted(fields - set(registry)), sorted(set(registry) - fields)
    assert not missing, (f"{cls.__name__} fields with no effect test: {missing}. Add a test that changes "
                         f"each and asserts what changes, and list it in {HERE}")
    assert not stale, f"{HERE} lists fields {cls.__name__} no longer has: {stale}"


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_every_effect_test_exists():
    named = {test for registry in (MODEL_REGISTRY, TRAIN_REGISTRY) for entry in registry.values()
             if isinstance(entry, Effect) for test in entry.tests}
    root = TESTS.parent
    absent = [test for test in sorted(named)
              if test.split("::")[1] not in _test_functions(root / test.split("::")[0])]
    assert not absent, f"effect tests that do not exist: {absent}"
    reasons = [entry.reason for registry in (MODEL_REGISTRY, TRAIN_REGISTRY) for entry in registry.values()
               if isinstance(entry, NotBehavioural)]
    assert all(len(reason) > 20 for reason in reasons)
    # and every effect test of this module is the check of some field
    own = {name for name in _test_functions(Path(__file__)) if name.startswith("test_")}
    own -= {"test_the_registry_covers_every_field", "test_every_effect_test_exists"}
    unused = sorted(own - {test.split("::")[1] for test in named if test.startswith(HERE)})
    assert not unused, f"tests of {HERE} no field names: {unused}"


# ---- ModelConfig ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    from refvlm_core.model import RefVLM

    torch.manual_seed(0)
    return RefVLM.from_config(preset("tiny")).eval()


def rebuilt(base, config: ModelConfig):
    """A RefVLM of ``config`` on ``base``'s encoder and LLM (projector and decoders built
    afresh under the same seed), so an option of those parts is compared like for like."""
    from refvlm_core.model import RefVLM

    torch.manual_seed(1)
    return RefVLM(config.validate(), base.encoder, base.llm).eval()


def tiny_with(**changes) -> ModelConfig:
    """The tiny preset with ``changes`` given as dotted paths (``vision.image_size=96``)."""
    config = preset("tiny")
    for path, value in changes.items():
        target = config
        *parents, name = path.split("__")
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)
    return config


def _image(height: int = 48, width: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = (rng.random((height, width, 3)) * 80).astype(np.uint8)
    image[10:30, 12:40] = (220, 40, 40)
    return image


def test_image_size_is_the_model_frame(tiny_model):
    small = tiny_model.processor.image_tensor(_image())[0]
    large = rebuilt(tiny_model, tiny_with(vision__image_size=96)).processor.image_tensor(_image())[0]
    assert small.shape == (3, 64, 64) and large.shape == (3, 96, 96)


def test_named_tower_configs_pick_the_towers():
    """With no custom tower the open_clip config names decide (built on the meta device)."""
    from refvlm_core.encoders import DualImageEncoder

    def widths(vit: str, convnext: str) -> tuple[int, list[int]]:
        vision = preset("tiny").vision
        vision.vit_custom, vision.convnext_custom, vision.vit_model, vision.convnext_model = None, None, vit, convnext
        vision.convnext_stages = (1, 2, 3)
        with torch.device("meta"):
            encoder = DualImageEncoder(vision)
        return encoder.vit_width, encoder.pyramid_channels

    assert widths("ViT-S-32", "convnext_tiny") == (384, [192, 384, 768])
    assert widths("ViT-M-32", "convnext_base") == (512, [256, 512, 1024])


def test_custom_tower_sizes_shape_the_features():
    from refvlm_core.encoders import DualImageEncoder

    vision = preset("tiny").vision
    vision.vit_custom = {**vision.vit_custom, "width": 48, "head_width": 16}
    vision.convnext_custom = {**vision.convnext_custom, "dims": [8, 12, 24, 48]}
    plain, custom = DualImageEncoder(preset("tiny").vision), DualImageEncoder(vision)
    assert (plain.vit_width, plain.pyramid_channels) == (32, [8, 16, 32])
    assert (custom.vit_width, custom.pyramid_channels) == (48, [8, 12, 24])
    features = custom(torch.rand(1, 3, 64, 64))
    assert features.patch_tokens.shape[-1] == 48 and [p.shape[1] for p in features.pyramid] == [8, 12, 24]


def test_convnext_stages_are_the_pyramid_levels():
    from refvlm_core.encoders import DualImageEncoder

    vision = preset("tiny").vision
    vision.convnext_stages = (1, 3)
    features = DualImageEncoder(vision)(torch.rand(1, 3, 64, 64))
    assert [tuple(p.shape[1:]) for p in features.pyramid] == [(16, 8, 8), (64, 2, 2)]


def test_convnext_weights_load_from_local_file(tmp_path):
    from safetensors.torch import save_file

    from refvlm_core.encoders import DualImageEncoder

    torch.manual_seed(0)
    source = DualImageEncoder(preset("tiny").vision)
    path = tmp_path / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in source.convnext.state_dict().items()}, str(path))
    vision = preset("tiny").vision
    vision.convnext_weights = str(path)
    torch.manual_seed(1)
    loaded, fresh = DualImageEncoder(vision), DualImageEncoder(preset("tiny").vision)
    state = loaded.convnext.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.convnext.state_dict().items())
    assert not all(torch.equal(fresh.convnext.state_dict()[k], v) for k, v in source.convnext.state_dict().items())


def test_normalisation_changes_the_features():
    from refvlm_core.encoders import DualImageEncoder

    images = torch.rand(1, 3, 64, 64)
    outputs = []
    for mean, std in (((0.48, 0.46, 0.41), (0.27, 0.26, 0.28)), ((0.5, 0.5, 0.5), (0.27, 0.26, 0.28)),
                      ((0.48, 0.46, 0.41), (0.5, 0.5, 0.5))):
        vision = preset("tiny").vision
        vision.mean, vision.std = mean, std
        torch.manual_seed(0)
        outputs.append(DualImageEncoder(vision)(images))
    default, other_mean, other_std = outputs
    for other in (other_mean, other_std):
        assert not torch.allclose(default.patch_tokens, other.patch_tokens)
        assert not torch.allclose(default.pyramid[0], other.pyramid[0])


def test_hf_kind_loads_the_folder_at_llm_path(tmp_path, tiny_model):
    """kind=hf reads the causal LM (and its tokenizer) from llm.path; llama-random ignores it."""
    from refvlm_core.llm import RefLLM

    folder = tmp_path / "hf"
    causal = tiny_model.llm.causal_lm
    causal.save_pretrained(str(folder))
    tiny_model.llm.tokenizer.save_pretrained(str(folder))
    saved = {k: v.clone() for k, v in causal.state_dict().items()}
    loaded = RefLLM.from_config(tiny_with(llm__kind="hf", llm__path=str(folder)))
    state = loaded.causal_lm.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    torch.manual_seed(5)
    random = RefLLM.from_config(preset("tiny"))  # llama-random: a fresh init, no folder read
    assert not torch.equal(random.causal_lm.get_input_embeddings().weight, saved["model.embed_tokens.weight"])
    with pytest.raises(ConfigError, match="llm.path"):
        RefLLM.from_config(tiny_with(llm__kind="hf", llm__path=str(tmp_path / "missing")))


def test_tokenizer_path_is_the_tokenizer(tmp_path, tiny_model):
    from refvlm_core.base_llm import load_tokenizer

    folder = tmp_path / "tokenizer"
    extended = copy.deepcopy(tiny_model.llm.tokenizer)
    extended.add_tokens(["<zebra-token>"])
    extended.save_pretrained(str(folder))
    loaded = load_tokenizer(tiny_with(llm__tokenizer_path=str(folder)))
    assert "<zebra-token>" in loaded.get_vocab() and "<zebra-token>" not in tiny_model.llm.tokenizer.get_vocab()
    nano = preset("nano")  # a GGUF base takes its tokenizer from the GGUF file: the field is refused there
    nano.llm.tokenizer_path = str(folder)
    with pytest.raises(ConfigError, match="llm.tokenizer_path is not read for llm.kind='gguf'"):
        nano.validate()


def test_llm_arch_and_dtype_build_the_llm():
    from refvlm_core.llm import RefLLM

    arch = {**preset("tiny").llm.arch, "hidden_size": 32, "intermediate_size": 64}
    llm = RefLLM.from_config(tiny_with(llm__arch=arch, llm__dtype="bfloat16"))
    assert llm.hidden_size == 32 and len(llm.causal_lm.model.layers) == 2
    assert {p.dtype for p in llm.parameters()} == {torch.bfloat16}
    assert RefLLM.from_config(preset("tiny")).hidden_size == 64


def test_max_new_tokens_cuts_the_answer(tiny_model):
    from refvlm_core.predictor import Predictor

    predictor = Predictor(tiny_model)
    tiny_model.config.llm.max_new_tokens = 2
    try:
        result = predictor.predict(_image(), "Describe the picture.", constrained=False)
    finally:
        tiny_model.config.llm.max_new_tokens = preset("tiny").llm.max_new_tokens
    assert result.diagnostics["tokens"] <= 2 and "cut at max_new_tokens=2" in " ".join(result.errors)


def test_constrained_is_the_default_decoding(tiny_model):
    """An answer naming an unregistered unit: written as is unconstrained, fixed by the grammar."""
    from model_samples import forced_answer_hook
    from refvlm_core.predictor import Predictor

    predictor = Predictor(tiny_model)
    invented = "<Phrase>cube</Phrase> (<Unit>keytonumber</Unit>[0]<REF>)"
    texts = {}
    for constrained in (True, False):
        tiny_model.config.llm.constrained = constrained
        try:
            result = predictor.predict(_image(), "Find the cube.",
                                       logits_hook=forced_answer_hook(tiny_model.llm.tokenizer, invented))
        finally:
            tiny_model.config.llm.constrained = True
        assert result.diagnostics["constrained"] is constrained
        texts[constrained] = result.trp_text
    assert texts[False] == invented and texts[True] != invented


def test_projector_hidden_size(tiny_model):
    plain = rebuilt(tiny_model, preset("tiny"))
    wide = rebuilt(tiny_model, tiny_with(projector__hidden_size=40))
    shapes = lambda m: sorted(tuple(p.shape) for p in m.projector.parameters())  # noqa: E731
    assert shapes(plain) != shapes(wide) and any(40 in s for s in shapes(wide))


def test_aggregation_options_change_region_features(tiny_model):
    features = tiny_model.encode_images(torch.rand(1, 3, 64, 64))
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 8:40, 16:56] = True

    def regions(**changes):
        model = rebuilt(tiny_model, tiny_with(**{f"aggregation__{k}": v for k, v in changes.items()}))
        with torch.no_grad():
            return model.region_tokens(features, masks, [1])

    default = regions()
    for changes in ({"grid": 4}, {"temperature": 10.0}, {"alpha": 0.0}):
        assert not torch.allclose(regions(**changes), default, atol=1e-6), changes


def test_router_length_is_the_inference_group_length(tiny_model):
    refs = [torch.randn(2, tiny_model.llm.hidden_size)]
    for length in (8, 3):
        model = rebuilt(tiny_model, tiny_with(router_length=length))
        routed = model.route_refs(refs, [[("box",), ("box",)]], [[0, 1]])
        assert routed["box"].embeddings.shape[1] == length


def test_decoders_name_the_units_and_their_sizes(tiny_model):
    decoders = {k: dict(v) for k, v in preset("tiny").decoders.items() if k != "depth"}
    decoders["box"]["hidden_dim"] = 16
    model = rebuilt(tiny_model, tiny_with(decoders=decoders))
    assert set(model.decoders) == {"box", "mask", "keypoint"} and set(tiny_model.decoders) == set(preset("tiny").decoders)
    count = lambda m: sum(p.numel() for p in m.decoders["box"].parameters())  # noqa: E731
    assert count(model) < count(tiny_model)


def test_system_prompt_is_in_the_prompt(tiny_model):
    plain = tiny_model.processor.prompt_ids("Find the cube.", 0)
    other = rebuilt(tiny_model, tiny_with(system_prompt="You answer in riddles.")).processor.prompt_ids(
        "Find the cube.", 0)
    text = tiny_model.llm.tokenizer.decode(other[0] if other.dim() == 2 else other)
    assert not torch.equal(plain, other) and "You answer in riddles." in text


def test_max_prompt_chars_refuses_longer_prompts(tiny_model):
    from refvlm_core.predictor import Predictor

    predictor = Predictor(rebuilt(tiny_model, tiny_with(max_prompt_chars=10)))
    with pytest.raises(InputError, match="max_prompt_chars"):
        predictor.check_inputs(_image(), "Find the red cube.", [])
    Predictor(tiny_model).check_inputs(_image(), "Find the red cube.", [])


def test_cache_dir_is_where_the_tokenizer_is_read(tmp_path, tiny_model):
    """The tokenizer extracted from the GGUF is read from cache_dir: a copy there with one
    more token is the tokenizer the model gets."""
    import shutil

    from transformers import AutoTokenizer

    from refvlm_core.base_llm import _gguf_cache_dir, load_tokenizer

    default = preset("tiny")
    source = _gguf_cache_dir(default, "tokenizer")  # where building tiny_model extracted it
    copy_at = tmp_path / source.relative_to(default.resolved_cache_dir())
    shutil.copytree(source, copy_at)
    changed = AutoTokenizer.from_pretrained(str(copy_at))
    changed.add_tokens(["<zebra-token>"])
    changed.save_pretrained(str(copy_at))
    loaded = load_tokenizer(tiny_with(cache_dir=str(tmp_path)))
    assert "<zebra-token>" in loaded.get_vocab() and "<zebra-token>" not in load_tokenizer(default).get_vocab()


def test_match_costs_reach_the_model_decoders(tiny_model):
    """What matching minimises per cost is tests/test_match_costs.py's; here: the model's
    decoders are built with the config's costs."""
    costs = {f.name: getattr(MatchCosts(), f.name) * 0.5 + 0.1 for f in dataclasses.fields(MatchCosts)}
    model = rebuilt(tiny_model, tiny_with(match_costs=MatchCosts(**costs)))
    for decoder in model.decoders.values():
        assert dataclasses.asdict(decoder.costs) == costs
    assert all(d.costs == MatchCosts() for d in tiny_model.decoders.values())


def _loss_weight_model(tiny_model, weights: dict[str, float]):
    """Decoders of two layers (so the auxiliary losses exist) under ``weights``."""
    decoders = {k: {**v, "num_layers": 2} if "num_layers" in v else dict(v) for k, v in preset("tiny").decoders.items()}
    return rebuilt(tiny_model, tiny_with(decoders=decoders, loss_weights={**preset("tiny").loss_weights, **weights}))


@pytest.fixture(scope="module")
def mixed_batch(tiny_model):
    from model_samples import mixed_samples

    processor = tiny_model.processor
    return processor.collate([processor.encode_sample(s) for s in mixed_samples()])


@pytest.fixture(scope="module")
def default_losses(tiny_model, mixed_batch):
    model = _loss_weight_model(tiny_model, {}).train()
    with torch.no_grad():
        return {k: float(v) for k, v in model(mixed_batch).items()}


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(LossWeights) if f.name != "select"])
def test_each_loss_weight_changes_the_losses(name, tiny_model, mixed_batch, default_losses):
    value = getattr(LossWeights(), name) * 0.5 + 0.1
    model = _loss_weight_model(tiny_model, {name: value}).train()
    with torch.no_grad():
        losses = {k: float(v) for k, v in model(mixed_batch).items()}
    changed = [k for k in losses if k != "loss" and abs(losses[k] - default_losses[k]) > 1e-6 * (1 + abs(losses[k]))]
    assert changed, f"loss weight {name}={value} changed no loss term: {losses}"


# ---- TrainConfig ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_train_data(tmp_path_factory)


def make_trainer(data_dir: Path, out: Path, **fields):
    from refvlm_training.engine.trainer import Trainer

    return Trainer(tiny_train_config(data_dir, out, **fields), progress=False)


def _state(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def run_steps(data_dir: Path, out: Path, steps: int = 1, **fields) -> tuple[list[dict], list[dict], object]:
    """Metrics and trainable weights after each of ``steps`` optimizer steps (the initial ones first)."""
    trainer = make_trainer(data_dir, out, steps=max(steps, 1), **fields)
    states, metrics = [_state(trainer)], []
    for _ in range(steps):
        metrics.append(trainer.train_step())
        states.append(_state(trainer))
    return metrics, states, trainer


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory):
    """Two steps of the default tiny stage-2 run: what the variations are compared with."""
    return run_steps(data_dir, tmp_path_factory.mktemp("baseline"), steps=2)


def _largest_step(states: list[dict], index: int = 1) -> float:
    return max(float((states[index][k] - states[index - 1][k]).abs().max()) for k in states[0])


def test_seed_picks_the_initial_weights(data_dir, tmp_path, baseline):
    from refvlm_training.engine.stages import build_model

    seed0 = baseline[1][0]
    seed1 = dict(build_model(tiny_train_config(data_dir, tmp_path, seed=1)).named_parameters())
    matrices = [k for k in seed0 if k.startswith("projector.") and seed0[k].ndim == 2]
    assert matrices and not any(torch.equal(seed0[k], seed1[k]) for k in matrices)


def test_batch_size_and_grad_accum_consume_samples(data_dir, tmp_path, baseline):
    """An optimizer step takes batch_size x grad_accum samples of the stream (1 x 1 in the baseline)."""
    trainer = make_trainer(data_dir, tmp_path, batch_size=2, grad_accum=2)
    trainer.train_step()
    state = trainer.stream.state_dict()
    assert (state["epoch"], state["position"]) == (0, 4)
    assert baseline[2].stream.state_dict()["position"] == 2  # two steps of one sample


def test_grad_clip_shrinks_the_step(data_dir, tmp_path, baseline):
    _, unclipped, _ = run_steps(data_dir, tmp_path / "off", grad_clip=0.0)
    _, clipped, _ = run_steps(data_dir, tmp_path / "tiny", grad_clip=1e-9)
    # Adam's first step is about lr * sign(g); a gradient clipped far below eps barely moves
    assert _largest_step(clipped) < 0.1 * _largest_step(unclipped)
    assert baseline[0][0]["grad_norm"] > 0


def test_bf16_mixed_precision_changes_the_loss(data_dir, tmp_path, baseline):
    metrics, _, _ = run_steps(data_dir, tmp_path, mixed_precision="bf16")
    fp32 = baseline[0][0]["loss"]
    assert metrics[0]["loss"] != pytest.approx(fp32, rel=1e-6)
    assert metrics[0]["loss"] == pytest.approx(fp32, rel=0.05)  # the same step, in bf16 rounding


def test_gradient_checkpointing_keeps_fewer_activations(data_dir, tmp_path):
    """Checkpointed LLM layers save only their inputs for the backward pass (recomputing the
    rest): fewer tensors are kept from the forward for the same first step."""
    saved = {}
    for on in (False, True):
        trainer = make_trainer(data_dir, tmp_path / str(on), gradient_checkpointing=on)
        count = [0]

        def pack(tensor, count=count):
            count[0] += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            trainer.train_step()
        saved[on] = count[0]
    assert saved[True] < 0.9 * saved[False], saved


def _metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_log_every_and_checkpoint_every_pick_the_steps(data_dir, tmp_path, capsys):
    trainer = make_trainer(data_dir, tmp_path, steps=3, log_every=2, checkpoint_every=2, trainable=["decoders"])
    trainer.fit()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoint step")]
    assert _metric_steps(tmp_path) == [2, 3]          # every 2nd step, and the last
    assert printed == ["checkpoint step 2", "checkpoint step 3"]


def test_save_trainable_only_writes_only_trained_tensors(data_dir, tmp_path):
    from safetensors import safe_open

    def saved_parts(out: Path, **fields) -> set[str]:
        make_trainer(data_dir, out, steps=1, trainable=["decoders"], **fields).fit()
        with safe_open(str(out / "model" / "model.safetensors"), "pt") as handle:
            return {key.split(".")[0] for key in handle.keys()}

    assert saved_parts(tmp_path / "only", save_trainable_only=True) == {"decoders"}
    assert saved_parts(tmp_path / "all") >= {"decoders", "encoder", "llm", "projector"}


def test_train_loss_weights_reach_the_losses(data_dir, tmp_path, baseline):
    trainer = make_trainer(data_dir, tmp_path, loss_weights={"lm": 0.0, "mask_focal": 3.0})
    assert all(d.weights.mask_focal == 3.0 for d in trainer.model.decoders.values())
    metrics = trainer.train_step()
    assert metrics["loss_lm"] == 0.0 and baseline[0][0]["loss_lm"] > 0.0


def _stream(data_dir: Path, tmp_path: Path, **fields):
    from refvlm_training.engine.distributed import DistInfo
    from refvlm_training.engine.trainer import SampleStream

    return SampleStream(tiny_train_config(data_dir, tmp_path, **fields), DistInfo())


def test_num_workers_starts_reader_processes(data_dir, tmp_path):
    before = set(multiprocessing.active_children())
    for workers in (0, 1):
        stream = _stream(data_dir, tmp_path, data={"train": str(data_dir), "num_workers": workers})
        stream.next_batch(1)
        started = set(multiprocessing.active_children()) - before
        assert len(started) == workers, (workers, started)
        stream._iter = None  # ends the reader
        for process in started:
            process.join(timeout=30)


def test_stage1_decimals_are_the_digits_of_text_boxes(data_dir, tmp_path):
    import re

    def texts(decimals: int) -> list[str]:
        stream = _stream(data_dir, tmp_path, stage=1, data={"train": str(data_dir), "stage1_decimals": decimals})
        return [turn.text for sample in stream.next_batch(8) for turn in sample.turns if turn.role == "assistant"]

    numbers = lambda text: re.findall(r"\d+\.\d+", text)  # noqa: E731
    two, three = texts(2), texts(3)
    assert any(numbers(t) for t in two)
    assert all(len(n.split(".")[1]) == 2 for t in two for n in numbers(t))
    assert all(len(n.split(".")[1]) == 3 for t in three for n in numbers(t))


def test_max_samples_limits_the_stream(data_dir, tmp_path):
    full = _stream(data_dir, tmp_path)
    limited = _stream(data_dir, tmp_path, data={"train": str(data_dir), "max_samples": 2})
    assert len(limited.dataset) == 2 < len(full.dataset)


def test_model_preset_and_overrides_build_the_model(data_dir, tmp_path):
    from refvlm_training.engine.stages import build_model

    model = build_model(tiny_train_config(data_dir, tmp_path, model={"preset": "tiny",
                                                                     "overrides": {"router_length": 3,
                                                                                   "projector": {"hidden_size": 40}}}))
    assert model.config.name == "tiny" and model.config.router_length == 3
    assert any(40 in p.shape for p in model.projector.parameters())
    with pytest.raises(ConfigError, match="unknown preset 'pico'"):
        build_model(tiny_train_config(data_dir, tmp_path, model={"preset": "pico"}))


def test_lr_scales_the_first_step(data_dir, tmp_path, baseline):
    _, states, _ = run_steps(data_dir, tmp_path, optim={"lr": 1e-2, "warmup_steps": 1})
    assert _largest_step(states) == pytest.approx(10 * _largest_step(baseline[1]), rel=0.05)


def test_weight_decay_shrinks_the_matrices(data_dir, tmp_path, baseline):
    lr, decay = 1e-3, 0.5
    _, states, _ = run_steps(data_dir, tmp_path, optim={"lr": lr, "warmup_steps": 1, "weight_decay": decay})
    before, plain = baseline[1][0], baseline[1][1]
    for name, value in states[1].items():  # AdamW: p <- p (1 - lr wd) - adam step, on matrices only
        expected = plain[name] - lr * decay * before[name] if value.ndim >= 2 else plain[name]
        assert torch.allclose(value, expected, atol=1e-6), name


def test_betas_change_the_second_step(data_dir, tmp_path, baseline):
    _, states, _ = run_steps(data_dir, tmp_path, steps=2, optim={"lr": 1e-3, "warmup_steps": 1, "betas": [0.5, 0.9]})
    plain = baseline[1]
    # Adam's bias correction makes the first step independent of the betas; the second is not
    assert all(torch.allclose(states[1][k], plain[1][k], atol=1e-6) for k in plain[1])
    assert not all(torch.allclose(states[2][k], plain[2][k], atol=1e-6) for k in plain[2])


def test_schedule_options_set_the_optimizer_rate(data_dir, tmp_path):
    """The rate of each of 4 steps: warm-up over 2, then cosine down to lr x min_lr_ratio
    (the defaults of tiny_train_config, warm-up 1 and ratio 0.1, give 1, 1, 0.82, 0.33 x lr)."""
    trainer = make_trainer(data_dir, tmp_path, steps=4, optim={"lr": 1e-3, "warmup_steps": 2, "min_lr_ratio": 0.5})
    rates = []
    for _ in range(4):  # the rate each optimizer step uses
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert rates == pytest.approx([0.5e-3, 1e-3, 1e-3, 0.75e-3])


def _lora_model(data_dir: Path, tmp_path: Path, **lora):
    from refvlm_training.engine.stages import build_model, configure_stage

    cfg = tiny_train_config(data_dir, tmp_path, lora={"enabled": True, "r": 4, "alpha": 8, **lora},
                            optim={"lr": 1e-3, "weight_decay": 0.0})
    model = build_model(cfg)
    configure_stage(model, cfg)
    return model


def _lora_tensors(model, kind: str) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.llm.named_parameters() if f"{kind}." in n}


@pytest.fixture(scope="module")
def plain_lora(data_dir, tmp_path_factory):
    """r 4, alpha 8, no dropout, the default target modules."""
    return _lora_model(data_dir, tmp_path_factory.mktemp("lora"))


def test_lora_rank_and_target_modules_shape_the_adapters(data_dir, tmp_path, plain_lora):
    plain = plain_lora
    other = _lora_model(data_dir, tmp_path, r=2, target_modules=["q_proj"])
    assert {p.shape[0] for p in _lora_tensors(plain, "lora_A").values()} == {4}
    assert {p.shape[0] for p in _lora_tensors(other, "lora_A").values()} == {2}
    projections = lambda m: {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in _lora_tensors(m, "lora_A")}  # noqa: E731
    assert projections(plain) == {"q_proj", "k_proj", "v_proj", "o_proj"} and projections(other) == {"q_proj"}


def _lora_logits(model, passes: int = 1) -> list[torch.Tensor]:
    with torch.no_grad():
        for p in _lora_tensors(model, "lora_B").values():
            p.fill_(0.05)  # B starts at zero: an untouched adapter adds nothing whatever alpha is
    ids = torch.arange(5, 25)[None]
    model.llm.train()
    with torch.no_grad():
        return [model.llm.causal_lm(input_ids=ids).logits for _ in range(passes)]


def test_lora_alpha_scales_the_adapters(data_dir, tmp_path, plain_lora):
    [low] = _lora_logits(plain_lora)
    [high] = _lora_logits(_lora_model(data_dir, tmp_path, alpha=32))
    assert not torch.allclose(low, high, atol=1e-5)


def test_lora_dropout_makes_training_passes_differ(data_dir, tmp_path, plain_lora):
    first, second = _lora_logits(plain_lora, passes=2)
    assert torch.equal(first, second)
    first, second = _lora_logits(_lora_model(data_dir, tmp_path, dropout=0.5), passes=2)
    assert not torch.allclose(first, second, atol=1e-5)


def test_external_decoder_settings_and_weights(tiny_model, tmp_path):
    from safetensors.torch import save_file

    from refvlm_training.engine.config import ExternalDecoderConfig
    from refvlm_training.engine.stage3 import swap_decoder

    settings = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "mlp_dim": 64}
    model = copy.deepcopy(tiny_model)
    torch.manual_seed(0)
    first = swap_decoder(model, ExternalDecoderConfig(unit="mask", kind="sam", settings=settings))
    wider = swap_decoder(model, ExternalDecoderConfig(unit="mask", kind="sam", settings={**settings, "hidden_size": 48}))
    assert (first.prompt_proj.out_features, wider.prompt_proj.out_features) == (32, 48)
    path = tmp_path / "sam.safetensors"
    save_file({f"mask_decoder.{k}": v.contiguous() for k, v in first.sam.state_dict().items()}, str(path))
    torch.manual_seed(1)
    loaded = swap_decoder(model, ExternalDecoderConfig(unit="mask", kind="sam", settings=settings, weights=str(path)))
    state = loaded.sam.state_dict()
    assert all(torch.equal(state[k], v) for k, v in first.sam.state_dict().items())
    with pytest.raises(ConfigError, match="do not exist"):
        swap_decoder(model, ExternalDecoderConfig(unit="mask", kind="sam", settings=settings,
                                                  weights=str(tmp_path / "missing.safetensors")))


def _stage0(out: Path, **vision_pretrain) -> dict:
    from refvlm_training.engine.config import config_from_dict
    from refvlm_training.engine.stage0 import pretrain_towers

    cfg = config_from_dict({"stage": 0, "out": str(out), "steps": 1, "batch_size": 2, "checkpoint_every": 1,
                            "model": {"preset": "tiny"}, "optim": {"lr": 3e-3, "warmup_steps": 1},
                            "vision_pretrain": {"scenes": 6, "width": 64, "height": 48, "head_dim": 8,
                                                **vision_pretrain}})
    pretrain_towers(cfg, progress=False)
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_stage0_render_options_change_the_first_loss(tmp_path):
    plain = _stage0(tmp_path / "plain")["loss"]
    for change in ({"scenes": 1}, {"width": 80}, {"height": 64}):
        assert _stage0(tmp_path / next(iter(change)), **change)["loss"] != pytest.approx(plain, rel=1e-6), change


def test_stage0_head_dim_is_the_heads_width(tmp_path):
    from safetensors import safe_open

    _stage0(tmp_path, head_dim=12)
    with safe_open(str(tmp_path / "model" / "dense_heads.safetensors"), "pt") as handle:
        assert handle.get_tensor("pixel_head.weight").shape[1] == 12


# What stage 0 reads of a TrainConfig; the rest (STAGE0_UNUSED) it refuses when set.
STAGE0_READS = {"stage", "seed", "out", "steps", "batch_size", "grad_clip", "checkpoint_every", "log_every",
                "data.num_workers", "model.preset", "model.overrides", "optim.lr", "optim.weight_decay",
                "optim.betas", "optim.warmup_steps", "optim.min_lr_ratio", "vision_pretrain.scenes",
                "vision_pretrain.width", "vision_pretrain.height", "vision_pretrain.head_dim",
                "vision_pretrain.brightness_jitter", "vision_pretrain.loss_weights"}
STAGE0_SET = {"grad_accum": 2, "strategy": "fsdp", "mixed_precision": "bf16", "gradient_checkpointing": True,
              "train_encoders": True, "trainable": ["decoders"], "cache_frozen": False, "save_trainable_only": True,
              "loss_weights": {"lm": 2.0}, "lora": {"enabled": True}, "external_decoder": {"unit": "mask"},
              "data.train": "shards", "data.stage1_decimals": 3, "data.max_samples": 4, "model.init_from": "m",
              "model.load_parts": {"decoders.box": "heads.safetensors"}}


def test_stage0_refuses_what_it_does_not_read():
    """A field stage 0 ignores (grad_accum once was) is refused in a stage-0 config, not
    silently dropped; every field is either read by stage 0 or refused there."""
    from refvlm_training.engine.config import STAGE0_UNUSED, config_from_dict

    unused = {path for path in walk(TrainConfig) if path.split(".")[0] in STAGE0_UNUSED or path in STAGE0_UNUSED}
    assert set(walk(TrainConfig)) - unused == STAGE0_READS, "say whether stage 0 reads each new field"
    assert set(STAGE0_SET) == set(STAGE0_UNUSED)
    base = {"stage": 0, "model": {"preset": "tiny"}}
    config_from_dict(base)
    for name, value in STAGE0_SET.items():
        data = copy.deepcopy(base)
        *parents, leaf = name.split(".")
        target = data
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
        with pytest.raises(ConfigError, match=f"stage 0 .*does not use .*'{name}'"):
            config_from_dict(data)


def test_stage_sections_are_refused_in_the_other_stages(data_dir):
    """external_decoder is stage 3's, data.stage1_decimals stage 1's and vision_pretrain
    stage 0's: another stage refuses them instead of training without them."""
    from refvlm_training.engine.config import STAGE_ONLY, config_from_dict

    assert STAGE_ONLY == {"vision_pretrain": 0, "data.stage1_decimals": 1, "external_decoder": 3}
    base = {"data": {"train": str(data_dir)}, "model": {"preset": "tiny"}}
    stage3 = {"external_decoder": {"unit": "mask", "kind": "sam"}}
    cases = {"external_decoder": stage3, "vision_pretrain": {"vision_pretrain": {"scenes": 10}},
             "data.stage1_decimals": {"data": {"train": str(data_dir), "stage1_decimals": 3}}}
    for name, section in cases.items():
        for stage in {1, 2, 3} - {STAGE_ONLY[name]}:
            with pytest.raises(ConfigError, match=f"{name} is read by stage {STAGE_ONLY[name]} only"):
                config_from_dict({**base, **(stage3 if stage == 3 else {}), "stage": stage, **section})
        only = STAGE_ONLY[name]
        if only:
            config_from_dict({**base, **(stage3 if only == 3 else {}), "stage": only, **section})
