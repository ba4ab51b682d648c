"""``mqa-repro translate`` and ``mqa-repro generate``: a trained model on the user's own text.

Raw text lines in (UTF-8, one sentence per line, lines end at '\\n' and nowhere else), one output line per
input line out, in input order:

* ``translate`` (encoder-decoder models): each line SentencePiece-encoded with the run's prepared model,
  translated by :class:`mqa_repro.decode.Engine` (greedy, or beam search with the paper's length penalty,
  the spec's ``evaluation`` decode limit min(max_len_cap, a * source length + b)), and detokenized the way
  ``evaluate`` detokenizes its hypotheses (``SentencePieceProcessor.decode``), so translating a test set's
  source file reproduces ``hyp.<split>.beam<k>.txt``.
* ``generate`` (decoder-only models): each line is a prompt; the output line is its continuation.

Policies: an empty line gives an empty line (no decoding). A line with more subwords than the model was
trained on (``data.max_len - 1``, the same cut ``evaluate`` applies to test sources; never more than
``model.max_positions - 1``) is truncated -- translate keeps its first subwords, generate its last (the
continuation follows the end of the prompt) -- and the count is reported on stderr. generate also leaves
room for the continuation: a prompt keeps at most ``max_positions - max_new_tokens`` subwords, but never
fewer than half the positions; a continuation that still finds fewer than ``max_new_tokens`` positions
left stops early, and the count is reported on stderr. Under ``torchrun
--nproc_per_node N`` the lines are dealt round-robin over the ranks and rank 0 writes the one ordered
output. An output file is written to a temporary file beside it and renamed, so an error leaves no
half-written output.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# Lines: '\n' only (str.splitlines would also split at '\r', '\x0b', '\x1c', '\u2028', ...)
# --------------------------------------------------------------------------------------------------
def split_lines(text: str) -> list:
    """The lines of ``text``, split at '\\n' only; a final '\\n' does not start an empty last line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_input(path: str) -> list:
    """Lines of a UTF-8 file, or of stdin for ``-``; a UserError naming the file if unreadable."""
    name = "stdin" if path == "-" else path
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"no input file at {path}") from None
    except IsADirectoryError:
        raise UserError(f"--input {path} is a directory, not a text file") from None
    except OSError as e:
        raise UserError(f"cannot read {name}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{name}: line {line} is not valid UTF-8") from None
    return split_lines(text[1:] if text.startswith("\ufeff") else text)


def write_output(path: str, lines: Sequence[str]) -> None:
    """Lines to stdout (``-``) or to a file: a regular file is replaced atomically (a temporary file beside it,
    renamed, with the mode ``open(path, "w")`` would give); a symbolic link is followed (the file it names is
    replaced, the link kept); a FIFO or a device (``/dev/stdout``) is written in place. Raises UserError for a
    directory, a missing folder or a file-system error, naming the path."""
    from .errors import OutputError
    from .provenance import write_text_atomic

    text = "".join(line.replace("\n", " ") + "\n" for line in lines)
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    target = Path(path)
    if target.is_dir():
        raise UserError(f"--output {path} is a directory; name a file")
    real = Path(os.path.realpath(target))
    if not real.parent.is_dir():
        raise UserError(f"cannot write {path}: the folder {real.parent} does not exist")
    if real.exists() and not real.is_file():
        try:
            with open(real, "wb") as f:
                f.write(text.encode("utf-8"))
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        return
    write_text_atomic(real, text)


# --------------------------------------------------------------------------------------------------
# A trained model and its SentencePiece model
# --------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    variant: object          # spec.Variant of the checkpoint
    model: torch.nn.Module   # Transformer in eval mode, on the device, in the dtype
    sp: object               # sentencepiece.SentencePieceProcessor of the prepared data
    checkpoint: Path
    data_dir: Path
    device: torch.device

    @property
    def max_source_ids(self) -> int:
        """Subwords per line the model sees: the length it was trained on, within its positions."""
        m, d = self.variant.model, self.variant.data
        return max(1, min(d.max_len, m.max_positions) - 1)


