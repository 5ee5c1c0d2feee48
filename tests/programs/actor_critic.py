"""Actor Critic: one model with an actor head and a critic head, trained eagerly with a GradientTape per episode.

Adapted from keras-io "Actor Critic Method" (https://keras.io/examples/rl/actor_critic_cartpole/): same model
(common Dense, action softmax head, critic head), the episode run inside one GradientTape, action_probs_history,
critic_value_history, discounted normalised returns, actor loss -log_prob * diff plus Huber critic loss, Adam.
A tiny synthetic environment replaces gym's CartPole (no download, no gym).
Expected gradtel outcome: healthy, the optimizer steps, no finding (`gradtel check` exit 0).
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

keras.utils.set_random_seed(0)  # one run is judged: the same initialisation every time

EXPECT = {"check_exit": 0, "run_exit": 0, "optimizers": 1, "stepping": 1}

gamma = 0.99
max_steps_per_episode = 12
eps = np.finfo(np.float32).eps.item()
rng = np.random.default_rng(0)


class ToyEnv:
    """CartPole-shaped stand-in: 4 observations, 2 actions, reward 1 per step, ends after a few steps."""

    def reset(self):
        self.t = 0
        return rng.normal(size=4).astype("float32")

    def step(self, action):
        self.t += 1
        return rng.normal(size=4).astype("float32"), 1.0, self.t >= 8


env = ToyEnv()
num_inputs, num_actions, num_hidden = 4, 2, 16
inputs = layers.Input(shape=(num_inputs,))
common = layers.Dense(num_hidden, activation="relu")(inputs)
action = layers.Dense(num_actions, activation="softmax")(common)
critic = layers.Dense(1)(common)
model = keras.Model(inputs=inputs, outputs=[action, critic])

optimizer = keras.optimizers.Adam(learning_rate=0.01)
huber_loss = keras.losses.Huber()
action_probs_history, critic_value_history, rewards_history = [], [], []

for episode_count in range(3):
    state = env.reset()
    with tf.GradientTape() as tape:
        for timestep in range(1, max_steps_per_episode):
            state = keras.ops.convert_to_tensor(state)
            state = keras.ops.expand_dims(state, 0)
            action_probs, critic_value = model(state)
            critic_value_history.append(critic_value[0, 0])
            action = rng.choice(num_actions, p=np.squeeze(action_probs))
            action_probs_history.append(keras.ops.log(action_probs[0, action]))
            state, reward, done = env.step(action)
            rewards_history.append(reward)
            if done:
                break

        returns, discounted_sum = [], 0
        for r in rewards_history[::-1]:
            discounted_sum = r + gamma * discounted_sum
            returns.insert(0, discounted_sum)
        returns = np.array(returns)
        returns = (returns - np.mean(returns)) / (np.std(returns) + eps)
        returns = returns.tolist()

        actor_losses, critic_losses = [], []
        for log_prob, value, ret in zip(action_probs_history, critic_value_history, returns):
            diff = ret - value
            actor_losses.append(-log_prob * diff)
            critic_losses.append(huber_loss(keras.ops.expand_dims(value, 0), keras.ops.expand_dims(ret, 0)))
        loss_value = sum(actor_losses) + sum(critic_losses)
        grads = tape.gradient(loss_value, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        action_probs_history.clear()
        critic_value_history.clear()
        rewards_history.clear()
