"""A tiny FluxPipeline with random weights and real (tiny) text encoders and tokenizers, saved as a folder: the
README's diffusers example runs on it unchanged but for the folder, the device and the image size."""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = "a an the red fox in snow city at night rain lighthouse dawn of and with on , ."


def _tokenizer(max_len: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3}
    for w in WORDS.split():
        vocab.setdefault(w, len(vocab))
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  bos_token="<s>", model_max_length=max_len)
    return tok, len(vocab)


def build_tiny_flux(path: Path, seed: int = 0) -> Path:
    """Write a tiny FLUX.1 pipeline folder at ``path`` (CLIP + T5 encoders of one layer, a 1+1-block transformer)."""
    import diffusers as d
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tok, vocab = _tokenizer(16)
    t5_tok, _ = _tokenizer(16)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                                        eos_token_id=1, bos_token_id=3, pad_token_id=0))
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    transformer = d.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    vae = d.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                          up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                          latent_channels=4, norm_num_groups=8, sample_size=16, shift_factor=0.0)
    pipe = d.FluxPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                          tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(path)
    return Path(path)