def load_for_inference(target, device="auto", dtype: str = "fp32", data: Optional[Path] = None,
                       kind: Optional[str] = None, command: str = "translate") -> Loaded:
    """The model and SentencePiece model of a run directory (its manifest.json names the checkpoint and the
    prepared data) or of a checkpoint file (prepared data: ``data``, else data/<spec name>).

    Raises UserError when ``target`` is neither, the model is not of ``kind`` ("encoder-decoder" /
    "decoder-only"), the prepared data or its SentencePiece model is missing or is not the data the
    checkpoint was trained on.
    """
    from .data import prepared_dir
    from .batching import data_fingerprint, open_prepared
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .runtime import resolve_device

    target = Path(target)
    man = {}
    if target.is_dir():
        mpath = target / "manifest.json"
        if not mpath.is_file():
            raise UserError(f"{target} is not a run directory (it has no manifest.json) nor a checkpoint file")
        try:
            man = json.loads(mpath.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{mpath} is not valid JSON") from None
        if man.get("kind") == "prepared_data":
            raise UserError(f"{target} holds prepared data, not a run; give a run directory "
                            f"(results/<spec>/<variant>/seed<N>) or a checkpoint file")
        if not man.get("checkpoint"):
            raise UserError(f"{mpath} names no checkpoint; train the run first")
        ckpt_path = Path(man["checkpoint"])
        if not ckpt_path.is_file():
            raise UserError(f"the checkpoint of {target} is missing (expected at {ckpt_path}, the key "
                            f"'checkpoint' of {mpath})")
    elif target.is_file():
        ckpt_path = target
    else:
        raise UserError(f"{target} does not exist; pass a run directory or a checkpoint file")
    ck = load_checkpoint(ckpt_path)
    variant, model = model_from_checkpoint(ck, "cpu")
    if kind is not None and variant.model.kind != kind:
        other = "generate" if kind == "encoder-decoder" else "translate"
        def a(k):
            return f"an {k}" if k.startswith("e") else f"a {k}"
        raise UserError(f"{ckpt_path} holds {a(variant.model.kind)} model ({variant.spec_name}/{variant.name}); "
                        f"`{command}` needs {a(kind)} model (use `mqa-repro {other}`)")
    if data is not None:
        data_dir = Path(data)
    elif man.get("data_dir"):
        data_dir = Path(man["data_dir"])
    else:
        data_dir = prepared_dir(variant)
    try:
        spm_name = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))["spm"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        spm_name = None   # open_prepared names what is wrong with the folder
    if spm_name and not (data_dir / spm_name).is_file():
        raise UserError(f"the SentencePiece model {data_dir / spm_name} is missing (the key spm.file of "
                        f"{data_dir}/manifest.json); run `mqa-repro prepare` again or pass --data")
    prepared = open_prepared(variant, data_dir)
    want = ck.get("data_manifest_hash")
    if want and data_fingerprint(prepared) not in (None, want):
        raise UserError(f"the prepared data at {prepared.path} is not the data {ckpt_path} was trained on (its "
                        f"manifest hash differs), so its SentencePiece model would mis-tokenize; pass the "
                        f"right --data")
    dev = resolve_device(device) if isinstance(device, str) else device
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model = model.to(device=dev, dtype=DTYPES[dtype]).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Loaded(variant, model, prepared.sp, ckpt_path, prepared.path, dev)


# --------------------------------------------------------------------------------------------------
# Decoding lines
# --------------------------------------------------------------------------------------------------
@dataclass
class Result:
    lines: Optional[list]    # one output line per input line, in order (None on ranks other than 0)
    truncated: int           # input lines cut to ``limit`` subwords
    limit: int
    decoded: int             # non-empty lines decoded (all ranks)
    short: int = 0           # generate: prompts left with fewer than max_new_tokens positions to continue into


def _progress_bar(total: int, title: str, enabled: bool):
    """(advance, close): a Rich bar on a terminal, nothing when stderr is piped."""
    if not (enabled and total and sys.stderr.isatty()):
        return None, (lambda: None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   transient=True)
    bar.start()
    task = bar.add_task(title, total=total)
    return (lambda n: bar.advance(task, n)), bar.stop


def _dist():
    """(rank, world) from torchrun's environment ((0, 1) outside it); ``run`` starts the process group."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def decode_lines(loaded: Loaded, lines: Sequence[str], *, beam: int = 1, batch_tokens: int = 8192,
                 max_new_tokens: int = 64, progress: bool = True, engine=None) -> Result:
    """Translate (encoder-decoder) or continue (decoder-only) each line; see the module docstring.

    Under torchrun every rank must call this with the same ``lines``; rank r decodes lines r, r + N, ...
    and rank 0 gathers the results. Raises UserError for a beam or budget below 1.
    """
    from .decode import Engine

    if beam < 1:
        raise UserError(f"--beam must be a positive integer, got {beam}")
    if batch_tokens < 1:
        raise UserError(f"--batch-tokens must be positive, got {batch_tokens}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    v = loaded.variant
    seq2seq = v.model.is_seq2seq
    rank, world = _dist()
    mine = list(range(rank, len(lines), world))
    limit, positions = loaded.max_source_ids, v.model.max_positions
    if not seq2seq:   # room for the continuation: BOS + prompt + new tokens fit the positions (at least half)
        limit = min(limit, max(positions - max_new_tokens, positions // 2))
    ids = loaded.sp.encode([lines[i] for i in mine], out_type=int) if mine else []
    truncated = sum(len(x) > limit for x in ids)
    ids = [x[:limit] if seq2seq else x[-limit:] for x in ids]
    todo = [k for k, x in enumerate(ids) if x]
    short = 0 if seq2seq else sum(positions - len(ids[k]) < max_new_tokens for k in todo)
    eng = engine if engine is not None else Engine(loaded.model)
    eng.check_beam(beam)
    advance, close = _progress_bar(len(todo), f"{'translate' if seq2seq else 'generate'} beam {beam}",
                                   progress and rank == 0)
    ev = v.evaluation
    try:
        if not todo:
            outs = []
        elif seq2seq:
            outs = eng.translate([ids[k] for k in todo], beam=beam, alpha=ev.length_penalty,
                                 max_len_a=ev.max_len_a, max_len_b=ev.max_len_b,
                                 max_len_cap=min(ev.max_len_cap, v.model.max_positions),
                                 batch_tokens=batch_tokens, progress=advance)
        else:
            outs = eng.generate([ids[k] for k in todo], beam=beam, alpha=ev.length_penalty,
                                max_new_tokens=max_new_tokens, batch_tokens=batch_tokens, progress=advance)
    finally:
        close()
    text = [""] * len(mine)
    for k, out in zip(todo, outs):
        text[k] = loaded.sp.decode(list(out))
    pairs = list(zip(mine, text))
    counts = [truncated, len(todo), short]
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world if rank == 0 else None
        dist.gather_object((pairs, counts), gathered, dst=0)
        if rank != 0:
            return Result(None, truncated, limit, len(todo), short)
        pairs = [p for g, _ in gathered for p in g]
        counts = [sum(c[j] for _, c in gathered) for j in range(3)]
    full = [""] * len(lines)
    for i, t in pairs:
        full[i] = t
    return Result(full, counts[0], limit, counts[1], counts[2])


def run(target, input: str = "-", output: str = "-", *, command: str = "translate", beam: int = 1,
        batch_tokens: int = 8192, max_new_tokens: int = 64, device: str = "auto", dtype: str = "fp32",
        data: Optional[Path] = None, progress: bool = True,
        say: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> Optional[Result]:
    """The whole command: read ``input``, decode every line, write ``output`` (rank 0 only under torchrun).

    ``command`` is "translate" (encoder-decoder models) or "generate" (decoder-only). Errors are UserErrors.
    """
    from .distributed import init_distributed
    from .runtime import resolve_device

    kind = {"translate": "encoder-decoder", "generate": "decoder-only"}[command]
    rank, world = _dist()
    dev = resolve_device(device)
    if dev.type == "cuda":
        from .decode.warmup import start_warm_up

        # Triton's start-up and cuBLAS's first products in the dtype, behind reading the input and loading
        # the checkpoint (an unknown dtype is reported later; the products are then skipped)
        start_warm_up(dev, DTYPES.get(dtype))
    dist_state = init_distributed(dev)
    try:
        if world > 1:
            import torch.distributed as dist

            box = [None]
            if rank == 0:   # only rank 0 reads (stdin goes to one process); a read error stops every rank
                try:
                    box = [("lines", read_input(input))]
                except UserError as e:
                    box = [("error", str(e))]
            dist.broadcast_object_list(box, src=0)
            if box[0][0] == "error":
                raise UserError(box[0][1])
            lines = box[0][1]
        else:
            lines = read_input(input)
        loaded = load_for_inference(target, dev, dtype, data, kind=kind, command=command)
        res = decode_lines(loaded, lines, beam=beam, batch_tokens=batch_tokens, max_new_tokens=max_new_tokens,
                           progress=progress)
        if rank != 0:
            return res
        if res.truncated and command == "translate":
            say(f"translate: {res.truncated} of {len(lines)} lines had more than {res.limit} subwords (the "
                f"length the model was trained on) and were cut to their first {res.limit}")
        elif res.truncated:
            say(f"generate: {res.truncated} of {len(lines)} prompts had more than {res.limit} subwords and were "
                f"cut to their last {res.limit} (room for --max-new-tokens {max_new_tokens} within the model's "
                f"{loaded.variant.model.max_positions} positions, or the length it was trained on)")
        if res.short:
            say(f"generate: {res.short} of {len(lines)} continuations stop before --max-new-tokens "
                f"{max_new_tokens}: the model has {loaded.variant.model.max_positions} positions")
        write_output(output, res.lines)
        return res
    finally:
        if dist_state.group_started_here:
            import torch.distributed as dist

            dist.destroy_process_group()
