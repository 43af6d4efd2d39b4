"""Recurrent PPO: an LSTM agent learns a task that needs memory, a feed-forward agent cannot.

    python -m examples.recurrent_ppo --quick     # a test-sized smoke run, seconds
    python -m examples.recurrent_ppo             # both agents, a few minutes on 2 CPU cores

Task: gymnax's ``CartPole-v1`` with the velocities removed from the observation
(the agent sees the cart position and the pole angle only: "stateless
CartPole", a standard partially observed benchmark). Balancing needs the
velocities, which only a memory of the previous observations gives.

Agents, same observations, same PPO, same hyper-parameters, similar sizes:

* ``lstm``: ``Dense -> jaxlstm.linen.LSTM -> actor / critic heads``. The state
  is carried through the rollout one step at a time, and reset at episode
  boundaries with ``resets`` (the state entering the first step of an episode
  is zeros); the update re-runs each stored sequence in one call from the
  rollout's initial state with the same ``resets``, on the fused backward pass.
* ``ff``: ``Dense -> Dense -> actor / critic heads``, no memory.

PPO in the style of purejaxrl (Lu et al. 2022): vectorised environments, the
whole training (rollouts, GAE, clipped-surrogate updates over minibatches of
whole sequences) is one ``jax.jit`` ted ``lax.scan``. A done (termination or
the 500-step time limit) ends the bootstrap, as in purejaxrl.

Writes ``recurrent_ppo.json`` (returns against environment steps, wall time,
steps per second, per agent) and ``recurrent_ppo.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlstm
import jaxlstm.linen as jl
from examples import cpu_record, optional

VISIBLE = jnp.array([0, 2])  # CartPole's (x, x_dot, theta, theta_dot): keep x and theta


class Config(NamedTuple):
    num_envs: int = 16
    num_steps: int = 128  # rollout length: the sequence each update trains on
    total_steps: int = 2_000_000
    update_epochs: int = 4
    num_minibatches: int = 4  # over environments: each minibatch holds whole sequences
    lr: float = 2.5e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 128

    @property
    def num_updates(self) -> int:
        return self.total_steps // (self.num_envs * self.num_steps)


class ActorCritic(nn.Module):
    """``(obs [N, T, O], state, resets [N, T]) -> (state, logits [N, T, A], value [N, T])``."""

    num_actions: int
    hidden: int
    recurrent: bool

    @nn.compact
    def __call__(self, obs, state, resets):
        x = nn.relu(nn.Dense(self.hidden)(obs))
        if self.recurrent:
            x, state = jl.LSTM(self.hidden)(x, state, resets=resets)
        else:
            x = nn.relu(nn.Dense(self.hidden)(x))
        a = nn.tanh(nn.Dense(self.hidden)(x))
        logits = nn.Dense(self.num_actions, kernel_init=nn.initializers.orthogonal(0.01))(a)
        v = nn.tanh(nn.Dense(self.hidden)(x))
        value = nn.Dense(1, kernel_init=nn.initializers.orthogonal(1.0))(v)[..., 0]
        return state, logits, value


def initial_state(cfg: Config, n: int) -> jaxlstm.LSTMState:
    """One layer's zero state for ``n`` environments (the feed-forward agent carries it unused)."""
    zeros = jnp.zeros((1, n, cfg.hidden))
    return jaxlstm.LSTMState(zeros, zeros)


class Transition(NamedTuple):
    obs: jax.Array  # [T, N, O]
    reset: jax.Array  # [T, N] the step starts an episode (the state entering it is reset)
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    done: jax.Array  # [T, N] the step ends an episode


