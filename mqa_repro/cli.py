"""The ``mqa-repro`` command line: each command parses, loads the spec and calls one library function."""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from .console import err, show_trained
from .errors import UserError

app = typer.Typer(
    name="mqa-repro",
    help="Reproduce 'Fast Transformer Decoding: One Write-Head is All You Need' (multi-query attention) "
         "end to end: prepare real corpora, train every attention variant, evaluate BLEU and perplexity, "
         "time incremental decoding beside the device's roofline, and report the paper's tables.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _choices(name: str, *values: str) -> type:
    """A str Enum of ``values`` (each member named as its value): Typer shows and checks them as choices."""
    return Enum(name, {v: v for v in values}, type=str)


TableFormat = _choices("TableFormat", "table", "json")
DataSource = _choices("DataSource", "auto", "local", "hub")
Device = _choices("Device", "auto", "cpu", "cuda")
Split = _choices("Split", "dev", "test")
InferDtype = _choices("InferDtype", "fp32", "bf16")
BenchFormat = _choices("BenchFormat", "table", "json", "csv")
BenchDtype = _choices("BenchDtype", "bf16", "fp32")
Sweep = _choices("Sweep", "batch", "length")
ReportFormat = _choices("ReportFormat", "md", "csv", "json", "latex")
_DEVICE = typer.Option(Device.auto, "--device", help="auto, cpu or cuda.")   # evaluate, translate, ... run


@app.callback()
def _root() -> None:
    """Commands take an experiment spec (YAML, see experiments/) and write under results/."""


# --------------------------------------------------------------------------------------------------
@app.command()
def describe(
    spec: Path = typer.Argument(..., help="Experiment spec (YAML), e.g. experiments/wmt14_ende.yaml."),
    format: TableFormat = typer.Option(TableFormat.table, "--format", "-f", help="table, or json for machines."),
):
    """Validate a spec and list its variants: heads, K/V heads, d_k, d_v, d_ff, window, parameters and
    key/value cache bytes per decoded token per sequence (bf16; self-attention and encoder-decoder apart)."""
    from .console import show_describe
    from .spec import describe_rows
    from .specfile import load_spec

    s = load_spec(spec)
    rows = describe_rows(s)
    if format == TableFormat.json:
        print(json.dumps(rows, indent=2))
        return
    show_describe(s, rows)


# --------------------------------------------------------------------------------------------------
@app.command()
def prepare(
    spec: Path = typer.Argument(..., help="Experiment spec (YAML); its data section is shared by all variants."),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="Local corpora, one folder per corpus laid out as ../shared/data "
        "(default: $MQA_REPRO_DATA, else ../shared/data if it exists)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: data/<spec name>)."),
    source: DataSource = typer.Option(
        DataSource.auto, "--source", help="auto: the corpus folder in the data directory (an error if that "
        "folder exists without it); the datasets hub (the spec's data.hub) only when no data directory exists, "
        "saying so; local: the data directory only; hub: download even when a local copy exists."),
    force: bool = typer.Option(False, "--force", help="Prepare again even when the output is up to date."),
    format: TableFormat = typer.Option(TableFormat.table, "--format", "-f", help="table, or json (the manifest)."),
):
    """Turn a spec's corpus into training data: one SentencePiece model shared by source and target, token
    arrays with offsets per split and side, the raw dev/test text, and manifest.json (sha256 of every source
    file, counts, hashes). Re-running with unchanged sources and data section does nothing."""
    from .console import show_prepared
    from .prepare import prepare as prepare_data
    from .provenance import check_writable
    from .specfile import load_spec

    if out_dir is not None:
        check_writable(out_dir, "dir", "--out")
    r = prepare_data(load_spec(spec), data_dir=data_dir, out=out_dir, source=source.value, force=force)
    if format == TableFormat.json:
        print(json.dumps({"path": str(r.path), "up_to_date": r.up_to_date, "manifest": r.manifest}, indent=2))
        return
    show_prepared(r)


