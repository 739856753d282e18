"""Early stopping with the best weights kept: after each validation the training loop asks
`BestKeeper.update` whether to stop; an improvement writes the trainable weights (rank 0,
gathered under ZeRO-3) to `<checkpoint_dir>/best/step<N>.safetensors`, and `load_best` puts
them back before the export. The bookkeeping (best step and score, validations since) travels
in the training state, so it is saved with every resumable checkpoint and a resumed run
stops, and restores, exactly where an uninterrupted one would.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from conf.schema import EarlyStoppingConfig
from tasks.distributed import full_parameters

# Training-state keys (checkpointed with the rest of the state) and their fresh values.
FRESH_STATE = {"best_step": 0, "best_score": math.inf, "evals_since_best": 0}
HIGHER_IS_BETTER = {"val_loss": False, "val_accuracy": True}


class BestKeeper:
    def __init__(self, cfg: EarlyStoppingConfig, checkpoint_dir: Path, rank: int):
        """cfg.metric must be among the metrics of each validation (val_accuracy comes from the training
        loop's `validate`)."""
        self.cfg, self.best_dir, self.rank = cfg, checkpoint_dir / "best", rank

    def update(self, engine, step: int, metrics: dict, state: dict) -> bool:
        """Record one validation; True when training should stop."""
        value = metrics[self.cfg.metric]
        score = -value if HIGHER_IS_BETTER[self.cfg.metric] else value
        if score < state["best_score"] - self.cfg.min_delta:
            state.update(best_step=step, best_score=score, evals_since_best=0)
            with full_parameters(engine) as module:
                if self.rank == 0:
                    self.save(module, step)
        else:
            state["evals_since_best"] += 1
        return state["evals_since_best"] >= self.cfg.patience

    def save(self, module: torch.nn.Module, step: int) -> None:
        from safetensors.torch import save_file

        self.best_dir.mkdir(parents=True, exist_ok=True)
        weights = {name: p.detach().clone().contiguous() for name, p in module.named_parameters() if p.requires_grad}
        save_file(weights, str(self.best_dir / f"step{step:08d}.safetensors"))

    def load_best(self, module: torch.nn.Module, step: int) -> None:
        """The weights of the best validation back into `module` (rank 0, inside full_parameters)."""
        from safetensors.torch import load_file

        weights = load_file(str(self.best_dir / f"step{step:08d}.safetensors"))
        missing = set(weights) - {name for name, _ in module.named_parameters()}
        if missing:
            raise RuntimeError(f"best weights do not fit the model: {sorted(missing)[:3]}")
        module.load_state_dict(weights, strict=False)

    def summary(self, state: dict, last_step: int) -> dict:
        best = -state["best_score"] if HIGHER_IS_BETTER[self.cfg.metric] else state["best_score"]
        return {"best_step": state["best_step"], f"best_{self.cfg.metric}": best, "last_step": last_step}
