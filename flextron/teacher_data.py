"""Teacher-generated continuations: more training tokens than the corpus holds, without repeating it.

`flextron synth` has the frozen converted model (`RUN/elastic`, full widths: the teacher of `flextron
train`) continue prompts cut from the corpus's *train* split, by sampling, and keeps the sequences as
token shards in `RUN/data/teacher/seed<S>/` (`shard-00000.safetensors`, ... each `[batch, seq_len]`
int32 under "tokens", plus `meta.json` and `synth_config.json`). Shard i is seeded from (seed, i)
and always holds `--batch-size` sequences, so a killed or extended run continues after its last
complete shard and gives the tokens an uninterrupted run gives. `flextron train --teacher-data
seed<S> --teacher-mix F` replaces a share F of its training windows with these sequences (positions
drawn from the training seed), so knowledge distillation can run past one pass over the real text.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from flextron.devices import set_device_field
from flextron.errors import FlextronError
from flextron.rundir import check_finite

TEACHER_DIR = "data/teacher"
META = "meta.json"
CONFIG_FILE = "synth_config.json"
# settings that shape the sequences: a resumed or extended run must repeat them
SHAPING = ("seq_len", "prompt_len", "temperature", "top_p", "batch_size", "seed", "corpus")


@dataclass(frozen=True)
class SynthConfig:
    run: str  #: the run directory (made by `flextron convert`); writes RUN/data/teacher/seed<SEED>/
    sequences: int = 256  #: sequences wanted in all; a re-run with more continues after the last shard
    seq_len: int = 128  #: tokens per sequence, prompt included (match `flextron train --seq-len`)
    prompt_len: int = 32  #: tokens of real train-split text each sequence starts from
    temperature: float = 1.0  #: sampling temperature of the teacher
    top_p: float = 0.95  #: nucleus sampling: the smallest set of tokens holding this probability; 1 = all
    batch_size: int = 16  #: sequences per shard (generated together)
    seed: int = 0  #: seeds the sampling (shard i from seed and i); names the folder seed<SEED>
    device: str = "auto"  #: cpu, cuda, cuda:N, or auto (CUDA when present, and says so)
    corpus: str = ""  #: text the prompts come from (its train split); empty: the corpus the run was converted with
    restart: bool = False  #: remove this seed's sequences and generate again

    def __post_init__(self):
        for name, low in (("sequences", 1), ("seq_len", 2), ("prompt_len", 1), ("batch_size", 1), ("seed", 0)):
            check_finite(name, getattr(self, name), low=low, whole=True)
        if self.prompt_len >= self.seq_len:
            raise FlextronError(f"--prompt-len {self.prompt_len} leaves no tokens to generate in --seq-len "
                                f"{self.seq_len}; use a shorter prompt")
        check_finite("temperature", self.temperature, low=0, low_inclusive=False)
        check_finite("top_p", self.top_p, low=0, low_inclusive=False, high=1)
        set_device_field(self)


def teacher_folder(run_root, name: str) -> Path:
    return Path(run_root) / TEACHER_DIR / name


def synth(cfg: SynthConfig) -> dict:
    """Generate (or continue) the teacher sequences of `cfg.seed`; returns the summary."""
    import torch
    from safetensors.torch import save_file

    from flextron.data import check_corpus, token_windows
    from flextron.devices import check_device
    from flextron.elastic import ElasticModel
    from flextron.progress import progress
    from flextron.rundir import RunDir, check_resume, read_json, save_stage_config, write_json_atomic

    run = RunDir(cfg.run)
    run.require("elastic")
    check_device(cfg.device)
    cfg = dataclasses.replace(cfg, corpus=run.corpus(cfg.corpus))  # saved and compared as resolved
    check_corpus(cfg.corpus)  # before --restart removes anything
    name = f"seed{cfg.seed}"
    folder = teacher_folder(run.root, name)
    if cfg.restart:
        shutil.rmtree(folder, ignore_errors=True)
    check_resume(folder / CONFIG_FILE, cfg, SHAPING, what=f"teacher data {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    save_stage_config(folder / CONFIG_FILE, cfg)
    meta = read_json(folder / META, run.root) if (folder / META).is_file() else {"shards": []}
    done = [s for s in meta["shards"] if (folder / s).is_file()]  # shards listed in meta are complete
    need = -(-cfg.sequences // cfg.batch_size)
    teacher = ElasticModel.load(run.elastic, device=cfg.device)
    teacher.check_positions(cfg.seq_len)
    tok = teacher.tokenizer
    prompts = token_windows(tok, teacher.adapter, "train", cfg.prompt_len,
                            need * cfg.batch_size, cfg.corpus)  # consecutive train-split text, one per sequence
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    new = cfg.seq_len - cfg.prompt_len
    for i in progress(range(len(done), need), desc="teacher data"):
        rows = [(i * cfg.batch_size + j) % len(prompts) for j in range(cfg.batch_size)]
        ids = prompts[rows].to(teacher.device)
        torch.manual_seed(cfg.seed * 1_000_003 + i)
        with torch.no_grad():
            out = teacher.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                         temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=new,
                                         min_new_tokens=new, pad_token_id=eos)
        if out.shape != (cfg.batch_size, cfg.seq_len):
            raise FlextronError(f"the teacher returned {tuple(out.shape)} tokens for shard {i}, not "
                                f"{(cfg.batch_size, cfg.seq_len)}")
        shard = f"shard-{i:05d}.safetensors"
        tmp = folder / (shard + ".tmp")
        save_file({"tokens": out.to("cpu", torch.int32).contiguous()}, str(tmp))
        os.replace(tmp, folder / shard)
        done.append(shard)
        write_json_atomic(folder / META, {"name": name, "seed": cfg.seed, "seq_len": cfg.seq_len,
                                          "prompt_len": cfg.prompt_len, "temperature": cfg.temperature,
                                          "top_p": cfg.top_p, "batch_size": cfg.batch_size, "corpus": cfg.corpus,
                                          "prompt_split": "train", "weights_tag": run.weights_tag("elastic"),
                                          "sequences": len(done) * cfg.batch_size, "shards": done})
    return {"run": str(run.root), "name": name, "folder": str(folder), "sequences": len(done) * cfg.batch_size,
            "tokens": len(done) * cfg.batch_size * cfg.seq_len, "shards": len(done)}


def teacher_windows(run_root, name: str, n: int, seq_len: int):
    """The first `n` teacher sequences of set `name` ([n, seq_len] long), or a FlextronError naming
    the command that makes (more of) them."""
    import torch
    from safetensors.torch import load_file

    from flextron.rundir import read_json

    folder = teacher_folder(run_root, name)
    if not (folder / META).is_file():
        raise FlextronError(f"{folder} holds no teacher data; make it with `flextron synth --run {run_root} "
                            f"--seed {name.removeprefix('seed')} --sequences {n}`")
    meta = read_json(folder / META, run_root)
    if meta["seq_len"] != seq_len:
        raise FlextronError(f"teacher data {name} has sequences of {meta['seq_len']} tokens, training uses "
                            f"--seq-len {seq_len}; generate it with --seq-len {seq_len}")
    if meta["sequences"] < n:
        raise FlextronError(f"teacher data {name} holds {meta['sequences']} sequences, training needs {n}; "
                            f"`flextron synth --run {run_root} --seed {meta['seed']} --sequences {n}` adds the rest")
    parts, have = [], 0
    for shard in meta["shards"]:
        if have >= n:
            break
        try:
            t = load_file(str(folder / shard))["tokens"]
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a damaged file
            raise FlextronError(f"{folder / shard} is missing or corrupt ({type(e).__name__}); regenerate with "
                                f"`flextron synth --run {run_root} --seed {meta['seed']} --restart`") from None
        parts.append(t.long())
        have += len(t)
    return torch.cat(parts)[:n]


def mixed_windows(real, teacher, total: int, seed: int):
    """`total` training windows: `len(teacher)` of them teacher sequences at positions drawn from
    `seed`, the others the real windows in order (from the start again when they run out)."""
    import torch

    if len(teacher) > total:
        raise FlextronError(f"{len(teacher)} teacher windows do not fit in {total} training windows")
    if real.shape[1] != teacher.shape[1]:
        raise FlextronError(f"real windows of {real.shape[1]} tokens cannot mix with teacher ones of "
                            f"{teacher.shape[1]}")
    is_teacher = torch.zeros(total, dtype=torch.bool)
    is_teacher[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: len(teacher)]] = True
    out = torch.empty(total, real.shape[1], dtype=real.dtype)
    out[is_teacher] = teacher.to(real.dtype)
    n_real = total - len(teacher)
    out[~is_teacher] = real[torch.arange(n_real) % len(real)]
    return out