# --------------------------------------------------------------------------------------------------
@app.command()
def train(
    spec: Path = typer.Argument(..., help="Experiment spec (YAML), e.g. experiments/tiny.yaml."),
    variant: Optional[List[str]] = typer.Option(None, "--variant", "-v", help="Variant to train (repeatable)."),
    all_variants: bool = typer.Option(False, "--all", help="Train every variant of the spec, one after another."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of weights, data order and dropout "
                                       "(default: training.seed)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a spec value, validated like the "
                                             "spec: section.key=value (YAML value), repeatable."),
    device: Device = typer.Option(Device.auto, "--device", help="auto: CUDA when available (bf16 autocast), "
                                  "else the CPU (float32)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's checkpoint, exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a run folder that already holds a "
                                   "run with no checkpoint to resume (without it, train refuses)."),
    out_root: Path = typer.Option(Path("results"), "--out", help="Results root: runs go to "
                                  "OUT/<spec>/<variant>/seed<N>/."),
    ckpt_root: Path = typer.Option(Path("checkpoints"), "--checkpoints", help="Checkpoint root (git-ignored): "
                                   "CHECKPOINTS/<spec>/<variant>/seed<N>/last.pt."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared data (default: data/<spec name>)."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="Stop (with a checkpoint) after this "
                                             "step although the schedule runs to training.steps; --resume goes on."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model's "
                                            "forward and the loss (default: on CUDA only); changes speed, not the "
                                            "recipe."),
    fused: Optional[bool] = typer.Option(None, "--fused-optimizer/--plain-optimizer", help="Fused AdamW / "
                                         "foreach Adafactor (default: on CUDA only)."),
):
    """Train variants with the spec's recipe: token-budget batches (packed when training.pack), Adafactor or
    AdamW, label smoothing, z-loss, clipping, dev ln(perplexity) every eval_every steps, atomic checkpoints
    holding everything --resume needs. SIGINT/SIGTERM save a checkpoint first. Under
    `torchrun --nproc_per_node=N -m mqa_repro train ...` trains with DDP at the same global batch."""
    import os

    from .provenance import check_writable
    from .specfile import apply_overrides, load_spec
    from .step import StepOptions
    from .train import train_variant

    s = load_spec(spec)
    check_writable(out_root, "dir", "--out")
    check_writable(ckpt_root, "dir", "--checkpoints")
    if all_variants and variant:
        raise UserError("pass either --variant NAME ... or --all, not both")
    if not all_variants and not variant and len(s.variants) > 1:
        raise UserError(f"{spec} has {len(s.variants)} variants ({', '.join(s.variants)}); "
                        f"pick with --variant NAME or train them all with --all")
    if resume and overwrite:
        raise UserError("pass --resume (continue the run's checkpoint) or --overwrite (start over), not both")
    if stop_after is not None and stop_after <= 0:
        raise UserError(f"--stop-after must be a positive step, got {stop_after}")
    if seed is not None and seed < 0:
        raise UserError(f"--seed must be 0 or more, got {seed}")
    chosen = [apply_overrides(v, set_) for v in s.select(None if all_variants else variant)]
    main_rank = int(os.environ.get("RANK", "0")) == 0
    for v in chosen:
        r = train_variant(v, seed, device=device.value, resume=resume, out_root=out_root,
                          checkpoint_root=ckpt_root, data=data, stop_after=stop_after, overwrite=overwrite,
                          step_options=StepOptions(compile=compile_, fused_optimizer=fused))
        if main_rank:
            show_trained(f"{v.spec_name}/{v.name}", r)


