"""transformers interop: ``MegasleepForCausalLM``, a thin ``PreTrainedModel`` around a HybridLM whose
forward is the sleep forward with the config's recorded sleep settings, and whose ``generate`` runs the
streaming engine (wake/sleep decoding) instead of transformers' KV-cache loop.

After ``import megasleep``, ``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained(export_dir)`` load a
megasleep export (the registration happens when transformers' auto classes are imported; see
autoregister.py). Tensor names are HybridLM's own: the wrapper shares the HybridLM's modules as its
own attributes, so the export's model.safetensors loads without renaming.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from megasleep.checkpoint.hf_config import MegasleepConfig
from megasleep.models.hybrid import HybridLM
from megasleep.sleep import SleepConfig, sleep_forward


class MegasleepForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MegasleepConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}
    _no_split_modules = ["Block"]

    def __init__(self, config: MegasleepConfig):
        super().__init__(config)
        hybrid = HybridLM(config.model_config())
        object.__setattr__(self, "hybrid", hybrid)  # not a submodule: its children are registered below
        self.embed_tokens, self.layers = hybrid.embed_tokens, hybrid.layers
        self.norm_f, self.lm_head = hybrid.norm_f, hybrid.lm_head
        if not config.tie_word_embeddings:
            self._tied_weights_keys = {}
        self.post_init()

    def _init_weights(self, module):  # HybridLM initialises itself; loading overwrites every tensor
        return

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def sleep_config(self, length: int, **overrides) -> SleepConfig:
        """The recorded sleep settings (window, passes, eviction); one window of ``length`` when none."""
        saved = dict(getattr(self.config, "sleep", None) or {})
        saved = {k: v for k, v in saved.items() if k in SleepConfig.model_fields and v is not None}
        saved.setdefault("window", max(1, length))
        saved.update({k: v for k, v in overrides.items() if v is not None})
        saved["random_passes"] = None  # evaluation / generation use the fixed N
        return SleepConfig(**saved)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Sleep forward over ``input_ids`` with the config's sleep settings (``passes`` / ``window`` /
        ``eviction`` keyword arguments override them). ``labels`` -> mean next-token CE (-100 ignored)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("MegasleepForCausalLM: padded batches are not supported (attention_mask has zeros); "
                             "give sequences of one length or use megasleep's own evaluation")
        cfg = self.sleep_config(input_ids.shape[1], **{k: kwargs.pop(k, None) for k in ("window", "passes",
                                                                                           "eviction")})
        out = sleep_forward(self.hybrid, input_ids, cfg, return_logits=True)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                                     labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, seed: int | None = None, **kwargs) -> torch.Tensor:
        """Prompt + continuation ids [B, T + new] from megasleep's streaming engine (greedy unless
        ``do_sample``); rows that stop early at ``eos_token_id`` are right-padded with it."""
        from megasleep.inference.generate import generate as stream_generate

        kwargs.pop("attention_mask", None)
        sleep = self.sleep_config(input_ids.shape[1], **{k: kwargs.pop(k, None) for k in ("window", "passes",
                                                                                            "eviction")})
        if kwargs:
            raise TypeError(f"MegasleepForCausalLM.generate: unsupported arguments {sorted(kwargs)}")
        res = stream_generate(self.hybrid, input_ids.tolist(), max_new_tokens, sleep=sleep,
                              temperature=temperature if do_sample else 0.0, top_k=top_k, top_p=top_p,
                              eos_id=eos_token_id, seed=seed, device=input_ids.device)
        pad = eos_token_id if eos_token_id is not None else 0
        width = max(len(t) for t in res.tokens)
        new = torch.tensor([t + [pad] * (width - len(t)) for t in res.tokens], dtype=input_ids.dtype,
                           device=input_ids.device)
        return torch.cat([input_ids, new], dim=1)


__all__ = ["MegasleepForCausalLM"]
