"""Sample -> model tensors, and image + prompt -> generation inputs.

What one encoded sample holds (see ``encode_sample``):
  image         [3, S, S] float in [0, 1], letterboxed (model frame)
  input_ids     [T] with ``<image>`` expanded to one slot per image token
  labels        [T] -100 everywhere but the assistant answers (and their end-of-turn token)
  region_masks  [R, S, S] bool, one per ``<region>``, in the model frame
  ref_units     per <REF> ordinal: the units of its <Unit> block
  ref_groups    per <REF> ordinal: its unit-block index (all assistant turns, text order)
  targets       unit -> targets.UnitTargets (normalised model frame), encoded by the unit's decoder
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from refvlm_core import trp
from refvlm_core.config import ModelConfig
from refvlm_core.errors import InputError
from refvlm_core.geometry import CLIP_MEAN_RGB, Letterbox, validate_image
from refvlm_core.sample import Sample
from refvlm_core.targets import TargetFrame, UnitTargets
from refvlm_core.visual_prompts import VisualPrompt, rasterize_in_model_frame

if TYPE_CHECKING:
    from refvlm_core.decoders import UnitDecoder

IGNORE = -100
# Used only when a tokenizer has no chat template of its own (ChatML layout).
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def special_token_strings(tokenizer) -> tuple[str, ...]:
    """Every special and added token of the tokenizer, longest first (so that a token
    holding another is replaced whole)."""
    tokens = set(getattr(tokenizer, "all_special_tokens", ()))
    tokens |= set(tokenizer.get_added_vocab()) if hasattr(tokenizer, "get_added_vocab") else set()
    return tuple(sorted((t for t in tokens if t.strip()), key=len, reverse=True))


def look_alike(token: str) -> str:
    """``<|im_end|>`` -> ``‹|im_end|›``: readable, never the token. A token without angle
    brackets gets a word joiner (U+2060) after its first character instead."""
    if "<" in token or ">" in token:
        return token.replace("<", "\u2039").replace(">", "\u203a")
    return token[0] + "\u2060" + token[1:]


@dataclass
class Encoded:
    image: torch.Tensor
    input_ids: torch.Tensor
    labels: torch.Tensor
    region_masks: torch.Tensor
    ref_units: list[tuple[str, ...]]
    ref_groups: list[int]
    targets: dict[str, UnitTargets]
    letterbox: Letterbox


class Processor:
    def __init__(self, config: ModelConfig, tokenizer, num_image_tokens: int,
                 decoders: Mapping[str, "UnitDecoder"]):
        self.config = config
        self.tokenizer = tokenizer
        self.num_image_tokens = int(num_image_tokens)
        self.decoders = decoders  # unit -> its decoder, which encodes that unit's targets
        if tokenizer.chat_template is None:
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        self.image_id = tokenizer.convert_tokens_to_ids(trp.IMAGE)
        self.region_id = tokenizer.convert_tokens_to_ids(trp.REGION)
        self.ref_id = tokenizer.convert_tokens_to_ids(trp.REF)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.special_tokens = special_token_strings(tokenizer)

    @property
    def size(self) -> int:
        return self.config.vision.image_size

    # ---- image and prompts ----------------------------------------------------------
    def image_tensor(self, image: np.ndarray) -> tuple[torch.Tensor, Letterbox]:
        """[H, W, 3] uint8 -> ([3, S, S] float in [0, 1], its Letterbox)."""
        image = validate_image(image)
        letterbox = Letterbox.fit(image.shape[0], image.shape[1], self.size)
        framed = letterbox.image_to_model(image, CLIP_MEAN_RGB)                 # [S, S, 3] uint8
        return torch.from_numpy(framed).permute(2, 0, 1).float() / 255.0, letterbox

    def region_masks(self, prompts: Sequence[VisualPrompt], letterbox: Letterbox) -> torch.Tensor:
        """Visual prompts (original pixels) -> [R, S, S] bool in the model frame."""
        masks = [rasterize_in_model_frame(p, letterbox, self.size) for p in prompts]
        if not masks:
            return torch.zeros(0, self.size, self.size, dtype=torch.bool)
        return torch.from_numpy(np.stack(masks)).bool()

    def user_text(self, text: str) -> str:
        """User text with its own ``<image>``/``<region>`` placeholders kept and every other
        tag-like string neutralised (user text never becomes TRP)."""
        pieces = []
        for i, part in enumerate(text.split(trp.IMAGE)):
            if i:
                pieces.append(trp.IMAGE)
            pieces.append(trp.REGION.join(self.neutralize(p) for p in part.split(trp.REGION)))
        return "".join(pieces)

    def neutralize(self, text: str) -> str:
        """User text with no TRP tag and no special or added token of the tokenizer left
        (``<|im_start|>system`` typed by a user must not open a system turn)."""
        text = trp.neutralize(text)
        for _ in range(3):  # a replacement never forms a token; the loop only guards that
            before = text
            for token in self.special_tokens:
                text = text.replace(token, look_alike(token))
            if text == before:
                break
        return text

    # ---- tokens ---------------------------------------------------------------------
    def _messages(self, system: str | None, turns: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
        # Data system prompts may spell out TRP examples: they must never become special tokens.
        messages = [{"role": "system", "content": trp.neutralize(system or self.config.system_prompt)}]
        messages += [{"role": role, "content": text} for role, text in turns]
        return messages

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _expand_image(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """One ``<image>`` token -> ``num_image_tokens`` slots (never labelled)."""
        out_ids, out_labels = [], []
        for token, label in zip(ids, labels):
            if token == self.image_id:
                out_ids += [token] * self.num_image_tokens
                out_labels += [IGNORE] * self.num_image_tokens
            else:
                out_ids.append(token)
                out_labels.append(label)
        return out_ids, out_labels

    def tokenize_chat(self, system: str | None, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids and labels: only assistant answers (with their end-of-turn) are labelled."""
        messages = self._messages(system, turns)
        text = self._render(messages, add_generation_prompt=False)
        answer_spans = []
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(self._render(messages[:k], add_generation_prompt=True))
                end = len(self._render(messages[: k + 1], add_generation_prompt=False).rstrip())
                answer_spans.append((start, end))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        labels = [token if any(s <= begin < e for s, e in answer_spans) else IGNORE
                  for token, (begin, _) in zip(ids, encoded["offset_mapping"])]
        return self._expand_image(ids, labels)

    def prompt_ids(self, prompt: str, num_regions: int, system: str | None = None) -> torch.Tensor:
        """Inference: user prompt -> [1, T] ids ending with the assistant generation prompt."""
        text = self.user_text(prompt) if num_regions else self.neutralize(prompt)
        found = text.count(trp.REGION)
        if num_regions and found == 0:
            text += " " + ", ".join(f"region {i + 1}: {trp.REGION}" for i in range(num_regions))
        elif found != num_regions:
            raise InputError(f"the prompt has {found} <region> placeholders but {num_regions} visual "
                             "prompts were given: use one <region> per visual prompt, or none")
        if trp.IMAGE not in text:
            text = f"{trp.IMAGE}\n{text}"
        messages = self._messages(system, [("user", text)])
        ids = self.tokenizer(self._render(messages, add_generation_prompt=True), add_special_tokens=False).input_ids
        ids, _ = self._expand_image(list(ids), [IGNORE] * len(ids))
        return torch.tensor([ids])

    # ---- training samples -----------------------------------------------------------
    def encode_sample(self, sample: Sample) -> Encoded:
        image, letterbox = self.image_tensor(sample.image)
        turns = []
        for i, turn in enumerate(sample.turns):
            if turn.role not in ("user", "assistant"):
                raise InputError(f"sample {sample.id}: turn {i} has role {turn.role!r}; use 'user' or 'assistant'")
            text = self.user_text(turn.text) if turn.role == "user" else turn.text
            turns.append((turn.role, text))
        if not any(trp.IMAGE in text for role, text in turns if role == "user"):
            first = next(i for i, (role, _) in enumerate(turns) if role == "user")
            turns[first] = ("user", f"{trp.IMAGE}\n{turns[first][1]}")
        ids, labels = self.tokenize_chat(sample.system, turns)
        regions = ids.count(self.region_id)
        if regions != len(sample.visual_prompts):
            raise InputError(f"sample {sample.id}: {regions} <region> placeholders but "
                             f"{len(sample.visual_prompts)} visual prompts")
        ref_units, ref_groups, targets = self._ref_targets(sample, letterbox)
        if ids.count(self.ref_id) != len(ref_units):
            raise InputError(f"sample {sample.id}: {ids.count(self.ref_id)} <REF> tokens but the TRP "
                             f"parse has {len(ref_units)}; is TRP text hidden in the user turns?")
        return Encoded(image, torch.tensor(ids), torch.tensor(labels),
                       self.region_masks(sample.visual_prompts, letterbox), ref_units, ref_groups,
                       targets, letterbox)

    def _ref_targets(self, sample: Sample, letterbox: Letterbox
                     ) -> tuple[list[tuple[str, ...]], list[int], dict[str, UnitTargets]]:
        """Per <REF>: units and block index; per unit: targets with block ids, each encoded
        by the unit's decoder."""
        frame = TargetFrame(sample, letterbox)
        ref_units: list[tuple[str, ...]] = []
        ref_groups: list[int] = []
        group_ids: dict[str, list[int]] = {unit: [] for unit in self.decoders}
        parts: dict[str, list[np.ndarray]] = {unit: [] for unit in self.decoders}
        block_index = 0
        for turn in sample.turns:
            if turn.role != "assistant":
                continue
            blocks = trp.parse(turn.text).blocks()
            if len(blocks) != len(turn.targets):
                raise InputError(f"sample {sample.id}: an answer has {len(blocks)} unit blocks but "
                                 f"{len(turn.targets)} RefTargets; give one RefTarget per block, in text order")
            for (_, block), target in zip(blocks, turn.targets):
                if len(block.refs) != target.count and self._counts_instances(block.units):
                    raise InputError(f"sample {sample.id}: block {block_index} has {len(block.refs)} <REF>s "
                                     f"but its RefTarget has {target.count} instances")
                ref_units += [block.units] * len(block.refs)
                ref_groups += [block_index] * len(block.refs)
                for unit in block.units:
                    if unit in self.decoders:
                        decoder = self.decoders[unit]
                        group_ids[unit] += [block_index] * (target.count if decoder.instance_targets else 1)
                        part = decoder.encode_target(target, frame)
                        if part is not None:
                            parts[unit].append(part)
                block_index += 1
        targets = {unit: decoder.collate_targets(parts[unit], torch.tensor(group_ids[unit], dtype=torch.long), frame)
                   for unit, decoder in self.decoders.items()}
        return ref_units, ref_groups, targets

    def _counts_instances(self, units: Sequence[str]) -> bool:
        """Whether a block of these units has one <REF> per target instance (not so for depth)."""
        return any(unit not in self.decoders or self.decoders[unit].instance_targets for unit in units)

    # ---- batches --------------------------------------------------------------------
    def collate(self, items: Sequence[Encoded]) -> dict[str, Any]:
        """Right-padded batch. Region masks of all images are concatenated in order."""
        if not items:
            raise InputError("collate needs at least one encoded sample")
        length = max(len(item.input_ids) for item in items)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(items), length), dtype=torch.long)
        for b, item in enumerate(items):
            n = len(item.input_ids)
            input_ids[b, :n], labels[b, :n], attention[b, :n] = item.input_ids, item.labels, 1
        return {
            "images": torch.stack([item.image for item in items]),                 # [B, 3, S, S]
            "input_ids": input_ids, "labels": labels, "attention_mask": attention,  # [B, T]
            "region_masks": torch.cat([item.region_masks for item in items]),      # [R, S, S]
            "region_counts": [len(item.region_masks) for item in items],
            "ref_units": [item.ref_units for item in items],
            "ref_groups": [item.ref_groups for item in items],
            "targets": {unit: [item.targets[unit] for item in items] for unit in self.decoders},
        }

