"""Does a search's critic rank policies it was not trained on, and would standardised rewards or a richer state help?

AMC's critic regresses each step's (state, action) on its episode's final reward, and the
actor climbs the critic's gradient, so the search can only be as good as the critic's ranking.
This reads a finished search's saved agent (its replay buffer of the last episodes), holds out
a fifth of the buffer's episodes, trains a fresh critic as the agent does (its hidden sizes,
critic learning rate and batch size, one gradient step per stored transition) on the rest, and
prints the correlation between each held-out episode's reward and its mean critic value over
the episode's steps. It does so with the rewards as the agent sees them (minus their mean;
spreads of a few tenths of a point); standardised (divided by their standard deviation), the
fix one would make if the critic's optimiser could not resolve so small a spread; and with each
step's state extended by the episode's earlier actions (zeros for the units not yet walked), the
state feature one would add if the final reward hung on which earlier units were cut, which the
paper's state summarises only as the cost removed so far and the previous action.

    python scripts/critic_fit.py RUN [RUN ...] [--splits 5]

A run of random search (all warmup) stores no critic of its own but its buffer works the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from amc.checkpoint import AGENT_FORMAT, load_checkpoint
from amc.errors import UserError
from amc.report import table
from amc.search import AGENT_FILE, load_run_config


def earlier_actions(actions: torch.Tensor, steps: int) -> torch.Tensor:
    """(rows, steps): row t of each episode holds that episode's actions at units 0..t-1, zeros after."""
    per_episode = actions.view(-1, steps)
    before = torch.ones(steps, steps).tril(-1)  # before[t, u] = 1 where u < t
    return (per_episode[:, None, :] * before).reshape(-1, steps)


def held_out_correlation(states: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, steps: int,
                         hidden: list[int], lr: float, batch_size: int, standardise: bool, seed: int) -> float:
    """Train a critic on 4/5 of the episodes; corr(held-out episode reward, its mean Q over steps)."""
    gen = torch.Generator().manual_seed(seed)
    episodes = torch.randperm(len(rewards) // steps, generator=gen)
    held, kept = episodes[: len(episodes) // 5], episodes[len(episodes) // 5:]
    train, test = ((eps[:, None] * steps + torch.arange(steps)).reshape(-1) for eps in (kept, held))  # their rows
    target = rewards - rewards[train].mean()
    if standardise:
        target = target / rewards[train].std()
    torch.manual_seed(seed)
    sizes = [states.shape[1] + actions.shape[1], *hidden]
    critic = nn.Sequential(*(m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())),
                           nn.Linear(sizes[-1], 1))
    opt = torch.optim.Adam(critic.parameters(), lr)
    inputs = torch.cat([states, actions], 1)
    for _ in range(len(train)):
        batch = train[torch.randint(len(train), (batch_size,), generator=gen)]
        loss = ((critic(inputs[batch]).squeeze(-1) - target[batch]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        q = critic(inputs[test]).squeeze(-1).view(-1, steps).mean(1)
    return float(np.corrcoef(q.numpy(), rewards[test].view(-1, steps)[:, 0].numpy())[0, 1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--splits", type=int, default=5, help="held-out splits (and critic seeds) per run")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for run_dir in args.runs:
        try:
            cfg = load_run_config(run_dir)
            state = load_checkpoint(run_dir / AGENT_FILE, AGENT_FORMAT)
            buffer, steps = state["agent"]["buffer"], len(state["best"]["units"])
            obs, actions, rewards = buffer["observations"][:, 0], buffer["actions"][:, 0], buffer["rewards"][:, 0]
            per_episode = rewards.view(-1, steps)[:, 0]
            if len(per_episode) < 10:
                raise UserError(f"the agent's buffer holds {len(per_episode)} episodes; "
                                "held-out correlations need at least 10", where=str(run_dir))
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        cells = [run_dir.name, str(len(per_episode)), f"{100 * per_episode.std():.2f}"]
        with_history = torch.cat([obs, earlier_actions(actions, steps)], 1)
        for states, standardise in ((obs, False), (obs, True), (with_history, False)):
            corr = [held_out_correlation(states, actions, rewards, steps, cfg.agent.hidden, cfg.agent.critic_lr,
                                         cfg.agent.batch_size, standardise, seed) for seed in range(args.splits)]
            cells.append(f"{np.mean(corr):.2f} ± {np.std(corr):.2f}")
        rows.append(cells)
    print(table(["run", "buffer episodes", "reward sd (points)", "held-out corr, rewards as the agent sees them",
                 "held-out corr, standardised", "held-out corr, state + earlier actions"], rows, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
