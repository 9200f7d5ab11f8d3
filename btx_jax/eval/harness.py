"""lm-evaluation-harness backend `btx`: score any directory `load_pretrained` accepts (HF, btx, mergoo,
HF base + PEFT adapter) on the harness's tasks, in JAX, without exporting to PyTorch.

    btx lm-eval --model btx --model_args pretrained=DIR[,adapter=DIR,dtype=bfloat16,tokenizer=PATH] \
        --tasks btx_jcommonsenseqa,btx_gsm8k --batch_size 16 [--limit 50]

`btx lm-eval` (btx_jax/cli/lm_eval.py) registers the backend, adds the bundled offline tasks (btx_jax/eval/tasks/)
to the task search path and then runs lm-eval's own command line, its usage errors as one line (lm-eval 0.4.13
has no plugin discovery). From Python, `import btx_jax.eval.harness` registers `btx` for
`lm_eval.simple_evaluate`.

Conventions follow the harness's `hf` backend, so scores are comparable (tests check it request by request):
  - tokens: the tokenizer's own defaults (a Llama tokenizer prepends BOS); an empty context is the BOS token
    (EOS when there is none); context/continuation are split by the harness (`TemplateLM._encode_pair`).
  - loglikelihood: context + continuation truncated from the left to `max_length` (+1), log-softmax over the
    whole vocabulary, `is_greedy` when every continuation token is the argmax.
  - loglikelihood_rolling: the harness's disjoint rolling windows of `max_length` tokens.
  - generate_until: context truncated from the left to `max_length - max_gen_toks`; greedy unless
    `do_sample` (temperature / top_p); output cut at the first EOS and the first stop sequence.
Requests are scored in batches of `batch_size` rows padded to a few length buckets (32, 64, ... tokens), so a
task compiles one program per bucket, not one per request. Generation uses the KV-cached
`btx_jax.model.generate.generate` on prompts right-padded to the same length buckets, batching requests whose prompts
have the same token length, in chunks of `gen_chunk` new tokens until every row has hit a stop sequence or
`max_gen_toks`.

The model is loaded sharded over every local device (FSDP, as training shards it; one device on CPU) in
`dtype` (default: bf16 on accelerators, fp32 on CPU); the tokenizer defaults to the model's own
(`btx_jax.eval.textgen.model_tokenizer`).

Single host only: with more than one JAX process the backend refuses to start (one clear error).
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from btx_jax import mesh as mesh_lib
from btx_jax.config import ConfigError
from btx_jax.data.errors import DataError
from btx_jax.data.tokenizer import Tokenizer, load_tokenizer
from btx_jax.model.generate import generate
from btx_jax.model import Llama, init_cache
from btx_jax.pretrained import Pretrained, inference_dtype, open_model
from btx_jax.eval.textgen import check_matches, model_tokenizer

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
MIN_BUCKET = 32
MIN_CONT_BUCKET = 4       # continuation slots scored per row: 4, 8, 16, ... (a few compilations)
TOKENIZER_OPTION = "tokenizer=PATH in --model_args"   # how lm-eval's command line names a tokenizer
_HARNESS_ARGS = ("device", "max_batch_size", "trust_remote_code")    # passed by lm-eval itself; not used here


def length_bucket(n: int, max_len: int, smallest: int = MIN_BUCKET) -> int:
    """Padded length for `n` tokens: the next power of two >= `smallest`, capped at `max_len`."""
    return min(max(smallest, 1 << (int(n) - 1).bit_length()), max_len)


def _continuation_scores(h_BTD, head_DV, at_BC, targets_BC, mask_BC):
    """(sum of log p(target) over the masked continuation slots [B], every masked target is the argmax [B]).
    Only the C continuation positions `at_BC` of each row are projected to the vocabulary: the context needs
    no logits, and a [B, T, V] fp32 buffer would make a batch memory-bound."""
    h_BCD = jnp.take_along_axis(h_BTD, at_BC[..., None], axis=1)
    logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, head_DV.astype(h_BCD.dtype), preferred_element_type=jnp.float32)
    # log-softmax at the target only: no second [B, C, V] buffer
    target_logp_BC = (jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
                      - jax.nn.logsumexp(logits_BCV, axis=-1))
    greedy_BC = jnp.argmax(logits_BCV, axis=-1) == targets_BC
    return jnp.sum(jnp.where(mask_BC, target_logp_BC, 0.0), axis=-1), jnp.all(greedy_BC | ~mask_BC, axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _score(model: Llama, params, ids_BT, segment_ids_BT, at_BC, targets_BC, mask_BC):
    """Rows scored independently (see `_continuation_scores`)."""
    h_BTD, head_DV = model.apply({"params": params}, ids_BT, segment_ids_BT=segment_ids_BT, return_hidden=True)
    return _continuation_scores(h_BTD, head_DV, at_BC, targets_BC, mask_BC)


@functools.partial(jax.jit, static_argnums=0)
def _score_shared(model: Llama, params, prefix_1P, prefix_len, suffix_GS, targets_GS, mask_GS):
    """Rows that share a prefix (the context of a multiple-choice question): the prefix runs once into a KV
    cache ([1, P], right-padded beyond `prefix_len`), then every row's suffix (the last context token and the
    continuation) runs against that cache from position `prefix_len`: one context pass instead of G."""
    G, S = suffix_GS.shape
    cache = init_cache(model.config, 1, prefix_1P.shape[1] + S, model.dtype)
    _, cache = model.apply({"params": params}, prefix_1P, cache=cache, cache_index=0, return_hidden=True)
    cache = jax.tree_util.tree_map(lambda c: jnp.broadcast_to(c, (c.shape[0], G) + c.shape[2:]), cache)
    (h_GSD, head_DV), _ = model.apply({"params": params}, suffix_GS, cache=cache, cache_index=prefix_len,
                                      return_hidden=True)
    at_GS = jnp.broadcast_to(jnp.arange(S), (G, S))
    return _continuation_scores(h_GSD, head_DV, at_GS, targets_GS, mask_GS)


@register_model("btx")
class BtxLM(TemplateLM):
    """lm-eval model over a `Pretrained` and a btx_jax `Tokenizer` (see the module docstring)."""

    def __init__(self, pretrained: str | Pretrained, adapter: str | None = None, tokenizer=None,
                 dtype: str | None = None, batch_size: int | str = 16, max_length: int | None = None,
                 max_gen_toks: int = 256, gen_chunk: int = 32, seed: int = 0, **unused):
        super().__init__()
        if jax.process_count() > 1:
            raise ConfigError(f"the btx lm-eval backend runs on a single host; this job has {jax.process_count()} "
                              "JAX processes (run the evaluation as one process)")
        if isinstance(pretrained, Pretrained):
            if tokenizer is None:
                raise DataError("a Pretrained object given: pass tokenizer= as well")
            self.pre = pretrained
            self.tok = check_matches(tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer),
                                     pretrained.config.vocab_size, option=TOKENIZER_OPTION)
        else:
            src = open_model(pretrained, adapter=adapter)
            self.tok = model_tokenizer(pretrained, src.config.vocab_size, adapter=adapter, tokenizer=tokenizer,
                                       option=TOKENIZER_OPTION)
            self.pre = src.load(dtype=inference_dtype(dtype), mesh=mesh_lib.inference_mesh())
        self.model = self.pre.model()
        self._batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length or self.pre.config.max_position_embeddings)
        self._max_gen_toks, self.gen_chunk, self.seed = int(max_gen_toks), int(gen_chunk), int(seed)
        unknown = sorted(k for k in unused if k not in _HARNESS_ARGS)
        if unknown:
            raise ConfigError(f"btx backend: unknown model_args {', '.join(unknown)} (known: pretrained, adapter, "
                              "tokenizer, dtype, max_length, max_gen_toks, gen_chunk, seed)")

    # ---- the harness's tokenisation conventions ----
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tok.bos_id
        return bos if bos is not None and bos >= 0 else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos_text = self.tok.decode([self.prefix_token_id])
        if add_special_tokens is False or (add_special_tokens is None and bos_text and string.startswith(bos_text)):
            return self.tok.encode(string)
        return self.tok.encode_as_tokenizer_default(string)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- scoring ----
    def score_rows(self, rows: list[list[int]], cont_lens: list[int],
                   disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(sum log p, is_greedy) of the last `cont_len` tokens of each token row (each row <= max_length + 1).
        With batch_size > 1, rows that share everything before their continuation (the choices of one
        multiple-choice question) are scored together over one pass of that prefix (`_score_shared`); the
        other rows are batched longest first and padded to length buckets (`_score`)."""
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        B = self.batch_size
        groups: dict[tuple, list[int]] = {}
        for i, (row, k) in enumerate(zip(rows, cont_lens)):
            groups.setdefault(tuple(row[:len(row) - 1 - k]), []).append(i)
        share = lambda prefix, g: B > 1 and len(prefix) > 0 and len(g) > 1  # noqa: E731
        alone = sorted((i for prefix, g in groups.items() if not share(prefix, g) for i in g),
                       key=lambda i: -len(rows[i]))
        calls = [(self._rows_alone, alone[j:j + B]) for j in range(0, len(alone), B)]
        calls += [(self._rows_shared, g[j:j + B]) for prefix, g in groups.items() if share(prefix, g)
                  for j in range(0, len(g), B)]
        for score, idx in tqdm(calls, disable=disable_tqdm, desc="btx loglikelihood batches"):
            for i, result in zip(idx, score([rows[i] for i in idx], [cont_lens[i] for i in idx])):
                out[i] = result
        return out

    def _rows_alone(self, rows: list[list[int]], cont_lens: list[int]) -> list[tuple[float, bool]]:
        T = length_bucket(max(len(r) for r in rows) - 1, self.max_length)
        C = length_bucket(max(cont_lens), T, smallest=MIN_CONT_BUCKET)
        R = 1 << (len(rows) - 1).bit_length()          # a last, partial batch: rows to a power of two
        ids, segs = np.zeros((R, T), np.int32), np.zeros((R, T), np.int32)
        at, targets, mask = np.zeros((R, C), np.int32), np.zeros((R, C), np.int32), np.zeros((R, C), bool)
        for r, (row, k) in enumerate(zip(rows, cont_lens)):
            n = len(row) - 1
            ids[r, :n], segs[r, :n] = row[:-1], 1
            at[r, :k], targets[r, :k], mask[r, :k] = np.arange(n - k, n), row[n - k + 1:], True
        logp, greedy = jax.device_get(_score(self.model, self.pre.params, ids, segs, at, targets, mask))
        return [(float(logp[r]), bool(greedy[r])) for r in range(len(rows))]

    def _rows_shared(self, rows: list[list[int]], cont_lens: list[int]) -> list[tuple[float, bool]]:
        P = len(rows[0]) - 1 - cont_lens[0]                # the shared prefix: inputs before the continuation
        prefix = np.zeros((1, length_bucket(P, self.max_length)), np.int32)
        prefix[0, :P] = rows[0][:P]
        S = length_bucket(max(cont_lens), self.max_length, smallest=MIN_CONT_BUCKET)
        G = 1 << (len(rows) - 1).bit_length()
        suffix, targets, mask = np.zeros((G, S), np.int32), np.zeros((G, S), np.int32), np.zeros((G, S), bool)
        for r, (row, k) in enumerate(zip(rows, cont_lens)):
            suffix[r, :k], targets[r, :k], mask[r, :k] = row[P:P + k], row[P + 1:P + k + 1], True
        logp, greedy = jax.device_get(_score_shared(self.model, self.pre.params, prefix, np.int32(P), suffix,
                                                    targets, mask))
        return [(float(logp[r]), bool(greedy[r])) for r in range(len(rows))]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows, cont_lens = [], []
        for _, context_enc, continuation_enc in requests:
            if not continuation_enc or len(continuation_enc) > self.max_length:
                raise ValueError(f"continuation of {len(continuation_enc)} tokens: must be 1..{self.max_length}")
            rows.append((context_enc + continuation_enc)[-(self.max_length + 1):])
            cont_lens.append(len(continuation_enc))
        results = self.score_rows(rows, cont_lens, disable_tqdm=disable_tqdm)
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ----
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[tuple, list[int]] = {}
        prepared = []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise ValueError(f"max_gen_toks {max_gen} must be below the model's max_length {self.max_length}")
            temperature = float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0
            top_p = float(kwargs.get("top_p", 1.0) or 1.0)
            ids = self.tok_encode(context)[-(self.max_length - max_gen):]
            prepared.append((ids, until, max_gen))
            groups.setdefault((len(ids), max_gen, temperature, top_p), []).append(i)
        out: list[str | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="btx generate_until")
        for (_, max_gen, temperature, top_p), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                texts = self._generate_batch([prepared[i][0] for i in batch], [prepared[i][1] for i in batch],
                                             max_gen, temperature, top_p)
                for i, text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                pbar.update(len(batch))
        pbar.close()
        return out

    def _generate_batch(self, prompts: list[list[int]], untils: list[list[str]], max_gen: int, temperature: float,
                        top_p: float) -> list[str]:
        """Generate for equal-length prompts in chunks until each row stopped; the texts, post-processed."""
        prompt_BT = np.asarray(prompts, np.int32)
        B, step = len(prompts), self.gen_chunk      # a fixed chunk: one compilation per length bucket
        rows = 1 << (B - 1).bit_length()                       # batch padded to a power of two, too
        new_BN = np.zeros((B, 0), np.int32)
        while new_BN.shape[1] < max_gen:
            ids_BT = np.concatenate([prompt_BT, new_BN], axis=1)
            T = ids_BT.shape[1]
            padded = np.zeros((rows, length_bucket(T, max(T, self.max_length))), np.int32)
            padded[:B, :T] = ids_BT
            out = generate(self.model, self.pre.params, jnp.asarray(padded), jnp.int32(T),
                           jax.random.PRNGKey(self.seed + new_BN.shape[1]), max_new_tokens=step,
                           temperature=temperature, top_p=top_p)
            new_BN = np.concatenate([new_BN, np.asarray(out)[:B]], axis=1)[:, :max_gen]
            if all(self._stopped(row, until) for row, until in zip(new_BN, untils)):
                break
        new = new_BN
        return [postprocess_generated_text(self.tok_decode(self._before_eos(row)), until, None)
                for row, until in zip(new, untils)]

    def _before_eos(self, row) -> list[int]:
        row = [int(t) for t in row]
        return row[:row.index(self.eot_token_id)] if self.eot_token_id in row else row

    def _stopped(self, row, until: list[str]) -> bool:
        if self.eot_token_id in row:
            return True
        text = self.tok_decode(row)
        return any(s and s in text for s in until)


def check_model_args(arg_string: str) -> None:
    """Fail fast, before lm-eval indexes its tasks, on a model directory, adapter or tokenizer that cannot work
    (the same errors the backend would raise later, without loading any weights)."""
    args = lm_utils.simple_parse_args_string(arg_string)
    if "pretrained" not in args:
        raise ConfigError("btx backend: --model_args needs pretrained=DIR")
    directory = Path(args["pretrained"])
    config = open_model(directory, adapter=args.get("adapter")).config        # configs and tensor headers only
    model_tokenizer(directory, config.vocab_size, adapter=args.get("adapter"), tokenizer=args.get("tokenizer"),
                    option=TOKENIZER_OPTION)


def check_task_file(path: str | Path) -> None:
    """A task YAML that exists and parses (syntax only: its `!function` tags are composed, never constructed or
    run), else one error naming the file and the line."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    try:
        yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None
