#!/usr/bin/env python
"""Train the pocket VLM's projector (only) on easy-vqa train; write pocket_projector.safetensors + card.

What is trained: ``multi_modal_projector`` (Linear 384->576, GELU, Linear 576->576; 0.55 M params). The
DINOv2 tower and SmolLM2 stay frozen (no LoRA). Loss: cross-entropy on the answer tokens and the closing
``<|im_end|>`` only, at the native 256 image tokens, never pruned (training on pruned inputs would
flatter the pruning results). Prompts come from the checkpoint's own chat template, exactly as
``vtprune eval`` builds them.

Reproducible and resumable: the projector starts from ``pocket.init_projector(seed)``; batch b of the
run is a pure function of (seed, b) (a seeded permutation per epoch), the decoder has no dropout, and
``--ckpt-dir/state.pt`` (written atomically every ``--ckpt-every`` steps) holds the projector, the
optimizer and the loss history, so a killed run continues where it stopped when started again with the
same flags. Frozen DINOv2 features (B, 256, 384) are computed once per image (all train images up front
with ``--precompute``, the default on CUDA) and kept in memory.

Held out: ``--val-images`` train images (drawn with the seed) and all their questions are never trained
on; the card reports the loss on a fixed subset of them during training and, at the end, exact-match
accuracy on ``--val-questions`` of them through the same ``PrunedVlm`` greedy path as ``vtprune eval``
(fp32, on the training device).

Usage (CPU smoke run; a real run wants a GPU):
    .venv/bin/python scripts/train_projector.py --steps 3 --batch-size 2 --val-questions 4 \
        --out-dir out/projector-smoke --ckpt-dir out/projector-smoke/ckpt

On a GPU machine with no network (only this repo plus carried wheels), see scripts/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.config import PruneConfig
from vtprune.eval.data import Question, load_questions, subsample
from vtprune.models import pocket

REPO = Path(__file__).resolve().parents[1]
IGNORE = -100


# --- data ----------------------------------------------------------------------------------------
def split_held_out(questions: list[Question], n_images: int, seed: int) -> tuple[list[Question], list[Question]]:
    """(train, held-out) questions; the held-out ones are all questions on ``n_images`` seeded images."""
    images = sorted({q.image_id for q in questions})
    held = set(random.Random(seed).sample(images, n_images))
    return [q for q in questions if q.image_id not in held], [q for q in questions if q.image_id in held]


def batch_indices(step: int, n: int, batch: int, seed: int) -> list[int]:
    """Question indices of global batch ``step``: epoch e is a permutation seeded by (seed, e)."""
    per_epoch = n // batch
    epoch, j = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[j * batch : (j + 1) * batch].tolist()


class PromptTokens:
    """Token ids of (prompt with 256 image slots, answer + <|im_end|>), cached per question text."""

    def __init__(self, adapter: Any) -> None:
        self.adapter, self._prompts = adapter, {}
        self.slots = pocket.IMAGE_TOKEN * pocket.IMAGE_TOKENS
        self.end = adapter.tokenizer.eos_token  # <|im_end|> closes the assistant turn

    def prompt(self, question: str) -> list[int]:
        if question not in self._prompts:
            text = self.adapter.format_prompt(question).replace(pocket.IMAGE_TOKEN, self.slots)
            self._prompts[question] = self.adapter.tokenizer(text)["input_ids"]  # as the processor tokenizes
        return self._prompts[question]

    def answer(self, answer: str) -> list[int]:
        return self.adapter.tokenizer(answer + self.end, add_special_tokens=False)["input_ids"]


@dataclass
class Batch:
    input_ids: Tensor  # (B, T) right-padded
    attention_mask: Tensor  # (B, T)
    labels: Tensor  # (B, T) IGNORE except the answer tokens
    image_ids: list[int]


def collate(items: list[Question], tokens: PromptTokens, pad_id: int) -> Batch:
    rows = [(tokens.prompt(q.question), tokens.answer(q.answer)) for q in items]
    length = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p) : n] = torch.tensor(a)
        mask[i, :n] = 1
    return Batch(ids, mask, labels, [q.image_id for q in items])


# --- frozen features -----------------------------------------------------------------------------
class FeatureStore:
    """Projector inputs (256, 384) per image, computed once by the frozen tower; mirrors
    ``vtprune.models.llava.clip_projector_features`` up to the projector (checked in ``check_features``)."""

    def __init__(self, adapter: Any, device: torch.device, paths: dict[int, str]) -> None:
        self.adapter, self.device, self.paths, self._feats = adapter, device, paths, {}

    @torch.no_grad()
    def _compute(self, image_ids: list[int]) -> None:
        from vtprune.images import load_image

        images = [load_image(self.paths[i]) for i in image_ids]
        pixels = self.adapter.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        model, cfg = self.adapter.model.model, self.adapter.config
        hidden = model.vision_tower(pixels.to(self.device), output_hidden_states=True).hidden_states
        feats = hidden[cfg.vision_feature_layer][:, 1:]  # (B, 256, 384): CLS dropped ("default")
        self._feats.update(zip(image_ids, feats.float(), strict=True))

    def get(self, image_ids: list[int], chunk: int = 64) -> Tensor:
        todo = sorted({i for i in image_ids if i not in self._feats})
        for k in range(0, len(todo), chunk):
            self._compute(todo[k : k + chunk])
        return torch.stack([self._feats[i] for i in image_ids])  # (B, 256, 384)

    def precompute(self, image_ids: list[int], log: Any) -> None:
        start = time.perf_counter()
        self.get(sorted(set(image_ids)))
        log(f"precomputed DINOv2 features of {len(self._feats)} images in {time.perf_counter() - start:.1f} s")


def check_features(adapter: Any, store: FeatureStore, image_id: int) -> float:
    """Max abs diff of projector(store features) vs the adapter's own vision path; must be ~0."""
    from vtprune.images import load_image

    image = load_image(store.paths[image_id])
    pixels = adapter.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = adapter.vision_features(pixels.to(store.device))
        ours = adapter.model.model.multi_modal_projector(store.get([image_id]))
    return float((ref.float() - ours.float()).abs().max())


