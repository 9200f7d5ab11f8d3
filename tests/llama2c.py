"""Test helper: the real pretrained llama2.c model stories260K (../shared/data/model/stories260K, see its SOURCE.md)
as a Hugging Face directory written with transformers (config.json + safetensors + tokenizer.json).

    stories260k_hf(dst) -> Path        # LlamaForCausalLM weights + the converted tok512 tokenizer
    tok512_hf(dst) -> Path             # only the tokenizer (512 pieces), as an HF tokenizer directory

The llama2.c tokenizer file (scores + pieces, spaces shown as ' ') is turned back into the sentencepiece BPE
model it was exported from (byte fallback, dummy prefix, identity normalisation), which transformers then
converts to its fast tokenizer. Query/key rows are permuted from llama2.c's interleaved rotary pairs to the
half-split layout of HF Llama (the inverse of llama2.c export.py's permute_reverse)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

STORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "model" / "stories260K"


def _require_stories() -> None:
    """Skip the calling test where ../shared is absent (a checkout outside the workspace; CI has it)."""
    if not (STORIES / "stories260K.bin").is_file():
        pytest.skip(f"{STORIES} is not here (the real llama2.c model lives in ../shared)")


def _sentencepiece_model(path: Path) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb
    raw = path.read_bytes()
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = 512
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    off = 4                                                # int32 max_token_length
    for i in range(512):
        score, n = struct.unpack_from("<fi", raw, off)
        piece = raw[off + 8:off + 8 + n].decode("utf-8")
        off += 8 + n
        p = m.pieces.add()
        if i == 0:
            p.piece, p.type = "<unk>", pb.ModelProto.SentencePiece.UNKNOWN
        elif i in (1, 2):
            p.piece, p.type = ("<s>", "</s>")[i - 1], pb.ModelProto.SentencePiece.CONTROL
        elif i < 259:
            p.piece, p.type = f"<0x{i - 3:02X}>", pb.ModelProto.SentencePiece.BYTE
        else:
            p.piece, p.type = piece.replace(" ", "\u2581"), pb.ModelProto.SentencePiece.NORMAL
        p.score = score
    return m.SerializeToString()


def tok512_hf(dst: Path) -> Path:
    import transformers
    _require_stories()
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.model").write_bytes(_sentencepiece_model(STORIES / "tok512.bin"))
    (dst / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                                           "add_eos_token": False}))
    transformers.AutoTokenizer.from_pretrained(str(dst)).save_pretrained(str(dst))   # + tokenizer.json (fast loads)
    return dst


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """[heads*hd, in] rows ordered (pair, 2) per head -> (2, pair) per head (HF rotate_half layout)."""
    out, d_in = w.shape
    return w.reshape(heads, out // heads // 2, 2, d_in).transpose(0, 2, 1, 3).reshape(out, d_in)


def stories260k_hf(dst: Path) -> Path:
    import torch
    import transformers
    _require_stories()
    raw = (STORIES / "stories260K.bin").read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack_from("<7i", raw, 0)
    f = np.frombuffer(raw, dtype="<f4", offset=28)
    hd = dim // heads
    sizes = dict(emb=(vocab, dim), rms_att=(layers, dim), wq=(layers, dim, dim), wk=(layers, kv_heads * hd, dim),
                 wv=(layers, kv_heads * hd, dim), wo=(layers, dim, dim), rms_ffn=(layers, dim),
                 w1=(layers, hidden, dim), w2=(layers, dim, hidden), w3=(layers, hidden, dim), rms_final=(dim,))
    w, off = {}, 0
    for k, shape in sizes.items():
        n = int(np.prod(shape))
        w[k], off = f[off:off + n].reshape(shape).copy(), off + n
    config = transformers.LlamaConfig(vocab_size=abs(vocab), hidden_size=dim, intermediate_size=hidden,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      max_position_embeddings=seq, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    sd = {"model.embed_tokens.weight": w["emb"], "model.norm.weight": w["rms_final"], "lm_head.weight": w["emb"]}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": _unpermute(w["wq"][i], heads),
               p + "self_attn.k_proj.weight": _unpermute(w["wk"][i], kv_heads),
               p + "self_attn.v_proj.weight": w["wv"][i], p + "self_attn.o_proj.weight": w["wo"][i],
               p + "mlp.gate_proj.weight": w["w1"][i], p + "mlp.down_proj.weight": w["w2"][i],
               p + "mlp.up_proj.weight": w["w3"][i], p + "input_layernorm.weight": w["rms_att"][i],
               p + "post_attention_layernorm.weight": w["rms_ffn"][i]}
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    dst = Path(dst)
    model.save_pretrained(str(dst))
    return tok512_hf(dst)