@app.command()
def uptrain(
    run_dir: Path = typer.Argument(..., help="A finished multi-head run, e.g. results/multi30k_ende/multi_head/seed1."),
    kv_heads: int = typer.Option(..., "--kv-heads", help="Key/value heads of the result: 1 = multi-query, "
                                 "between 1 and n_heads = grouped-query (must divide n_heads)."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Uptrain for this fraction of the "
                                             "source run's steps (Ainslie et al.: 0.05)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Uptrain for this many steps instead."),
    method: str = typer.Option("mean", "--method", help="Initial key/value projections: mean (mean-pool the "
                               "heads of each group), first (the group's first head) or random."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of data order and dropout (default: the "
                                       "source run's)."),
    device: Device = typer.Option(Device.auto, "--device", help="auto: CUDA when available, else the CPU."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted uptraining run, exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a run folder that already holds a "
                                   "run with no checkpoint to resume (without it, uptrain refuses)."),
    out_root: Path = typer.Option(Path("results"), "--out", help="Results root: the run goes to "
                                  "OUT/<spec>/<source>_to_kv<G>_<method>_<N>pct/seed<N>/."),
    ckpt_root: Path = typer.Option(Path("checkpoints"), "--checkpoints", help="Checkpoint root (git-ignored)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared data (default: data/<spec name>)."),
):
    """Convert a trained multi-head model to grouped- or multi-query attention (Ainslie et al. 2023: mean-pool
    the key and value heads of each group, in every attention layer) and continue training it for a fraction
    of the original steps, with a short schedule of the source's kind and peak learning rate. The result is
    a run like any other: evaluate it with `mqa-repro evaluate`; `report` shows it in Table 1."""
    from .provenance import check_writable
    from .uptrain import uptrain_run

    if seed is not None and seed < 0:
        raise UserError(f"--seed must be 0 or more, got {seed}")
    if resume and overwrite:
        raise UserError("pass --resume (continue the run's checkpoint) or --overwrite (start over), not both")
    check_writable(out_root, "dir", "--out")
    check_writable(ckpt_root, "dir", "--checkpoints")
    r, target = uptrain_run(run_dir, kv_heads, method=method, fraction=fraction, steps=steps, seed=seed,
                            device=device.value, resume=resume, out_root=out_root, checkpoint_root=ckpt_root,
                            data=data, overwrite=overwrite)
    show_trained(f"{target.spec_name}/{target.name}", r)


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory written by train, e.g. results/tiny/multi_head/seed0."),
    split: Optional[List[Split]] = typer.Option(None, "--split", help="dev and/or test (repeatable; default both)."),
    beam: Optional[List[int]] = typer.Option(None, "--beam", help="Beam sizes for the test sets (repeatable; "
                                             "default evaluation.beams; 1 is greedy). Dev is always greedy."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sentences per decoding batch "
                                             "(default evaluation.batch_size)."),
    device: Device = _DEVICE,
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared data (default: the one the run trained on)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint file (default: the one "
                                              "named in the run's manifest.json)."),
    format: TableFormat = typer.Option(TableFormat.table, "--format", "-f", help="table, or json (metrics.json)."),
):
    """Perplexity and BLEU of a trained run, the paper's protocol: dev ln(perplexity) per subword, sacrebleu
    BLEU (intl and 13a, with signatures) greedy on dev and beam 1 / beam 4 on each test set; LMs: perplexity
    per subword and per word. Writes metrics.json, hyp.<split>.beam<k>.txt, ref.<split>.txt, manifest.json."""
    from .console import show_metrics
    from .evaluate import evaluate_run
    from .provenance import check_writable

    if run_dir.is_dir():
        check_writable(run_dir, "dir", "run folder")
    if beam and any(k < 1 for k in beam):
        raise UserError(f"--beam must be a positive integer, got {min(beam)}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    splits = [x.value for x in split] if split else ["dev", "test"]
    m = evaluate_run(run_dir, splits=splits, beams=beam, batch_size=batch_size, device=device.value,
                     data=data, checkpoint=checkpoint)
    if format == TableFormat.json:
        print(json.dumps(m, indent=2))
        return
    show_metrics(m)


# --------------------------------------------------------------------------------------------------
_TARGET_HELP = ("A run directory written by train (its manifest.json names the checkpoint and the prepared data "
                "whose SentencePiece model is used) or a checkpoint file (prepared data: --data, else "
                "data/<spec name>).")
_TARGET = typer.Argument(..., help=_TARGET_HELP)
_TRANSLATE_BEAM_HELP = "Beam size (1 = greedy); beams use the spec's evaluation.length_penalty and decode limit."


@app.command()
def translate(
    target: Path = _TARGET,
    input: str = typer.Option("-", "--input", "-i", help="Source text, one sentence per line (- for stdin)."),
    output: str = typer.Option("-", "--output", "-o", help="Translations, one line per input line (- for stdout)."),
    beam: int = typer.Option(1, "--beam", help=_TRANSLATE_BEAM_HELP),
    batch_tokens: int = typer.Option(8192, "--batch-tokens", help="Source tokens per decoding batch (sentences "
                                     "are bucketed by length under this budget)."),
    device: Device = _DEVICE,
    dtype: InferDtype = typer.Option(InferDtype.fp32, "--dtype", help="fp32 (what evaluate decodes in) or bf16."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared data holding the SentencePiece model "
                                        "(default: the run's)."),
):
    """Translate raw text with a trained encoder-decoder run: SentencePiece-encode each line, decode with the
    fast engine, detokenize as evaluate does, one output line per input line in input order. Lines are split
    at newline only. An empty line gives an empty line. A line with more subwords than the model was trained
    on (data.max_len - 1, the cut evaluate applies) is truncated to its first that many, and the count is
    printed on stderr. A progress bar shows on a terminal. Under `torchrun --nproc_per_node N -m mqa_repro
    translate ...` the lines are shared out over the processes (one GPU each, or gloo on the CPU) and rank 0
    writes the one output, in input order; an output file is written whole or not at all."""
    from .translate import run as run_lines

    run_lines(target, input, output, command="translate", beam=beam, batch_tokens=batch_tokens,
              device=device.value, dtype=dtype.value, data=data,
              say=lambda msg: err.print(msg, highlight=False, soft_wrap=True))


@app.command()
def generate(
    target: Path = _TARGET,
    input: str = typer.Option("-", "--input", "-i", help="Prompts, one per line (- for stdin)."),
    output: str = typer.Option("-", "--output", "-o", help="Continuations, one line per prompt (- for stdout)."),
    beam: int = typer.Option(1, "--beam", help="Beam size (1 = greedy), with the spec's "
                             "evaluation.length_penalty."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Subwords generated per prompt at most "
                                       "(EOS ends a continuation). A long prompt keeps its last subwords, leaving "
                                       "room for this many (at least half the model's positions stay the "
                                       "prompt's); where the positions still run out, stderr says so."),
    batch_tokens: int = typer.Option(8192, "--batch-tokens", help="Prompt tokens per decoding batch."),
    device: Device = _DEVICE,
    dtype: InferDtype = typer.Option(InferDtype.fp32, "--dtype", help="fp32 or bf16."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared data holding the SentencePiece model "
                                        "(default: the run's)."),
):
    """Continue prompts with a trained decoder-only (language model) run: each line is a prompt, the output
    line its detokenized continuation (greedy or beam). Lines are split at newline only. An empty line gives
    an empty line. A prompt with more subwords than the model was trained on (data.max_len - 1) keeps its
    last that many (the continuation follows them), and the count is printed on stderr. A progress bar shows
    on a terminal. Under `torchrun --nproc_per_node N -m mqa_repro generate ...` the prompts are shared out
    over the processes and rank 0 writes the one output, in input order; an output file is written whole or
    not at all."""
    from .translate import run as run_lines

    run_lines(target, input, output, command="generate", beam=beam, batch_tokens=batch_tokens,
              max_new_tokens=max_new_tokens, device=device.value, dtype=dtype.value, data=data,
              say=lambda msg: err.print(msg, highlight=False, soft_wrap=True))


# --------------------------------------------------------------------------------------------------
@app.command("decode-bench")
def decode_bench(
    spec: Path = typer.Argument(..., help="Experiment spec (YAML), e.g. experiments/wmt14_ende.yaml."),
    variant: Optional[List[str]] = typer.Option(None, "--variant", help="Variant(s) to time (repeatable; default all)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sentences (default benchmark.batch_size; "
                                             "benchmark.cpu_batch_size on the CPU)."),
    src_len: Optional[int] = typer.Option(None, "--src-len", help="Source tokens (default benchmark.src_len)."),
    tgt_len: Optional[int] = typer.Option(None, "--tgt-len", help="Decoded tokens, EOS ignored (default benchmark.tgt_len)."),
    beam: Optional[List[int]] = typer.Option(None, "--beam", help="Beam sizes (repeatable; 1 = greedy; default "
                                             "benchmark.beams)."),
    device: Device = _DEVICE,
    dtype: Optional[BenchDtype] = typer.Option(None, "--dtype", help="bf16 or fp32 (default benchmark.dtype)."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Timed runs per measurement (median reported)."),
    format: BenchFormat = typer.Option(BenchFormat.table, "--format", "-f", help="table, json or csv."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write the results with provenance here (JSON; "
                                            "CSV rows if the name ends in .csv)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Time a trained checkpoint's weights."),
    peer: Optional[str] = typer.Option(None, "--peer", help="hf: also time Hugging Face generate() on a Marian "
                                       "config of the same dimensions and print the ratio. ct2: also time "
                                       "CTranslate2 (pip install ctranslate2, or the ct2 extra) running the same "
                                       "weights on the same device, at the same shape or (--real) on the same sentences, "
                                       "both of its multi-query forms labelled (num_heads_kv=1 copies the K/V "
                                       "head to every head; the per-layer multi_query flag keeps one)."),
    sweep: Optional[Sweep] = typer.Option(None, "--sweep", help="batch (1..1024) or length (32..256): greedy "
                                          "decoder us/token across the sweep instead of the Table 2 rows."),
    sweep_values: Optional[List[int]] = typer.Option(None, "--sweep-value", help="Sweep points (repeatable)."),
    train: bool = typer.Option(True, "--train/--no-train", help="Time the training step too."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a spec value of the variants timed, "
                                             "validated like the spec: section.key=value (e.g. "
                                             "training.micro_batch_tokens=32768), repeatable; recorded in the "
                                             "JSON's variants and spec hashes."),
    train_compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="The training row: "
                                                 "torch.compile the model's forward and the loss, as train "
                                                 "does (default: on CUDA only)."),
    train_fused: Optional[bool] = typer.Option(None, "--fused-optimizer/--plain-optimizer", help="The training "
                                               "row: fused AdamW / foreach Adafactor (default: on CUDA only)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Check the decoding engine against the model first."),
    attention: str = typer.Option("triton", "--attention", help="Decode attention on CUDA: triton or torch."),
    refresh_ceilings: bool = typer.Option(False, "--refresh-ceilings", help="Measure the device's bandwidth and "
                                          "matmul peak again instead of using the cached measurement (roofline "
                                          "cache, named in the output)."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="CUDA: pick the attention and argmax kernels' "
                              "launches and how the projections, the residual products and the FFN ReLU are "
                              "computed by timing them on this device (recorded in the JSON); --no-tune uses "
                              "fixed choices."),
    real: bool = typer.Option(False, "--real", help="Time translating a real test set (EOS on, greedy and "
                              "beam) instead of the fixed-length Table 2 rows: sentences/s, target tokens/s, "
                              "us per target token, encoder and decoder apart, beside the roofline. Random "
                              "weights force each sentence's output to its reference's length; --checkpoint "
                              "decodes to EOS."),
    test_set: Optional[str] = typer.Option(None, "--test-set", help="--real: the prepared split to translate "
                                           "(default: the spec's first data.test, e.g. newstest2014)."),
    data: Optional[Path] = typer.Option(None, "--data", help="--real: prepared data (default: data/<spec name>)."),
    max_sentences: Optional[int] = typer.Option(None, "--max-sentences", help="--real: only the first N "
                                                "sentences of the test set."),
    sentences_per_batch: Optional[List[int]] = typer.Option(None, "--sentences-per-batch", help="--real: "
                                                            "sentences per batch, sorted by source length "
                                                            "(repeatable; default 1024 and 32)."),
    peer_threads: int = typer.Option(0, "--peer-threads", help="CPU threads of the CTranslate2 peer on the CPU "
                                     "(0: its default)."),
):
    """Table 2 on this device: training, encoder and decoder (greedy, beam) microseconds per output token for
    each variant, beside the roofline bound, MBU, MFU and KV-cache bytes; CUDA graphs on a GPU. With --real:
    throughput translating a real test set instead (see --real)."""
    from .bench_cmd import decode_bench as run_decode_bench

    run_decode_bench(spec, variant, checkpoint=checkpoint, peer=peer, real=real, out_file=out_file, overrides=set_,
                     batch_size=batch_size, src_len=src_len, tgt_len=tgt_len, beam=beam, device=device.value,
                     dtype=dtype.value if dtype else None, repeats=repeats, format=format.value, attention=attention,
                     tune=tune, train=train, train_compile=train_compile, train_fused=train_fused, check=check,
                     sweep=sweep.value if sweep else None,
                     sweep_values=sweep_values, refresh_ceilings=refresh_ceilings, test_set=test_set, data=data,
                     max_sentences=max_sentences, sentences_per_batch=sentences_per_batch,
                     peer_threads=peer_threads)


# --------------------------------------------------------------------------------------------------
@app.command("cost-model")
def cost_model(
    spec: Path = typer.Argument(..., help="Experiment spec (YAML), e.g. experiments/wmt14_ende.yaml."),
    device: Optional[str] = typer.Option(None, "--device", help="h100, h200, a100 (datasheets), tpuv2 (one "
                                         "core, the paper's device has 8), cpu (a generic guess) or measured "
                                         "(the ceilings decode-bench cached); default h100."),
    bandwidth: Optional[float] = typer.Option(None, "--bandwidth", help="Memory bandwidth in GB/s; with --flops "
                                              "it replaces the device's ceilings."),
    flops: Optional[float] = typer.Option(None, "--flops", help="Peak matrix throughput in TFLOP/s (with "
                                          "--bandwidth)."),
    memory_gb: Optional[float] = typer.Option(None, "--memory-gb", help="Memory per device in GB (1e9 bytes; "
                                              "default the device's)."),
    batch: Optional[List[int]] = typer.Option(None, "--batch", help="Sentences (repeatable: a grid; default "
                                              "benchmark.batch_size)."),
    context: Optional[List[int]] = typer.Option(None, "--context", help="Positions the decoder step attends "
                                                "(repeatable; default benchmark.tgt_len)."),
    src_len: Optional[int] = typer.Option(None, "--src-len", help="Source positions of an encoder-decoder "
                                          "(default: the context)."),
    beam: int = typer.Option(1, "--beam", help="Hypotheses per sentence (1 = greedy)."),
    chips: int = typer.Option(1, "--chips", help="Chips: compare K/V sharded over heads with over the batch "
                              "(Pope et al. 2022)."),
    variant: Optional[List[str]] = typer.Option(None, "--variant", help="Variant(s) (repeatable; default all)."),
    format: BenchFormat = typer.Option(BenchFormat.table, "--format", "-f", help="table, json or csv."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write the results with provenance here (JSON)."),
    refresh_ceilings: bool = typer.Option(False, "--refresh-ceilings", help="With --device measured: measure "
                                          "this machine's ceilings now (and cache them) instead of using the "
                                          "cached measurement."),
):
    """Analytic cost of incremental decoding per variant: step and per-token bounds (weights and K/V bytes
    over bandwidth, FLOPs over peak), the bound that dominates, the batch where decoding turns compute-bound,
    K/V cache memory and the largest batch / context that fit, the paper's memory-to-arithmetic ratios, and
    on several chips the K/V cache sharded over heads versus over the batch."""
    from .bench_cmd import cost_model as run_cost_model

    run_cost_model(spec, variant, device, bandwidth, flops, memory_gb, batch, context, src_len, beam, chips,
                   format.value, out_file, refresh_ceilings)


# --------------------------------------------------------------------------------------------------
@app.command()
def report(
    results_dir: Path = typer.Argument(Path("results"), help="Folder of results written by the tool."),
    format: ReportFormat = typer.Option(ReportFormat.md, "--format", "-f", help="md, csv, json or latex."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write the tables here instead of printing them."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Also draw the plots (PNG) into this folder."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Paired-bootstrap samples for BLEU significance "
                                  "(0 skips the test)."),
    notes: Optional[Path] = typer.Option(None, "--notes", help="Markdown file to print beneath the tables "
                                         "(commentary; --format md only)."),
):
    """The paper's Tables 1-3 from the files under RESULTS_DIR only, our numbers beside the paper's:
    Table 1 for translation runs (BLEU with seeds' mean ± sd, difference to multi-head and paired-bootstrap
    p), Table 2 from decode-bench results (with speed-up and fraction of roofline) and the cost model's
    prediction beside each measurement, Table 3 for language models, and two GPUs against one where a
    multi-GPU summary exists. Runs are read from RESULTS_DIR/<spec>/<variant>/seed<N>/. Missing numbers show
    as missing; runs of mismatched specs are listed, never averaged in."""
    from .provenance import check_writable, write_text_atomic
    from .report import report as make_report

    if bootstrap < 0:
        raise UserError(f"--bootstrap must be 0 or more, got {bootstrap}")
    if out_file is not None:
        check_writable(out_file, "file", "--out")
    if plots is not None:
        check_writable(plots, "dir", "--plots")
    text, written = make_report(results_dir, format.value, plots, bootstrap, notes)
    if out_file is not None:
        write_text_atomic(out_file, text)
        err.print(f"wrote {out_file}" + (f" and {len(written)} plots in {plots}" if written else ""), highlight=False)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        for f in written:
            err.print(f"plot: {f}", highlight=False)


@app.command()
def run(
    spec: Path = typer.Argument(..., help="Experiment spec (YAML), e.g. experiments/tiny.yaml."),
    stages: str = typer.Option("prepare,train,evaluate,bench,report", "--stages",
                               help="Comma-separated subset of prepare,train,evaluate,bench,report."),
    variant: Optional[List[str]] = typer.Option(None, "--variant", "-v", help="Variants (repeatable; default all)."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per variant: training.seed, training.seed + 1, ..."),
    jobs: int = typer.Option(1, "--jobs", help="Train this many runs at once (separate processes; small models "
                             "share one GPU well)."),
    device: Device = _DEVICE,
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Local corpora (default: $MQA_REPRO_DATA, "
                                            "else ../shared/data)."),
    results_dir: Path = typer.Option(Path("results"), "--results", help="Results root."),
    ckpt_root: Path = typer.Option(Path("checkpoints"), "--checkpoints", help="Checkpoint root (git-ignored)."),
):
    """The whole pipeline for a spec: prepare, train every variant (and seed), evaluate, decode-bench on this
    device, and print the report. Stages whose outputs are complete for the same inputs are skipped, so an
    interrupted run picks up where it stopped (training resumes from its checkpoint)."""
    from .pipeline import parse_stages, run_pipeline
    from .provenance import check_writable
    from .specfile import load_spec

    s = load_spec(spec)
    check_writable(results_dir, "dir", "--results")
    check_writable(ckpt_root, "dir", "--checkpoints")
    text = run_pipeline(s, stages=parse_stages(stages), variants=variant, seeds=seeds, jobs=jobs,
                        device=device.value, data_dir=data_dir, results=results_dir, checkpoints=ckpt_root,
                        say=lambda msg: err.print(f"[bold]run[/]: {msg}", highlight=False))
    if text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


# --------------------------------------------------------------------------------------------------
def main() -> None:
    try:
        app()
    except UserError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:   # a file-system failure nobody turned into a sentence: still one line, no traceback
        from .provenance import describe_os_error

        err.print(f"[bold red]error:[/] {describe_os_error(e)}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
