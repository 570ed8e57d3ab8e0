"""Run inside saev 0.1.0's own venv (see `make reference-venv`): the paper's code writes a checkpoint,
takes a few training steps exactly as its `training.train` loop does, and saves what it saw.

Usage: python saev_train_steps.py OUT_DIR
Writes OUT_DIR/init/sae.pt and OUT_DIR/final/sae.pt (saev's `nn.dump` format) and OUT_DIR/trace.pt
(the batches, the first forward's outputs and the per-step losses).
"""

import sys
from pathlib import Path

import saev
import torch
from saev import config, nn

D_VIT, EXP_FACTOR, N_STEPS, BATCH, LR, SPARSITY = 8, 4, 3, 32, 1e-3, 4e-3


def main(out_dir: Path) -> None:
    torch.manual_seed(0)
    cfg = config.SparseAutoencoder(d_vit=D_VIT, exp_factor=EXP_FACTOR, sparsity_coeff=SPARSITY, seed=0)
    sae = nn.SparseAutoencoder(cfg)
    sae.normalize_w_dec()  # saev normalises the atoms at the top of every step; start from that state
    nn.dump(str(out_dir / "init" / "sae.pt"), sae)
    batches = torch.randn(N_STEPS, BATCH, D_VIT, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    xhat, f, _ = sae(batches[0])
    first = {"xhat": xhat.detach(), "f": f.detach()}
    losses = []
    for acts_BD in batches:  # the body of saev.training.train, one SAE, fixed lr and coefficient
        sae.normalize_w_dec()
        _, _, loss = sae(acts_BD)
        losses.append([loss.mse.item(), loss.sparsity.item(), loss.l0.item(), loss.l1.item()])
        loss.loss.backward()
        sae.remove_parallel_grads()
        optimizer.step()
        optimizer.zero_grad()
    sae.normalize_w_dec()  # what the next step would start from
    nn.dump(str(out_dir / "final" / "sae.pt"), sae)
    torch.save({"batches": batches, "first": first, "losses": torch.tensor(losses), "lr": LR,
                "sparsity_coeff": SPARSITY, "saev_file": saev.__file__}, out_dir / "trace.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