# --- model ---------------------------------------------------------------------------------------
def batch_loss(adapter: Any, batch: Batch, feats: Tensor, device: torch.device) -> Tensor:
    """Mean cross-entropy over the answer tokens of a batch."""
    ids, labels = batch.input_ids.to(device), batch.labels.to(device)
    projector = adapter.model.model.multi_modal_projector
    visual = projector(feats)  # (B, 256, D)
    embeds = adapter.embed_tokens(ids)  # (B, T, D)
    slots = (ids == adapter.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(slots, visual.to(embeds.dtype))  # slots hold 256 per row, in order
    hidden = adapter.decoder(inputs_embeds=embeds, attention_mask=batch.attention_mask.to(device)).last_hidden_state
    targets = labels[:, 1:]  # position t predicts token t+1
    picked = hidden[:, :-1][targets != IGNORE]  # (n_answer_tokens, D): logits only where the loss is
    return F.cross_entropy(adapter.lm_head(picked).float(), targets[targets != IGNORE])


def freeze_all_but_projector(adapter: Any) -> list[torch.nn.Parameter]:
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    params = list(adapter.model.model.multi_modal_projector.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to 10% of ``--lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# --- checkpoints ---------------------------------------------------------------------------------
RUN_KEYS = ("seed", "batch_size", "lr", "warmup", "steps", "val_images")


def save_state(path: Path, step: int, params: Any, opt: Any, history: dict[str, list], args: Any) -> None:
    tmp = path.with_suffix(".tmp")
    state = {"step": step, "projector": params, "optimizer": opt.state_dict(), "history": history,
             "run": {k: getattr(args, k) for k in RUN_KEYS}}  # fmt: skip
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def load_state(path: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    run = {k: getattr(args, k) for k in RUN_KEYS}
    if state["run"] != run:
        sys.exit(f"{path} belongs to another run ({state['run']} vs {run}); pass another --ckpt-dir")
    return state


# --- main loop -----------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> dict[str, Any]:
    from vtprune.models import load_vlm

    log = _logger()
    device = _device(args.device)
    torch.manual_seed(args.seed)
    adapter = load_vlm("pocket", cache_dir=args.cache_dir)
    adapter.processor.image_processor = pocket.image_processor()  # PIL even where torchvision is installed
    adapter.model.to(device)
    params = freeze_all_but_projector(adapter)
    pocket.init_projector(adapter.model.model.multi_modal_projector, args.seed)
    questions = load_questions("train")
    train_qs, held_qs = split_held_out(questions, args.val_images, args.seed)
    val_loss_qs = subsample(held_qs, args.val_loss_questions, args.seed)
    paths = {q.image_id: q.image_path for q in questions}
    store, tokens = FeatureStore(adapter, device, paths), PromptTokens(adapter)
    log(f"device {device}; {len(train_qs)} train / {len(held_qs)} held-out questions; feature check "
        f"max abs diff {check_features(adapter, store, train_qs[0].image_id):.2e}")  # fmt: skip
    if args.precompute if args.precompute is not None else device.type == "cuda":
        store.precompute([q.image_id for q in questions], log)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ckpt = args.ckpt_dir / "state.pt"
    history: dict[str, list] = {"loss": [], "val_loss": []}
    start_step = _resume(ckpt, args, adapter, opt, history, log)
    pad = adapter.tokenizer.pad_token_id
    t0 = time.perf_counter()
    for step in range(start_step, args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        batch = collate([train_qs[i] for i in batch_indices(step, len(train_qs), args.batch_size, args.seed)],
                        tokens, pad)  # fmt: skip
        with _autocast(device, args.amp):
            loss = batch_loss(adapter, batch, store.get(batch.image_ids), device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        history["loss"].append(loss.item())
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            _log_progress(log, done, args, history, t0, start_step)
        if done % args.ckpt_every == 0 or done == args.steps:
            history["val_loss"].append([done, val_loss(adapter, val_loss_qs, store, tokens, pad, device, args)])
            save_state(ckpt, done, _projector_state(adapter), opt, history, args)
            log(f"step {done}: val loss {history['val_loss'][-1][1]:.4f}; checkpoint {ckpt}")
    return finish(args, adapter, held_qs, history, time.perf_counter() - t0, device, log)


def _resume(ckpt: Path, args: Any, adapter: Any, opt: Any, history: dict[str, list], log: Any) -> int:
    state = load_state(ckpt, args)
    if state is None:
        return 0
    adapter.model.model.multi_modal_projector.load_state_dict(state["projector"])
    opt.load_state_dict(state["optimizer"])
    history.update(state["history"])
    log(f"resumed from {ckpt} at step {state['step']}")
    return int(state["step"])


@torch.no_grad()
def val_loss(adapter: Any, qs: list[Question], store: Any, tokens: Any, pad: int, device: Any, args: Any) -> float:
    losses = []
    for k in range(0, len(qs), args.batch_size):
        batch = collate(qs[k : k + args.batch_size], tokens, pad)
        with _autocast(device, args.amp):
            losses.append(float(batch_loss(adapter, batch, store.get(batch.image_ids), device)) * len(batch.image_ids))
    return sum(losses) / max(1, len(qs))


def finish(args: Any, adapter: Any, held_qs: list[Question], history: dict[str, list], train_s: float,
           device: torch.device, log: Any) -> dict[str, Any]:  # fmt: skip
    """Held-out accuracy through the eval harness (fp32, on the training device), then the projector file
    and its card."""
    from safetensors.torch import save_file

    from vtprune.eval.harness import evaluate

    eval_qs = subsample(held_qs, args.val_questions, args.seed)
    log(f"held-out accuracy on {len(eval_qs)} questions (PrunedVlm greedy, unpruned, fp32 {device}) ...")
    result = evaluate(adapter, eval_qs, PruneConfig(), progress=not args.quiet)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = args.out_dir / pocket.PROJECTOR_FILE.name
    save_file({k: v.contiguous() for k, v in _projector_state(adapter).items()}, str(weights))
    card = make_card(args, history, result, train_s, device, pocket.sha256_file(weights))
    (args.out_dir / pocket.PROJECTOR_CARD.name).write_text(json.dumps(card, indent=2) + "\n")
    log(f"wrote {weights} and {pocket.PROJECTOR_CARD.name}: held-out accuracy {result['accuracy']:.3f}")
    return card


def make_card(args: Any, history: dict[str, list], result: dict[str, Any], train_s: float, device: Any,
              sha256: str) -> dict[str, Any]:  # fmt: skip
    import transformers

    losses = history["loss"]
    window = max(1, min(50, len(losses) // 10 or 1))
    curve = [[i + window, sum(losses[i : i + window]) / window] for i in range(0, len(losses) - window + 1, window)]
    return {
        "model": "pocket", "assembly_version": pocket.ASSEMBLY_VERSION, "file_sha256": sha256,
        "trained": "multi_modal_projector only (Linear 384->576, GELU, Linear 576->576); no LoRA; tower and LM frozen",
        "data": {"dataset": "easy-vqa 1.0", "split": "train", "held_out_images": args.val_images,
                 "image_tokens": pocket.IMAGE_TOKENS, "pruning_during_training": "none"},
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "schedule": f"linear warm-up {args.warmup} steps, cosine to 0.1 x lr", "optimizer": "AdamW, wd 0",
        "clip": args.clip, "precision": "bf16 autocast" if args.amp and device.type == "cuda" else "fp32",
        "device": _device_name(device), "train_s": round(train_s, 1),
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                 "min": min(losses) if losses else None,
                 "last_window_mean": curve[-1][1] if curve else None, "window": window, "curve": curve},
        "val_loss": history["val_loss"],
        "accuracy": {"split": "train, held-out images", "decoding": f"greedy, PrunedVlm, unpruned, fp32 {device.type}",
                     "n": result["n"], "accuracy": result["accuracy"], "by_type": result["by_type"]},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }  # fmt: skip


# --- small helpers -------------------------------------------------------------------------------
def _projector_state(adapter: Any) -> dict[str, Tensor]:
    return {k: v.detach().float().cpu() for k, v in adapter.model.model.multi_modal_projector.state_dict().items()}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _autocast(device: torch.device, amp: bool) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def _logger() -> Any:
    def log(msg: str) -> None:
        print(f"[train_projector {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


def _log_progress(log: Any, done: int, args: Any, history: dict[str, list], t0: float, start: int) -> None:
    recent = history["loss"][-args.log_every :]
    per_step = (time.perf_counter() - t0) / max(1, done - start)
    log(f"step {done}/{args.steps} loss {sum(recent) / len(recent):.4f} lr {lr_at(done - 1, args):.2e} "
        f"{per_step:.2f} s/step")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--seed", type=int, default=0, help="projector init, held-out images and batch order")
    p.add_argument("--val-images", type=int, default=200, help="train images held out (all their questions)")
    p.add_argument("--val-loss-questions", type=int, default=256, help="held-out questions for the val loss")
    p.add_argument("--val-questions", type=int, default=500, help="held-out questions for the final accuracy")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 on CUDA too (default: bf16 autocast)")
    p.add_argument("--precompute", action=argparse.BooleanOptionalAction, default=None,
                   help="compute every train image's features up front (default: on CUDA only)")  # fmt: skip
    p.add_argument("--cache-dir", type=Path, help="vtprune cache holding the assembled pocket model")
    p.add_argument("--ckpt-dir", type=Path, default=REPO / "out" / "train_projector")
    p.add_argument("--out-dir", type=Path, default=pocket.DATA_DIR, help="where the projector and card go")
    p.add_argument("--quiet", action="store_true", help="no progress bar for the final accuracy")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.ckpt_every < 1 or args.log_every < 1:
        p.error("--steps, --batch-size, --ckpt-every and --log-every must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    import transformers

    transformers.logging.set_verbosity_error()
    args = parse_args(argv)
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    card = train(args)
    print(json.dumps({k: card[k] for k in ("steps", "seed", "accuracy", "train_s")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
