"""The tasks the studies train: each builds a fresh :class:`Trial` per seed at a given scale.

Scales: ``smoke`` (seconds, for the tests), ``quick`` (a few minutes per study) and ``full``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import data
from .loop import Trial, train
from .schedule import CONSTANT, Schedule
from .models import ActorCritic, CharTransformer, Discriminator, Generator, cnn, mlp

__all__ = ["CartPole", "Classification", "ConditionalGAN", "Shakespeare", "deep_mlp_tasks", "descend", "table1_tasks"]


def descend(optimizer, loss: torch.Tensor) -> float:
    """One gradient step on ``loss``."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 2000) -> float:
    correct = sum((model(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum().item() for i in range(0, len(x), chunk))
    return 100.0 * correct / len(x)


class Classification:
    """Cross-entropy on random minibatches; the score is test accuracy (%)."""

    metric, goal, chance = "test accuracy (%)", "max", 10.0

    def __init__(self, name: str, load: Callable[[], tuple], model: Callable[[], nn.Module], *, steps: int,
                 batch: int = 128, train_size: int | None = None, test_size: int | None = None,
                 schedule: Schedule = CONSTANT, architecture: str | None = None):
        self.name, self.load, self.model, self.steps, self.batch = name, load, model, steps, batch
        self.train_size, self.test_size = train_size, test_size  # for the record; ``load`` applies them
        self.schedule, self.architecture = schedule, architecture  # ``architecture``: ``model`` in words
        self._data: tuple | None = None

    @property
    def data(self) -> tuple:
        if self._data is None:
            self._data = self.load()
        return self._data

    def trial(self, seed: int) -> Trial:
        x, y, x_test, y_test = self.data
        model = self.model()
        generator = torch.Generator().manual_seed(seed)

        def step(optimizers: dict) -> float:
            i = torch.randint(len(x), (self.batch,), generator=generator)
            return descend(optimizers["model"], F.cross_entropy(model(x[i]), y[i]))

        def evaluate() -> dict:
            return {"score": accuracy(model, x_test, y_test), "train_accuracy": accuracy(model, x[:10000], y[:10000])}

        return Trial({"model": model}, step, evaluate, self.steps)


class Shakespeare:
    """A character-level transformer LM on tiny Shakespeare; the score is validation loss (nats per character)."""

    metric, goal, chance = "validation loss (nats/char)", "min", math.log(65)
    name = "char_lm_shakespeare"

    def __init__(self, data_dir=None, *, steps: int, batch: int = 32, context: int = 64, width: int = 64,
                 layers: int = 2, validation_windows: int = 128, probe_every: int = 0,
                 schedule: Schedule = CONSTANT):
        self.data_dir, self.steps, self.batch, self.context, self.width, self.layers = (
            data_dir, steps, batch, context, width, layers)
        self.validation_windows, self.probe_every, self.schedule = validation_windows, probe_every, schedule
        self._data: tuple | None = None

    def windows(self, ids: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
        start = torch.randint(len(ids) - self.context - 1, (count, 1), generator=generator)
        return ids[start + torch.arange(self.context + 1)]

    def trial(self, seed: int) -> Trial:
        if self._data is None:
            self._data = data.shakespeare(self.data_dir)
        train_ids, val_ids, vocabulary = self._data
        model = CharTransformer(len(vocabulary), self.context, self.width, self.layers)
        generator = torch.Generator().manual_seed(seed)
        validation = self.windows(val_ids, self.validation_windows, torch.Generator().manual_seed(1234))

        def loss(w: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())

        def step(optimizers: dict) -> float:
            return descend(optimizers["model"], loss(self.windows(train_ids, self.batch, generator)))

        def validate() -> float:
            return loss(validation).item()

        return Trial({"model": model}, step, lambda: {"score": validate()}, self.steps,
                     probe=validate if self.probe_every else None, probe_every=self.probe_every)


class ConditionalGAN:
    """A class-conditional MLP GAN on MNIST (non-saturating loss), both players with the same optimizer.

    Scored with an MLP classifier trained here: the Frechet distance between its penultimate features of generated
    and of test images (the score), and its accuracy on generated images against the class asked for.
    """

    metric, goal, chance = "Frechet distance (study classifier features)", "min", None
    name = "cgan_mnist"

    def __init__(self, data_dir=None, *, steps: int, batch: int = 64, train_size: int | None = None,
                 classifier_steps: int = 1500, samples: int = 2000, schedule: Schedule = CONSTANT):
        self.data_dir, self.steps, self.batch, self.train_size = data_dir, steps, batch, train_size
        self.classifier_steps, self.samples, self.schedule = classifier_steps, samples, schedule
        self.probe_every = max(1, steps // 20)
        self._data: tuple | None = None
        self._classifier: nn.Module | None = None  # (a cache, not a setting: see runner.settings)
        self._classifier_accuracy: float | None = None  # private: not a setting

    def _prepare(self) -> None:
        if self._data is not None:
            return
        self._data = data.mnist(self.data_dir, train_size=self.train_size)
        scorer = Classification("gan_scorer", lambda: self._data, lambda: mlp(784, 256, 10, depth=2),
                                steps=self.classifier_steps)
        torch.manual_seed(0)
        trial = scorer.trial(0)
        self._classifier_accuracy = train(trial, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))["score"]
        self._classifier = trial.modules["model"]
        x_test = self._data[2][: self.samples]
        self.test_features = self.features(x_test)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        return self._classifier[:-1](x).double().numpy()

    def trial(self, seed: int) -> Trial:
        self._prepare()
        x = self._data[0] * 0.3081 + 0.1307  # standardised -> [0, 1]
        x, y = 2 * x - 1, self._data[1]  # [-1, 1], the generator's range
        generator, discriminator = Generator(), Discriminator()
        rng = torch.Generator().manual_seed(seed)

        def step(optimizers: dict) -> float:
            i = torch.randint(len(x), (self.batch,), generator=rng)
            labels = y[i]
            fake = generator(torch.randn(self.batch, generator.noise, generator=rng), labels)
            real_logits, fake_logits = discriminator(x[i], labels), discriminator(fake.detach(), labels)
            d_loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
            d = descend(optimizers["discriminator"], d_loss)
            g = descend(optimizers["generator"], F.softplus(-discriminator(fake, labels)).mean())
            return d + g

        def sample(count: int) -> tuple[torch.Tensor, torch.Tensor]:
            """``count`` generated images, standardised as the classifier's inputs, and the classes asked for."""
            labels = torch.arange(count) % 10
            images = generator(torch.randn(count, generator.noise, generator=rng), labels)
            return ((images + 1) / 2 - 0.1307) / 0.3081, labels

        def evaluate() -> dict:
            standardised, labels = sample(self.samples)
            if not torch.isfinite(standardised).all():
                return {"score": math.nan}
            return {
                "score": frechet_distance(self.features(standardised), self.test_features),
                "generated_accuracy": accuracy(self._classifier, standardised, labels),
                "classifier_test_accuracy": self._classifier_accuracy,
            }

        def probe() -> float:
            """The classifier's accuracy on 500 samples against the classes asked for: conditioning learned."""
            standardised, labels = sample(500)
            return accuracy(self._classifier, standardised, labels) if torch.isfinite(standardised).all() else math.nan

        return Trial({"generator": generator, "discriminator": discriminator}, step, evaluate, self.steps,
                     probe=probe, probe_every=self.probe_every)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)`` between two feature samples."""
    c_a, c_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(c_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ c_b @ root_a).clip(min=0)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c_a) + np.trace(c_b) - 2 * cross)


class CartPole:
    """PPO (clipped objective, GAE) on gymnasium's CartPole-v1; one step is one rollout and its updates.

    The score is the mean return of the greedy policy over 5 evaluation episodes (at most 500).
    """

    metric, goal, chance = "greedy episode return (max 500)", "max", 22.0
    name = "ppo_cartpole"

    def __init__(self, *, iterations: int, rollout: int = 1024, epochs: int = 4, minibatch: int = 256,
                 gamma: float = 0.99, lam: float = 0.95, clip: float = 0.2, schedule: Schedule = CONSTANT):
        self.steps, self.rollout, self.epochs, self.minibatch = iterations, rollout, epochs, minibatch
        self.gamma, self.lam, self.clip, self.schedule = gamma, lam, clip, schedule
        self.probe_every = max(1, iterations // 30)

    def trial(self, seed: int) -> Trial:
        import gymnasium as gym

        env = gym.make("CartPole-v1")
        agent = ActorCritic(env.observation_space.shape[0], env.action_space.n)
        generator = torch.Generator().manual_seed(seed)
        obs = [env.reset(seed=seed)[0]]
        episodes = {"running": 0.0, "returns": []}  # the current episode's return; those finished in a rollout

        def collect() -> dict:
            episodes["returns"] = []
            observations, actions, rewards, dones, logps, values = [], [], [], [], [], []
            for _ in range(self.rollout):
                o = torch.as_tensor(obs[0], dtype=torch.float32)
                logits, value = agent(o)
                action = torch.multinomial(logits.softmax(-1), 1, generator=generator).item()
                next_obs, reward, terminated, truncated, _ = env.step(action)
                observations.append(o), actions.append(action), rewards.append(reward)
                dones.append(terminated), logps.append(logits.log_softmax(-1)[action]), values.append(value)
                episodes["running"] += reward
                if terminated or truncated:
                    episodes["returns"].append(episodes["running"])
                    episodes["running"] = 0.0
                obs[0] = env.reset()[0] if terminated or truncated else next_obs
                if truncated and not terminated:  # bootstrap through the time limit
                    rewards[-1] += self.gamma * agent(torch.as_tensor(next_obs, dtype=torch.float32))[1].item()
            last = agent(torch.as_tensor(obs[0], dtype=torch.float32))[1]
            values_t = torch.stack(values + [last])
            advantages = torch.zeros(self.rollout)
            running = 0.0
            for t in reversed(range(self.rollout)):
                keep = 0.0 if dones[t] else 1.0
                delta = rewards[t] + self.gamma * values_t[t + 1] * keep - values_t[t]
                running = delta + self.gamma * self.lam * keep * running
                advantages[t] = running
            return {"obs": torch.stack(observations), "actions": torch.tensor(actions), "logp": torch.stack(logps),
                    "advantages": advantages, "returns": advantages + values_t[:-1]}

        def step(optimizers: dict) -> float:
            if not all(torch.isfinite(p).all() for p in agent.parameters()):
                return math.nan  # the last update broke the policy: diverged (sampling from it would fail)
            with torch.no_grad():
                batch = collect()
            losses = []
            for _ in range(self.epochs):
                for i in torch.randperm(self.rollout, generator=generator).split(self.minibatch):
                    logits, value = agent(batch["obs"][i])
                    logp = logits.log_softmax(-1).gather(1, batch["actions"][i, None]).squeeze(1)
                    adv = batch["advantages"][i]
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                    ratio = (logp - batch["logp"][i]).exp()
                    policy = -torch.min(ratio * adv, ratio.clamp(1 - self.clip, 1 + self.clip) * adv).mean()
                    loss = policy + 0.5 * F.mse_loss(value, batch["returns"][i])
                    losses.append(descend(optimizers["agent"], loss))
            return float(np.mean(losses))

        def evaluate() -> dict:
            returns = []
            for episode in range(5):
                o, _ = env.reset(seed=10_000 + episode)
                total, done = 0.0, False
                while not done:
                    action = agent(torch.as_tensor(o, dtype=torch.float32))[0].argmax().item()
                    o, reward, terminated, truncated, _ = env.step(action)
                    total, done = total + reward, terminated or truncated
                returns.append(total)
            return {"score": float(np.mean(returns))}

        def probe() -> float:
            """The mean return of the training episodes that ended in the last rollout (its longest unfinished
            one where none ended)."""
            return float(np.mean(episodes["returns"])) if episodes["returns"] else episodes["running"]

        return Trial({"agent": agent}, step, evaluate, self.steps, probe=probe, probe_every=self.probe_every)


# steps per scale: smoke (seconds, for the tests), quick (minutes for the whole study), full (hours: the budgets of
# the committed Table 1: 5 MNIST epochs, 20 epochs of the 10k-image CIFAR-10 subset, 3000 steps, 5000 GAN steps
# (5.3 epochs at batch 64), 150 PPO iterations of 1024 environment steps)
SCALES = {
    "mlp_mnist": {"smoke": 30, "quick": 469, "full": 2344},
    "cnn_cifar10": {"smoke": 10, "quick": 200, "full": 1563},
    "char_lm_shakespeare": {"smoke": 10, "quick": 300, "full": 3000},
    "cgan_mnist": {"smoke": 10, "quick": 300, "full": 5000},
    "ppo_cartpole": {"smoke": 1, "quick": 15, "full": 150},
}
MNIST_EPOCH = 469  # steps of batch 128 per pass over MNIST's 60,000 training images


def mnist_mlp(scale: str, data_dir=None) -> Classification:
    """An MLP (784-256-256-10) on MNIST; its lr decays by 0.9 per epoch, as in the paper's MLP experiments."""
    size = 2000 if scale == "smoke" else None
    return Classification("mlp_mnist", lambda: data.mnist(data_dir, train_size=size, test_size=size),
                          lambda: mlp(784, 256, 10, depth=3), steps=SCALES["mlp_mnist"][scale],
                          train_size=size, test_size=size, architecture="MLP 784-256-256-10, ReLU",
                          schedule=Schedule(decay="epoch", gamma=0.9, epoch=MNIST_EPOCH))


def cifar_cnn(scale: str, data_dir=None, schedule: Schedule = CONSTANT, steps: int | None = None) -> Classification:
    """The small CNN on a CIFAR-10 subset (10,000 training images at full scale) for ``steps`` (default: Table 1's
    budget at ``scale``)."""
    train_size, test_size = {"smoke": (500, 500), "quick": (5000, 2000), "full": (10000, 5000)}[scale]
    return Classification("cnn_cifar10", lambda: data.cifar10(data_dir, train_size=train_size, test_size=test_size),
                          lambda: cnn(), steps=steps or SCALES["cnn_cifar10"][scale],
                          train_size=train_size, test_size=test_size, schedule=schedule,
                          architecture="CNN: 3 conv3x3-ReLU-maxpool blocks (16, 32, 64 channels), linear head")


def table1_tasks(scale: str, data_dir=None) -> dict[str, object]:
    """The five Table 1 tasks at ``scale``, each with the schedule every optimizer trains it under: the CNN and
    the transformer warm up over the first 5% of the steps, then decay along a cosine; the GAN's and PPO's lr
    decays linearly to 0; the MLP's by 0.9 per epoch."""
    smoke = scale == "smoke"
    lm_steps = SCALES["char_lm_shakespeare"][scale]
    return {
        "mlp_mnist": mnist_mlp(scale, data_dir),
        "cnn_cifar10": cifar_cnn(scale, data_dir, Schedule(warmup=0.05, decay="cosine")),
        "char_lm_shakespeare": Shakespeare(data_dir, steps=lm_steps, validation_windows=32 if smoke else 256,
                                           probe_every=max(1, lm_steps // 60),
                                           schedule=Schedule(warmup=0.05, decay="cosine")),
        "cgan_mnist": ConditionalGAN(data_dir, steps=SCALES["cgan_mnist"][scale],
                                     train_size=2000 if smoke else None,
                                     classifier_steps=100 if smoke else 1500,
                                     samples=500 if smoke else 2000, schedule=Schedule(decay="linear")),
        "ppo_cartpole": CartPole(iterations=SCALES["ppo_cartpole"][scale], rollout=256 if smoke else 1024,
                                 schedule=Schedule(decay="linear")),
    }


DEEP = {  # depths, width, steps, training images: the deep plain MLPs
    "smoke": ((4, 8), 32, 30, 2000),
    "quick": ((8, 32), 64, MNIST_EPOCH, None),
    "full": ((32, 64, 100), 64, 5 * MNIST_EPOCH, None),
}


def deep_mlp_tasks(scale: str, data_dir=None) -> dict[str, Classification]:
    """Plain MLPs (ReLU, PyTorch's default init, no normalisation, no skips) of each depth of ``DEEP[scale]`` on
    MNIST; the lr decays by 0.9 per epoch, as in the paper's deep MLP experiment."""
    depths, width, steps, size = DEEP[scale]
    loaded: list[tuple] = []

    def mnist() -> tuple:
        if not loaded:
            loaded.append(data.mnist(data_dir, train_size=size, test_size=size))
        return loaded[0]

    schedule = Schedule(decay="epoch", gamma=0.9, epoch=MNIST_EPOCH)
    return {f"mlp_depth{depth}": Classification(f"mlp_depth{depth}", mnist,
                                                lambda depth=depth: mlp(784, width, 10, depth=depth), steps=steps,
                                                train_size=size, test_size=size, schedule=schedule,
                                                architecture=f"MLP depth {depth}, width {width}, ReLU")
            for depth in depths}