def make_train(cfg: Config, recurrent: bool):
    """``train(key) -> metrics``, to be jitted: ``cfg.num_updates`` PPO updates."""
    gymnax = optional("gymnax")
    env, env_params = gymnax.make("CartPole-v1")
    net = ActorCritic(env.num_actions, cfg.hidden, recurrent)
    observe = lambda o: o[..., VISIBLE]
    schedule = optax.linear_schedule(cfg.lr, 0.0, cfg.num_updates * cfg.update_epochs * cfg.num_minibatches)
    tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(schedule, eps=1e-5))

    def apply(params, obs, state, reset):  # obs [N, T, O], reset [N, T]
        return net.apply(params, obs, state, reset)

    def train(key):
        k_init, k_env, key = jax.random.split(key, 3)
        N = cfg.num_envs
        state0 = initial_state(cfg, N)
        params = net.init(k_init, jnp.zeros((N, 1, 2)), state0, jnp.zeros((N, 1), bool))
        opt_state = tx.init(params)
        obs, env_state = jax.vmap(env.reset, (0, None))(jax.random.split(k_env, N), env_params)
        reset = jnp.ones((N,), bool)  # the first step starts an episode
        ep_return = jnp.zeros((N,))

        def env_step(carry, _):
            params, env_state, obs, reset, hstate, ep_return, key = carry
            key, k_act, k_env = jax.random.split(key, 3)
            o = observe(obs)
            hstate, logits, value = apply(params, o[:, None], hstate, reset[:, None])
            logits, value = logits[:, 0], value[:, 0]
            action = jax.random.categorical(k_act, logits)
            log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], -1)[:, 0]
            step = jax.vmap(env.step, (0, 0, 0, None))
            obs2, env_state, reward, term, trunc, _ = step(jax.random.split(k_env, N), env_state, action, env_params)
            done = term | trunc
            ep_return = ep_return + reward
            finished = jnp.where(done, ep_return, jnp.nan)  # the returns of the episodes that end here
            ep_return = jnp.where(done, 0.0, ep_return)
            t = Transition(o, reset, action, log_prob, value, reward, done)
            return (params, env_state, obs2, done, hstate, ep_return, key), (t, finished)

        def gae(traj: Transition, last_value):
            def body(carry, t):
                adv, next_value = carry
                delta = t.reward + cfg.gamma * next_value * (1 - t.done) - t.value
                adv = delta + cfg.gamma * cfg.gae_lambda * (1 - t.done) * adv
                return (adv, t.value), adv

            _, advs = jax.lax.scan(body, (jnp.zeros_like(last_value), last_value), traj, reverse=True)
            return advs, advs + traj.value

        def loss_fn(params, hstate0, traj: Transition, adv, targets):
            bm = lambda a: jnp.swapaxes(a, 0, 1)  # [T, n] -> [n, T]: one whole sequence per environment
            _, logits, value = apply(params, bm(traj.obs), hstate0, bm(traj.reset))
            logp_all = jax.nn.log_softmax(logits)
            logp = jnp.take_along_axis(logp_all, bm(traj.action)[..., None], -1)[..., 0]
            ratio = jnp.exp(logp - bm(traj.log_prob))
            a = bm(adv)
            a = (a - a.mean()) / (a.std() + 1e-8)
            actor = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - cfg.clip, 1 + cfg.clip) * a).mean()
            v_old = bm(traj.value)
            v_clipped = v_old + jnp.clip(value - v_old, -cfg.clip, cfg.clip)
            critic = 0.5 * jnp.maximum((value - bm(targets)) ** 2, (v_clipped - bm(targets)) ** 2).mean()
            entropy = -(jnp.exp(logp_all) * logp_all).sum(-1).mean()
            return actor + cfg.vf_coef * critic - cfg.ent_coef * entropy

        def update(carry, _):
            params, opt_state, env_state, obs, reset, hstate, ep_return, key = carry
            hstate0 = hstate
            (params, env_state, obs, reset, hstate, ep_return, key), (traj, finished) = jax.lax.scan(
                env_step, (params, env_state, obs, reset, hstate, ep_return, key), None, cfg.num_steps
            )
            _, _, last_value = apply(params, observe(obs)[:, None], hstate, reset[:, None])
            adv, targets = gae(traj, last_value[:, 0])

            def epoch(carry, _):
                params, opt_state, key = carry
                key, k_perm = jax.random.split(key)
                envs = jax.random.permutation(k_perm, N).reshape((cfg.num_minibatches, -1))

                def minibatch(carry, idx):
                    params, opt_state = carry
                    pick = lambda a: a[:, idx]
                    h0 = jax.tree.map(lambda s: s[:, idx], hstate0)
                    data = (jax.tree.map(pick, traj), pick(adv), pick(targets))
                    loss, grads = jax.value_and_grad(loss_fn)(params, h0, *data)
                    updates, opt_state = tx.update(grads, opt_state)
                    return (optax.apply_updates(params, updates), opt_state), loss

                (params, opt_state), losses = jax.lax.scan(minibatch, (params, opt_state), envs)
                return (params, opt_state, key), losses.mean()

            (params, opt_state, key), losses = jax.lax.scan(epoch, (params, opt_state, key), None, cfg.update_epochs)
            metrics = {"return": jnp.nanmean(finished), "episodes": jnp.isfinite(finished).sum(), "loss": losses.mean()}
            return (params, opt_state, env_state, obs, reset, hstate, ep_return, key), metrics

        carry = (params, opt_state, env_state, obs, reset, state0, ep_return, key)
        _, metrics = jax.lax.scan(update, carry, None, cfg.num_updates)
        return metrics

    return train


def run(cfg: Config, agent: str, seeds: int, seed: int) -> dict:
    """Trains ``seeds`` agents (vmapped) of one kind; returns their curves and timings."""
    train = jax.jit(jax.vmap(make_train(cfg, agent == "lstm")))
    keys = jax.random.split(jax.random.key(seed), seeds)
    t0 = time.perf_counter()
    compiled = train.lower(keys).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = jax.block_until_ready(compiled(keys))
    wall_s = time.perf_counter() - t0
    returns = np.asarray(metrics["return"], np.float64)  # [seeds, updates]; NaN where no episode ended
    steps = cfg.num_envs * cfg.num_steps * seeds * cfg.num_updates
    last = returns[:, -max(1, cfg.num_updates // 10) :]  # the last tenth of training
    return {
        "agent": agent,
        "returns": [[None if np.isnan(r) else float(r) for r in row] for row in returns],
        "env_steps": [cfg.num_envs * cfg.num_steps * (u + 1) for u in range(cfg.num_updates)],
        "final_return_per_seed": [float(np.nanmean(r)) if np.isfinite(r).any() else None for r in last],
        "final_return": float(np.nanmean(last)) if np.isfinite(last).any() else None,
        "compile_s": compile_s,
        "wall_s": wall_s,
        "env_steps_per_s": steps / wall_s,
    }


def plot(result: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(result["agents"]):
        x = np.asarray(r["env_steps"])
        y = np.asarray([[np.nan if v is None else v for v in row] for row in r["returns"]])
        seen = np.isfinite(y).any(axis=0)  # updates in which some seed finished an episode
        mean = np.full(len(x), np.nan)
        mean[seen] = np.nanmean(y[:, seen], axis=0)
        label = f"{r['agent']} (mean of {len(y)} seeds)" if len(y) > 1 else f"{r['agent']} (1 seed)"
        # a few updates: points to see; where the agents' curves coincide (a quick run) the later one is
        # drawn dashed and thinner over the earlier, so that neither hides the other
        few = len(x) <= 30
        style = dict(ms=max(3, 7 - 3 * i), lw=max(0.8, 2.2 - 0.9 * i), ls=("-", "--")[i % 2], zorder=2 + i)
        ax.plot(x, mean, marker="os"[i % 2] if few else None, label=label, **style)
        if len(y) > 1 and seen.any():
            ax.fill_between(x[seen], np.nanmin(y[:, seen], axis=0), np.nanmax(y[:, seen], axis=0), alpha=0.2)
    ax.set(
        xlabel="environment steps (per seed)",
        ylabel="episode return",
        title="PPO on CartPole without velocities",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "recurrent_ppo.png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", nargs="+", default=["lstm", "ff"], choices=["lstm", "ff"])
    ap.add_argument("--total-steps", type=int, default=Config.total_steps, help="environment steps per seed")
    ap.add_argument("--seeds", type=int, default=2, help="independent agents of each kind, vmapped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, a few updates")
    ap.add_argument(
        "--out",
        default=os.path.join("examples", "runs"),
        help="untracked by default; the committed results: --out examples/results",
    )
    args = ap.parse_args(argv)
    cfg = Config(total_steps=args.total_steps)
    if args.quick:
        # rollouts long enough that episodes end (a random CartPole episode lasts ~20 steps): a return to show
        cfg = Config(num_envs=4, num_steps=32, total_steps=4 * 32 * 6, num_minibatches=2, update_epochs=2, hidden=8)
        args.seeds = 1
    os.makedirs(args.out, exist_ok=True)
    agents = []
    for agent in args.agents:
        r = run(cfg, agent, args.seeds, args.seed)
        agents.append(r)
        if r["final_return"] is None:
            final = "no episode ended in the last tenth of training (a longer run: --total-steps)"
        else:
            per_seed = ", ".join("-" if v is None else f"{v:.1f}" for v in r["final_return_per_seed"])
            final = f"final return {r['final_return']:.1f} (per seed: {per_seed})"
        print(
            f"{agent:4s} {final}, {r['wall_s']:.1f} s, {r['env_steps_per_s']:.0f} env steps/s "
            f"(compile {r['compile_s']:.0f} s)"
        )
    result = {"agents": agents, "config": {**cfg._asdict(), "seeds": args.seeds}, "cpu": cpu_record()}
    with open(os.path.join(args.out, "recurrent_ppo.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.out)
    print(f"wrote {args.out}/recurrent_ppo.json and recurrent_ppo.png")
    return result


if __name__ == "__main__":
    main()
